"""COCO instances: objects read from an instances JSON, masks written as COCO RLE.

Enters: the bytes of a COCO instances JSON and the folder its `file_name`s are relative to;
a segmentation (COCO JSON: polygons, uncompressed or compressed RLE) and its image's size;
binary masks to annotate.
Leaves: an objects table in `schemas/compose.py`'s contract (one object per non-crowd
annotation: `object_id` = the annotation id, `image_uri`, `segmentation` as JSON, `category`
by name); a segmentation decoded to a binary mask; a mask encoded as compressed RLE with its
area and box. All mask arithmetic is pycocotools' own (`pycocotools.mask`), so what we write is
what COCO tools read back.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa
from pycocotools import mask as mask_utils

from pipeline.decode import SampleError
from pipeline.storage import resolve
from schemas.manifest import ManifestError


def objects_from_coco(
    data: bytes, images_root: str, *, include_crowd: bool = False
) -> tuple[pa.Table, int]:
    """The objects of a COCO instances JSON, and how many crowd annotations were left out
    (a crowd region is many objects under one mask: not something to paste)."""
    try:
        coco = json.loads(data)
        images = {image["id"]: image["file_name"] for image in coco["images"]}
        categories = {category["id"]: category["name"] for category in coco["categories"]}
        annotations = coco["annotations"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ManifestError(
            f"objects: not a COCO instances JSON (images, categories, annotations): {exc!r}"
        ) from None
    rows: dict[str, list[Any]] = {"object_id": [], "image_uri": [], "segmentation": [],
                                  "category": []}  # fmt: skip
    crowd = 0
    for number, annotation in enumerate(annotations):
        try:
            if annotation.get("iscrowd", 0) and not include_crowd:
                crowd += 1
                continue
            file_name = images[annotation["image_id"]]
            segmentation = annotation["segmentation"]
            category = categories.get(annotation.get("category_id"))
            object_id = str(annotation["id"])
        except (KeyError, TypeError, AttributeError) as exc:
            raise ManifestError(
                f"objects: COCO annotation #{number} lacks {exc} (or names an image that is "
                "not in images)"
            ) from None
        rows["object_id"].append(object_id)
        rows["image_uri"].append(resolve(images_root, file_name))
        rows["segmentation"].append(json.dumps(segmentation))
        rows["category"].append(category)
    return pa.table(rows, schema=pa.schema([(name, pa.string()) for name in rows])), crowd


def decode_segmentation(text: str, height: int, width: int) -> np.ndarray:
    """A COCO segmentation (JSON) on an image of (height, width) -> (H, W) bool."""
    try:
        segmentation = json.loads(text)
    except ValueError as exc:
        raise SampleError(f"segmentation is not JSON ({exc})") from None
    if isinstance(segmentation, list):  # polygons: [[x0, y0, x1, y1, ...], ...]
        polygons = [p for p in segmentation if isinstance(p, list) and len(p) >= 6]
        if not polygons:
            raise SampleError("segmentation has no polygon of 3 or more points")
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    elif isinstance(segmentation, dict) and {"size", "counts"} <= set(segmentation):
        size = list(segmentation["size"])
        if size != [height, width]:
            raise SampleError(
                f"segmentation RLE is for a {size[1]}x{size[0]} image but the image is "
                f"{width}x{height}"
            )
        counts = segmentation["counts"]
        if isinstance(counts, list):  # uncompressed RLE
            rle = mask_utils.frPyObjects(segmentation, height, width)
        else:
            rle = {"size": size, "counts": counts.encode("ascii")}
    else:
        raise SampleError("segmentation is neither polygons nor RLE")
    return mask_utils.decode(rle).astype(bool)


def encode_mask(mask: np.ndarray) -> tuple[dict[str, Any], int, list[float]]:
    """(H, W) bool -> compressed RLE ({"size": [H, W], "counts": str}), area, [x, y, w, h]."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    area = int(mask_utils.area(rle))
    box = [float(v) for v in mask_utils.toBbox(rle)]
    return (
        {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")},
        area,
        box,
    )
