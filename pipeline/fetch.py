"""Fetch and decode: manifest rows in, decoded pixels out (Ray CPU tasks).

Enters: a pyarrow batch of manifest rows (`sample_id`, `composite_uri`, `mask_uri`,
`real_uri`?, passthrough columns).
Leaves: the same rows with URIs made absolute and these columns added:
  `composite_pixels` (raw RGB uint8, H*W*3 bytes), `mask_pixels` (raw uint8 {0, 1}, H*W),
  `real_pixels` (raw RGB or null), `width`, `height`, `status`, `error`, `fetch_s`, `decode_s`.
A row that cannot be fetched or decoded gets `status = "error"`, empty pixels and an error
message naming the sample, the stage and the cause; the other rows go on.

Decoding rules: EXIF orientation is applied (a mask without its own takes the composite's);
any PIL mode becomes RGB (16-bit images are scaled to 8 bits, transparency is dropped);
masks become one channel and are binarized at 0.5. A mask of another size than its composite
is resized to it (nearest) when the aspect ratios agree within 1 %, otherwise the sample is an
error. Empty and full masks are errors (nothing to harmonize, or nothing to match). The real
image, when given, is resized to the composite's size if it differs.
"""

from __future__ import annotations

import io
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import ExifTags, Image

from pipeline.config import RunConfig
from pipeline.storage import read_bytes, resolve

# PIL's own bomb check would raise for large images before ours can name the limit.
Image.MAX_IMAGE_PIXELS = None

PIXEL_COLUMNS = ("composite_pixels", "mask_pixels", "real_pixels")


class SampleError(Exception):
    """A problem with one sample's input; becomes that row's `error`."""


def _open(data: bytes, what: str, max_pixels: int) -> Image.Image:
    """Decode `data` (EXIF orientation not yet applied), refusing images over the pixel limit."""
    try:
        image = Image.open(io.BytesIO(data))
    except Exception as exc:
        raise SampleError(f"{what} is not a readable image ({exc})") from None
    width, height = image.size
    if width * height > max_pixels:
        raise SampleError(
            f"{what} has {width}x{height} = {width * height} pixels, over the limit of "
            f"{max_pixels} (RunConfig.max_pixels / --max-pixels)"
        )
    try:
        image.load()
    except Exception as exc:
        raise SampleError(f"{what} could not be decoded ({exc})") from None
    return image


def orientation(image: Image.Image) -> int:
    """The EXIF orientation tag (1 = as stored)."""
    return int(image.getexif().get(ExifTags.Base.Orientation, 1) or 1)


def orient(image: Image.Image, tag: int) -> Image.Image:
    """Apply EXIF orientation `tag` to `image` (as ImageOps.exif_transpose does)."""
    method = _ORIENTATION_TRANSPOSE.get(tag)
    return image.transpose(method) if method is not None else image


_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _to_8bit(image: Image.Image) -> Image.Image:
    """16- and 32-bit integer images scaled to 8 bits (PIL's convert would clip them)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
        return Image.fromarray(np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        return Image.fromarray(np.clip(values * 255.0 + 0.5, 0, 255).astype(np.uint8))
    return image


def to_rgb(image: Image.Image) -> np.ndarray:
    """Any PIL mode -> (H, W, 3) uint8 RGB; alpha is dropped (harmonization is colour only)."""
    image = _to_8bit(image)
    if image.mode in ("P", "PA"):
        image = image.convert("RGBA")
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def to_mask(image: Image.Image) -> np.ndarray:
    """Any PIL mode -> (H, W) uint8 in {0, 1}: grey level >= 0.5 is foreground."""
    image = _to_8bit(image)
    if image.mode in ("P", "PA", "RGBA", "LA"):
        image = image.convert("RGBA").convert("L")
    grey = np.asarray(image.convert("L"), dtype=np.uint8)
    return (grey >= 128).astype(np.uint8)


def fit_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    if mask.shape == (height, width):
        return mask
    mask_ratio = mask.shape[1] / mask.shape[0]
    if abs(mask_ratio / (width / height) - 1.0) > 0.01:
        raise SampleError(
            f"mask is {mask.shape[1]}x{mask.shape[0]} but the composite is {width}x{height} "
            "(aspect ratios differ)"
        )
    resized = Image.fromarray(mask * 255).resize((width, height), Image.Resampling.NEAREST)
    return (np.asarray(resized) >= 128).astype(np.uint8)


def decode_sample(
    composite: bytes, mask: bytes, real: bytes | None, max_pixels: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Bytes -> composite (H, W, 3), mask (H, W) in {0, 1}, real (H, W, 3) or None.

    EXIF orientation: each image's own tag is applied. A mask without one, stored at the
    composite's stored size, gets the composite's orientation (it was drawn on the same pixels).
    """
    composite_image = _open(composite, "composite", max_pixels)
    composite_tag = orientation(composite_image)
    composite_rgb = to_rgb(orient(composite_image, composite_tag))
    height, width = composite_rgb.shape[:2]

    mask_image = _open(mask, "mask", max_pixels)
    mask_tag = orientation(mask_image)
    if mask_tag == 1 and mask_image.size == composite_image.size:
        mask_tag = composite_tag
    mask_binary = fit_mask(to_mask(orient(mask_image, mask_tag)), height, width)
    foreground = int(mask_binary.sum())
    if foreground == 0:
        raise SampleError("mask is empty: no foreground to harmonize")
    if foreground == mask_binary.size:
        raise SampleError("mask covers the whole image: no background to harmonize against")

    real_rgb = None
    if real is not None:
        real_image = _open(real, "real", max_pixels)
        real_rgb = to_rgb(orient(real_image, orientation(real_image)))
        if real_rgb.shape[:2] != (height, width):
            resized = Image.fromarray(real_rgb).resize((width, height), Image.Resampling.BILINEAR)
            real_rgb = np.asarray(resized)
    return composite_rgb, mask_binary, real_rgb


