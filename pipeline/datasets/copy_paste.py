"""Inputs for the copy-paste recipe, from the photos scikit-image ships (no download).

Enters: a folder (local path or any fsspec URI).
Leaves: `{root}/photos/{photo}.png` (the five colour photos of the demo), the masks of their
eight objects cut by GrabCut (`demo.OBJECTS`, `demo.object_mask`: a face, a space suit, a
helmet, a cat, a cup, a saucer, a rocket, a motorcycle) as `{root}/masks/{photo}_{object}.png`,
and two manifests with relative URIs: `{root}/objects.parquet` (`object_id` =
`{photo}_{object}`, `image_uri` the whole photo, `mask_uri`, `category` = the object's name)
and `{root}/backgrounds.parquet` (the same five photos). Compose never pastes an object into
the photo it was cut from, so every composite puts objects from other photos into a scene.
Also the recipe's placement rules and filter, which `harmonize demo --copy-paste` uses.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline.compose.layout import LayoutRules
from pipeline.datasets.demo import OBJECTS, load_photo, object_mask
from pipeline.storage import join, write_atomic

# The recipe's placement (README "Copy-paste augmentation"): two composites per photo, one or
# two objects standing in the lower quarter, at 35-60 % of the photo's height.
RECIPE_RULES = LayoutRules(
    per_background=2, min_objects=1, max_objects=2, scale=(0.35, 0.6), position="ground",
    horizon=0.75, max_overlap=0.3,
)  # fmt: skip
# The recipe's filter: objects whose hue and structure harmonization kept. (The stricter
# reference-free QUALITY_FILTER keeps none of Reinhard's outputs here: it recolours every
# pasted object by a CIEDE2000 95th percentile of 15 or more.)
RECIPE_FILTER = "abs(fg_hue_shift) < 30 AND fg_structure > 0.85"


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _parquet(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def build_copy_paste_inputs(
    root: str, storage_options: dict[str, Any] | None = None
) -> tuple[str, str]:
    """Write the photos, object masks and both manifests under `root`; returns the objects
    and backgrounds manifests' URIs."""
    options = storage_options or {}
    photos: dict[str, np.ndarray] = {}
    objects: dict[str, list[str]] = {"object_id": [], "image_uri": [], "mask_uri": [],
                                     "category": []}  # fmt: skip
    for (photo, name), box in OBJECTS.items():
        if photo not in photos:
            photos[photo] = load_photo(photo)
            write_atomic(join(root, "photos", f"{photo}.png"), _png(photos[photo]), options)
        mask = object_mask(photos[photo], box).astype(np.uint8) * 255
        write_atomic(join(root, "masks", f"{photo}_{name}.png"), _png(mask), options)
        objects["object_id"].append(f"{photo}_{name}")
        objects["image_uri"].append(f"photos/{photo}.png")
        objects["mask_uri"].append(f"masks/{photo}_{name}.png")
        objects["category"].append(name)
    backgrounds = {"background_id": list(photos),
                   "image_uri": [f"photos/{photo}.png" for photo in photos]}  # fmt: skip
    objects_uri, backgrounds_uri = join(root, "objects.parquet"), join(root, "backgrounds.parquet")
    write_atomic(objects_uri, _parquet(pa.table(objects)), options)
    write_atomic(backgrounds_uri, _parquet(pa.table(backgrounds)), options)
    return objects_uri, backgrounds_uri
