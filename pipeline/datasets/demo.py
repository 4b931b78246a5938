"""A small demo dataset made the way iHarmony4 was made, from the photos scikit-image ships.

Enters: a local folder (or any fsspec URI) to write to.
Leaves: `{root}/composites/*.jpg|png`, `{root}/masks/*.png`, `{root}/real/*.png` and
`{root}/manifest.parquet` with relative URIs and passthrough columns `subset`, `photo`.

iHarmony4's composites (HCOCO and the others) keep a real photo as the ground truth, take a
real object's mask, and transfer to that object the colour statistics of an object in another
photo. Here:
- the object masks are cut from the photos by GrabCut (OpenCV) from a box around the object
  (a face, a space suit, a helmet, a cat, a cup, a saucer, a rocket, a motorcycle): object
  shapes that follow the photo's edges, not geometric shapes;
- the foreground's CIE Lab mean and standard deviation are moved toward those of another
  photo's object (Reinhard et al.'s transfer, the one iHarmony4 used among others), part of
  the way: the strength is set per sample so that the composite's MSE to the real photo (the
  official 256 px convention) hits a target between 45 and 230, the range of iHarmony4's
  composites (its test set's composites average 172).
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline.imaging import eval_resize
from pipeline.storage import filesystem, join, write_atomic

# Boxes around objects in scikit-image's photos, (x0, y0, x1, y1) as fractions of the photo.
OBJECTS: dict[tuple[str, str], tuple[float, float, float, float]] = {
    ("astronaut", "face"): (0.28, 0.02, 0.60, 0.33),
    ("astronaut", "suit"): (0.00, 0.28, 0.72, 1.00),
    ("astronaut", "helmet"): (0.53, 0.55, 1.00, 1.00),
    ("chelsea", "cat"): (0.00, 0.00, 0.95, 1.00),
    ("coffee", "cup"): (0.28, 0.03, 0.72, 0.55),
    ("coffee", "saucer"): (0.12, 0.15, 0.82, 0.98),
    ("rocket", "rocket"): (0.43, 0.28, 0.58, 0.97),
    ("motorcycle_left", "motorcycle"): (0.10, 0.22, 0.96, 0.95),
}


@dataclass(frozen=True)
class DemoSample:
    photo: str
    target: str  # the object whose colours change (a key of OBJECTS with `photo`)
    reference: tuple[str, str]  # the other photo's object whose statistics it takes
    composite_mse: float  # the strength is set to reach this MSE to the real (256 px)
    composite_format: str


DEMO_SAMPLES = [
    DemoSample("astronaut", "face", ("chelsea", "cat"), 60, "jpg"),
    DemoSample("chelsea", "cat", ("motorcycle_left", "motorcycle"), 230, "png"),
    DemoSample("coffee", "cup", ("astronaut", "suit"), 80, "jpg"),
    DemoSample("rocket", "rocket", ("coffee", "cup"), 45, "png"),
    DemoSample("motorcycle_left", "motorcycle", ("astronaut", "face"), 180, "jpg"),
    DemoSample("astronaut", "suit", ("coffee", "saucer"), 150, "png"),
    DemoSample("coffee", "saucer", ("chelsea", "cat"), 120, "png"),
    DemoSample("astronaut", "helmet", ("rocket", "rocket"), 45, "jpg"),
]


def load_photo(name: str) -> np.ndarray:
    """(H, W, 3) uint8 photo from scikit-image's bundled data (no download)."""
    import skimage.data

    path = os.path.join(skimage.data.data_dir, f"{name}.png")
    if os.path.exists(path):
        return np.asarray(Image.open(path).convert("RGB"))
    return np.asarray(getattr(skimage.data, name)())[..., :3]