def _fetch(uri: str | None, what: str, storage_options: dict[str, Any]) -> bytes | None:
    if uri is None:
        return None
    try:
        return read_bytes(uri, storage_options)
    except FileNotFoundError:
        raise SampleError(f"{what} not found: {uri}") from None
    except Exception as exc:
        raise SampleError(f"{what} could not be read from {uri} ({type(exc).__name__})") from None


def fetch_and_decode(batch: pa.Table, config: RunConfig, base_dir: str) -> pa.Table:
    """Ray `map_batches` function (batch_format="pyarrow")."""
    rows = batch.num_rows
    ids = batch.column("sample_id").to_pylist()
    uris: dict[str, list[str | None]] = {}
    for name in ("composite_uri", "mask_uri", "real_uri"):
        values = batch.column(name).to_pylist() if name in batch.column_names else [None] * rows
        uris[name] = [resolve(base_dir, v) if v else None for v in values]

    def fetch_row(i: int) -> tuple[Any, float]:
        start = time.perf_counter()
        try:
            fetched = tuple(
                _fetch(uris[name][i], name.removesuffix("_uri"), config.storage_options)
                for name in ("composite_uri", "mask_uri", "real_uri")
            )
        except SampleError as exc:
            fetched = exc
        return fetched, time.perf_counter() - start

    # Object-store latency dominates: fetch the batch's objects concurrently.
    with ThreadPoolExecutor(max_workers=min(16, max(rows, 1))) as pool:
        fetched_rows = list(pool.map(fetch_row, range(rows)))

    out: dict[str, list[Any]] = {
        "composite_pixels": [], "mask_pixels": [], "real_pixels": [], "width": [],
        "height": [], "status": [], "error": [], "fetch_s": [], "decode_s": [],
    }  # fmt: skip
    for i, (fetched, fetch_s) in enumerate(fetched_rows):
        start = time.perf_counter()
        try:
            if isinstance(fetched, SampleError):
                raise fetched
            composite_rgb, mask_binary, real_rgb = decode_sample(*fetched, config.max_pixels)
            out["composite_pixels"].append(composite_rgb.tobytes())
            out["mask_pixels"].append(mask_binary.tobytes())
            out["real_pixels"].append(None if real_rgb is None else real_rgb.tobytes())
            out["width"].append(composite_rgb.shape[1])
            out["height"].append(composite_rgb.shape[0])
            out["status"].append("ok")
            out["error"].append(None)
        except Exception as exc:  # one bad sample never stops the batch
            cause = str(exc) if isinstance(exc, SampleError) else f"{type(exc).__name__}: {exc}"
            out["composite_pixels"].append(b"")
            out["mask_pixels"].append(b"")
            out["real_pixels"].append(None)
            out["width"].append(None)
            out["height"].append(None)
            out["status"].append("error")
            out["error"].append(f"sample {ids[i]!r}: fetch/decode: {cause}")
        out["fetch_s"].append(fetch_s)
        out["decode_s"].append(time.perf_counter() - start)

    for name in ("composite_uri", "mask_uri", "real_uri"):
        column = pa.array(uris[name], pa.string())
        if name in batch.column_names:
            batch = batch.set_column(batch.column_names.index(name), name, column)
        else:
            batch = batch.append_column(name, column)
    types = {"composite_pixels": pa.large_binary(), "mask_pixels": pa.large_binary(),
             "real_pixels": pa.large_binary(), "width": pa.int32(), "height": pa.int32(),
             "status": pa.string(), "error": pa.string(), "fetch_s": pa.float64(),
             "decode_s": pa.float64()}  # fmt: skip
    for name, values in out.items():
        batch = batch.append_column(name, pa.array(values, types[name]))
    return batch
