"""A small iHarmony4-style demo dataset built from the photos that scikit-image ships.

Enters: a local folder (or any fsspec URI) to write to.
Leaves: `{root}/composites/*.jpg|png`, `{root}/masks/*.png`, `{root}/real/*.png` and
`{root}/manifest.parquet` with relative URIs and passthrough columns `subset`, `photo`.

Each sample is a real photo (kept untouched as `real_uri`), a foreground mask (the shipped
horse silhouette, or an ellipse) placed over a region of it, and the composite: the photo with
that region colour-shifted (per-channel gain, offset and gamma), the way iHarmony4 composites
are made by changing a region's colour statistics.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline.storage import filesystem, join, write_atomic


@dataclass(frozen=True)
class DemoSample:
    photo: str
    mask: str  # "horse" or "ellipse"
    centre: tuple[float, float]  # (x, y) as fractions of the photo size
    scale: float  # mask size as a fraction of the photo size
    gain: tuple[float, float, float]
    offset: tuple[float, float, float]
    gamma: float
    composite_format: str


DEMO_SAMPLES = [
    DemoSample("astronaut", "horse", (0.5, 0.55), 0.55, (1.25, 0.8, 0.7), (10, 0, -10), 1.0, "jpg"),
    DemoSample("chelsea", "ellipse", (0.45, 0.5), 0.45, (0.7, 0.9, 1.3), (0, 10, 20), 1.2, "png"),
    DemoSample("coffee", "horse", (0.55, 0.5), 0.5, (0.8, 1.2, 0.8), (-10, 0, 0), 0.8, "jpg"),
    DemoSample("rocket", "ellipse", (0.6, 0.4), 0.35, (1.3, 1.1, 0.6), (0, 0, 0), 1.0, "png"),
    DemoSample(
        "motorcycle_left", "horse", (0.5, 0.5), 0.6, (0.6, 0.7, 1.0), (30, 20, 0), 1.1, "jpg"
    ),
    DemoSample("astronaut", "ellipse", (0.3, 0.7), 0.3, (1.4, 0.9, 0.5), (0, 0, 0), 1.0, "png"),
    DemoSample("coffee", "ellipse", (0.35, 0.35), 0.4, (1.0, 0.7, 1.3), (0, 0, 0), 1.0, "png"),
    DemoSample("chelsea", "horse", (0.5, 0.6), 0.5, (1.3, 1.3, 1.3), (0, 0, 0), 1.3, "jpg"),
]


def load_photo(name: str) -> np.ndarray:
    """(H, W, 3) uint8 photo from scikit-image's bundled data (no download)."""
    import skimage.data

    path = os.path.join(skimage.data.data_dir, f"{name}.png")
    if os.path.exists(path):
        return np.asarray(Image.open(path).convert("RGB"))
    return np.asarray(getattr(skimage.data, name)())[..., :3]


def place_mask(
    kind: str, height: int, width: int, centre: tuple[float, float], scale: float
) -> np.ndarray:
    """(H, W) bool foreground: the shape scaled to `scale` of the photo, centred at `centre`."""
    box_h, box_w = max(8, int(height * scale)), max(8, int(width * scale))
    if kind == "horse":
        import skimage.data

        silhouette = Image.fromarray((~skimage.data.horse()).astype(np.uint8) * 255)
        shape = np.asarray(silhouette.resize((box_w, box_h), Image.Resampling.NEAREST)) > 127
    else:
        yy, xx = np.mgrid[0:box_h, 0:box_w]
        shape = ((yy - box_h / 2) / (box_h / 2)) ** 2 + ((xx - box_w / 2) / (box_w / 2)) ** 2 <= 1
    mask = np.zeros((height, width), dtype=bool)
    top = int(np.clip(centre[1] * height - box_h / 2, 0, height - box_h))
    left = int(np.clip(centre[0] * width - box_w / 2, 0, width - box_w))
    mask[top : top + box_h, left : left + box_w] = shape
    return mask


def colour_shift(photo: np.ndarray, mask: np.ndarray, sample: DemoSample) -> np.ndarray:
    values = photo.astype(np.float64) / 255.0
    shifted = values**sample.gamma * np.array(sample.gain) + np.array(sample.offset) / 255.0
    composite = np.where(mask[..., None], np.clip(shifted, 0, 1), values)
    return (composite * 255.0 + 0.5).astype(np.uint8)


def _encode(pixels: np.ndarray, image_format: str) -> bytes:
    buffer = io.BytesIO()
    if image_format == "jpg":
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    else:
        Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def build_demo(root: str, storage_options: dict[str, Any] | None = None) -> str:
    """Write the demo dataset under `root`; returns the manifest's URI."""
    options = storage_options or {}
    rows: dict[str, list[str]] = {
        "sample_id": [], "composite_uri": [], "mask_uri": [], "real_uri": [],
        "subset": [], "photo": [],
    }  # fmt: skip
    photos: dict[str, np.ndarray] = {}
    for index, sample in enumerate(DEMO_SAMPLES):
        photo = photos.setdefault(sample.photo, load_photo(sample.photo))
        height, width = photo.shape[:2]
        mask = place_mask(sample.mask, height, width, sample.centre, sample.scale)
        composite = colour_shift(photo, mask, sample)
        sample_id = f"{sample.photo}_{index}"
        files = {
            "composite_uri": (f"composites/{sample_id}.{sample.composite_format}", composite,
                              sample.composite_format),
            "mask_uri": (f"masks/{sample_id}.png", mask.astype(np.uint8) * 255, "png"),
            "real_uri": (f"real/{sample.photo}.png", photo, "png"),
        }  # fmt: skip
        for column, (relative, pixels, image_format) in files.items():
            write_atomic(join(root, relative), _encode(pixels, image_format), options)
            rows[column].append(relative)
        rows["sample_id"].append(sample_id)
        rows["subset"].append("demo")
        rows["photo"].append(sample.photo)
    manifest_uri = join(root, "manifest.parquet")
    fs, path = filesystem(manifest_uri, options)
    fs.makedirs(os.path.dirname(path), exist_ok=True)
    with fs.open(path, "wb") as handle:
        pq.write_table(pa.table(rows), handle)
    return manifest_uri