def object_mask(photo: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    """(H, W) bool: the object inside `box` (fractions), by 5 GrabCut iterations initialised
    with the box; the largest connected part, holes filled."""
    import cv2
    from scipy import ndimage

    height, width = photo.shape[:2]
    x0, y0, x1, y1 = box
    rect = (int(x0 * width), int(y0 * height),
            int((x1 - x0) * width) - 1, int((y1 - y0) * height) - 1)  # fmt: skip
    labels = np.zeros((height, width), np.uint8)
    models = (np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64))
    bgr = np.ascontiguousarray(photo[..., ::-1])
    # GrabCut seeds its colour models by k-means from OpenCV's global random generator: reset
    # it, so a mask does not depend on what else this process cut before.
    cv2.setRNGSeed(0)
    cv2.grabCut(bgr, labels, rect, *models, 5, cv2.GC_INIT_WITH_RECT)
    mask = (labels == cv2.GC_FGD) | (labels == cv2.GC_PR_FGD)
    parts, count = ndimage.label(mask)
    if count > 1:
        sizes = ndimage.sum(mask, parts, range(1, count + 1))
        mask = parts == 1 + int(np.argmax(sizes))
    return ndimage.binary_fill_holes(mask)


def lab_statistics(pixels: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of the CIE Lab values under `mask` ((3,), (3,))."""
    from skimage.color import rgb2lab

    lab = rgb2lab(pixels)[mask]
    return lab.mean(axis=0), lab.std(axis=0)


def transfer_colour(
    photo: np.ndarray,
    mask: np.ndarray,
    reference: tuple[np.ndarray, np.ndarray],
    strength: float,
) -> np.ndarray:
    """The photo with its masked region's Lab mean/std moved `strength` of the way (0 none,
    1 all) to the `reference` statistics; uint8, the rest of the photo untouched."""
    from skimage.color import lab2rgb, rgb2lab

    lab = rgb2lab(photo)
    mean, std = lab[mask].mean(axis=0), lab[mask].std(axis=0)
    ref_mean, ref_std = reference
    target_mean = mean + strength * (ref_mean - mean)
    target_std = std + strength * (ref_std - std)
    moved = (lab[mask] - mean) / np.maximum(std, 1e-6) * target_std + target_mean
    out = lab.copy()
    out[mask] = moved
    with warnings.catch_warnings():  # out-of-gamut colours are clipped, as intended
        warnings.simplefilter("ignore", UserWarning)
        rgb = (np.clip(lab2rgb(out), 0, 1) * 255.0).round().astype(np.uint8)
    return np.where(mask[..., None], rgb, photo)


def composite_mse(composite: np.ndarray, real: np.ndarray) -> float:
    """MSE at the official 256 px convention (PIL bilinear, uint8 values)."""
    a, b = eval_resize(composite).astype(np.float64), eval_resize(real).astype(np.float64)
    return float(((a - b) ** 2).mean())


def make_composite(
    photo: np.ndarray,
    mask: np.ndarray,
    reference: tuple[np.ndarray, np.ndarray],
    target_mse: float,
) -> tuple[np.ndarray, float]:
    """The transfer whose strength gives `target_mse` (bisection; full strength if even that
    stays below it, as for small objects). Returns the composite and the strength used."""
    low, high = 0.0, 1.0
    if composite_mse(transfer_colour(photo, mask, reference, 1.0), photo) <= target_mse:
        return transfer_colour(photo, mask, reference, 1.0), 1.0
    for _ in range(20):
        middle = (low + high) / 2
        if composite_mse(transfer_colour(photo, mask, reference, middle), photo) < target_mse:
            low = middle
        else:
            high = middle
    return transfer_colour(photo, mask, reference, high), high


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
    masks: dict[tuple[str, str], np.ndarray] = {}

    def mask_of(key: tuple[str, str]) -> np.ndarray:
        if key not in masks:
            photo = photos.setdefault(key[0], load_photo(key[0]))
            masks[key] = object_mask(photo, OBJECTS[key])
        return masks[key]

    for index, sample in enumerate(DEMO_SAMPLES):
        photo = photos.setdefault(sample.photo, load_photo(sample.photo))
        mask = mask_of((sample.photo, sample.target))
        reference_mask = mask_of(sample.reference)
        reference = lab_statistics(photos[sample.reference[0]], reference_mask)
        composite, _ = make_composite(photo, mask, reference, sample.composite_mse)
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
