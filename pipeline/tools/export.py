"""`harmonize export`: a selection of harmonized composites -> a COCO instances training set.

Enters: a results URI (as `harmonize select` takes it) whose samples came from `harmonize
compose` (their `instances_uri` and `instances` passed through `harmonize run`), an SQL
condition, where to write the JSON, storage options.
Leaves: one COCO instances JSON written atomically to any URI, and an `ExportSummary`:
- `images`: one per selected sample, `file_name` = the harmonized image's absolute URI (the
  images stay where `harmonize run` wrote them), its size, and `sample_id` / `composite_uri`
  for provenance;
- `annotations`: one per visible pasted object, its mask as compressed RLE computed from the
  instance label PNG that compose wrote (`coco.encode_mask`: pycocotools' own encoding, area
  and box), `iscrowd` 0, `category_id`, and `object_id`;
- `categories`: the objects' category names, sorted, ids from 1 ("object" for objects
  without a category).
A sample whose instance masks cannot be read, or whose harmonized image is not the size of
its instance masks (`--output-size model`), is left out and listed; the rest is written.
"""

from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
from PIL import Image

from pipeline.coco import encode_mask
from pipeline.decode import upright
from pipeline.results import ResultsError, connect
from pipeline.storage import absolute, read_bytes, write_atomic

UNNAMED_CATEGORY = "object"
_NEEDED = ("output_uri", "instances_uri", "instances")


@dataclass
class ExportSummary:
    out: str
    where: str
    results_uri: str
    params_hash: str | None
    ok_samples: int  # samples with an ok result (of this parameter set)
    selected: int  # of those, the ones `where` keeps
    images: int = 0
    annotations: int = 0
    categories: dict[str, int] = field(default_factory=dict)  # name -> annotations
    left_out: list[str] = field(default_factory=list)  # "sample 'id': why"

    def text(self) -> str:
        counts = ", ".join(f"{name} {n}" for name, n in self.categories.items())
        lines = [
            f"selected {self.selected} of {self.ok_samples} samples where {self.where}; "
            f"exported {self.images} images, {self.annotations} annotations "
            f"({counts or 'none'})",
            f"results: {self.results_uri} (params_hash {self.params_hash})",
            f"coco:    {self.out}",
        ]
        return "\n".join(lines + [f"left out: {reason}" for reason in self.left_out])


def _annotate(row: dict[str, Any], options: dict[str, Any]) -> tuple[dict[str, Any], list]:
    """One sample -> its COCO image entry (without id) and its annotations' (instance, RLE,
    area, box); raises ValueError naming what is wrong."""
    labels_image = Image.open(io.BytesIO(read_bytes(row["instances_uri"], options)))
    if labels_image.mode != "L":
        raise ValueError(f"instance masks {row['instances_uri']} are not an 8-bit label PNG")
    labels = np.asarray(labels_image)
    output = upright(Image.open(io.BytesIO(read_bytes(row["output_uri"], options))))
    width, height = output.size
    if (height, width) != labels.shape:
        raise ValueError(
            f"harmonized image is {width}x{height} but its instance masks are "
            f"{labels.shape[1]}x{labels.shape[0]} (harmonize with --output-size input)"
        )
    annotations = []
    for instance in row["instances"] or []:
        mask = labels == instance["label"]
        if not mask.any():
            raise ValueError(
                f"instance {instance['label']} ({instance['object_id']}) has no pixel in "
                f"{row['instances_uri']}"
            )
        annotations.append((instance, *encode_mask(mask)))
    image = {"file_name": row["output_uri"], "width": width, "height": height,
             "sample_id": row["sample_id"], "composite_uri": row["composite_uri"]}  # fmt: skip
    return image, annotations


def export_coco(
    results_uri: str,
    where: str,
    out: str,
    storage_options: dict[str, Any] | None = None,
    *,
    params_hash: str | None = None,
    workers: int = 16,
) -> ExportSummary:
    """Write the COCO instances JSON of the samples of `current` that satisfy `where`."""
    options = storage_options or {}
    if not where or not where.strip():
        raise ResultsError('--where is empty: give a condition, e.g. "bg_psnr > 35" (or "true")')
    results = connect(results_uri, options, params_hash)
    missing = [c for c in _NEEDED if c not in results.columns]
    if missing:
        raise ResultsError(
            f"the results under {results.uri} have no {', '.join(missing)}: export needs "
            "composites made by `harmonize compose` (their manifest carries the instances)"
        )
    rows = results.query(
        "SELECT sample_id, output_uri, composite_uri, instances_uri, instances FROM current "
        "WHERE {where} ORDER BY sample_id",
        where,
    ).to_pylist()
    ok_samples = results.connection.sql("SELECT count(*) FROM current").fetchall()[0][0]
    summary = ExportSummary(
        absolute(out), where, results.uri, results.params_hash, ok_samples, len(rows)
    )

    def annotate(row: dict[str, Any]) -> tuple[dict[str, Any], list] | str:
        try:
            return _annotate(row, options)
        except Exception as exc:  # that sample is left out and listed; the export goes on
            cause = str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
            return f"sample {row['sample_id']!r}: {cause}"

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        done = list(pool.map(annotate, rows))

    names = sorted(
        {
            (i["category"] or UNNAMED_CATEGORY)
            for r in done
            if not isinstance(r, str)
            for i, *_ in r[1]
        }
    )
    category_ids = {name: number for number, name in enumerate(names, start=1)}
    images, annotations = [], []
    for entry in done:
        if isinstance(entry, str):
            summary.left_out.append(entry)
            continue
        image, instances = entry
        image_id = len(images) + 1
        images.append({"id": image_id, **image})
        for instance, rle, area, box in instances:
            name = instance["category"] or UNNAMED_CATEGORY
            summary.categories[name] = summary.categories.get(name, 0) + 1
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id,
                "category_id": category_ids[name], "segmentation": rle, "area": area,
                "bbox": box, "iscrowd": 0, "object_id": instance["object_id"],
            })  # fmt: skip
    summary.images, summary.annotations = len(images), len(annotations)
    summary.categories = dict(sorted(summary.categories.items()))
    coco = {
        "info": {
            "description": f"harmonize export of {results.uri} where {where}",
            "params_hash": results.params_hash,
            "date_created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i, "name": n, "supercategory": ""} for n, i in category_ids.items()],
    }
    write_atomic(summary.out, json.dumps(coco).encode(), options)
    return summary
