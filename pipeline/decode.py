"""Decoding rules: encoded image bytes in, pixel arrays out (pure functions, no I/O).

Enters: the bytes of a sample's composite, mask and, optionally, ground truth (`real`).
Leaves: composite (H, W, 3) uint8 RGB, mask (H, W) uint8 in {0, 1}, real (H, W, 3) uint8 or
None; or a `SampleError` naming what could not be read and why. `fetch.py` calls these for
the pipeline; `report.py` and `evaluate.py` use the same rules (and the same explicit pixel
limit) for thumbnails and scoring.

One rule for every image, composite, mask and real alike:
- Orientation: each file's own EXIF orientation is applied, exactly as PIL's
  `ImageOps.exif_transpose` (and every viewer) does; nothing is borrowed from another file.
  A mask must match the composite as it is displayed.
- Values: 8-bit as stored; 16-bit integers on 0-65535; 32-bit integers on 0-255 when no value
  exceeds 255, else on 0-65535; floats (mode F, e.g. TIFF) on 0-1 when every value lies in
  [0, 1], else on 0-255 when every value lies in [0, 255]. Anything else is refused.
- Colour: any mode becomes RGB; a composite's or real's alpha is dropped.
- Mask semantics: the alpha channel, when the file has one that is not constant (a cut-out);
  otherwise the brightest channel (the grey level of a grey mask; any colour on black is
  foreground). A mask whose values are all 0 or 1 is a label mask: 1 is foreground.
  Otherwise a pixel is foreground when its value is at least half the full scale.
  A mask that this rule reads as empty or as covering the whole image is refused.
- Size: a mask or real of another size than the composite is resized to it (mask nearest,
  real bilinear) when the aspect ratios agree within 1 %, and refused otherwise.
- Pixel limit: an image whose header claims more pixels than the caller's `max_pixels` is
  refused before any pixel is decoded. Nothing here changes PIL's own process-wide
  decompression-bomb check (`Image.MAX_IMAGE_PIXELS`), which still refuses, by itself, images
  over twice its limit (about 179 million pixels with PIL's default).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import ExifTags, Image, ImageOps

_NUMERIC_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


class SampleError(Exception):
    """A problem with one sample's input; becomes that row's `error`."""


def open_image(
    data: bytes, what: str, max_pixels: int, draft: tuple[int, int] | None = None
) -> Image.Image:
    """Decode `data` (orientation not yet applied), refusing images over the pixel limit from
    their header. `draft` (JPEG only) decodes at a reduced scale no smaller than that size."""
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise SampleError(f"{what} is over PIL's decompression-bomb limit ({exc})") from None
    except Exception as exc:
        raise SampleError(f"{what} is not a readable image ({exc})") from None
    width, height = image.size
    if width * height > max_pixels:
        raise SampleError(
            f"{what} has {width}x{height} = {width * height} pixels, over the limit of "
            f"{max_pixels} (RunConfig.max_pixels / --max-pixels)"
        )
    if draft is not None:
        image.draft("RGB", draft)
    try:
        image.load()
    except Exception as exc:
        raise SampleError(f"{what} could not be decoded ({exc})") from None
    return image


def decode_rgb(
    data: bytes, what: str, max_pixels: int, draft: tuple[int, int] | None = None
) -> np.ndarray:
    """One image's bytes -> (H, W, 3) uint8 RGB as displayed (the rules at the top)."""
    return to_rgb(upright(open_image(data, what, max_pixels, draft)), what)


def decode_mask(
    data: bytes, what: str, max_pixels: int, draft: tuple[int, int] | None = None
) -> np.ndarray:
    """One mask's bytes -> (H, W) uint8 in {0, 1} as displayed, by the mask rule."""
    return to_mask(upright(open_image(data, what, max_pixels, draft)))


def orientation(image: Image.Image) -> int:
    """The EXIF orientation tag (1 = as stored)."""
    return int(image.getexif().get(ExifTags.Base.Orientation, 1) or 1)


def upright(image: Image.Image) -> Image.Image:
    """`image` as displayed: its own EXIF orientation applied (in place, no copy)."""
    ImageOps.exif_transpose(image, in_place=True)
    return image


def numeric_values(image: Image.Image, what: str) -> tuple[np.ndarray, float]:
    """A 16/32-bit integer or float image's values and the full scale they are read on."""
    values = np.asarray(image)
    if image.mode.startswith("I;16"):
        return values, 65535.0
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if image.mode == "I":
        if low < 0 or high > 65535:
            raise SampleError(
                f"{what} is a 32-bit integer image with values {low:g} to {high:g}, outside "
                "0-255 and 0-65535"
            )
        return values, 255.0 if high <= 255 else 65535.0
    if not np.isfinite(values).all():
        raise SampleError(f"{what} is a float image with NaN or infinite values")
    if low >= 0 and high <= 1:
        return values, 1.0
    if low >= 0 and high <= 255:
        return values, 255.0
    raise SampleError(
        f"{what} is a float image with values {low:g} to {high:g}, outside 0-1 and 0-255"
    )


def to_rgb(image: Image.Image, what: str = "image") -> np.ndarray:
    """Any PIL mode -> (H, W, 3) uint8 RGB; alpha is dropped (harmonization is colour only)."""
    if image.mode in _NUMERIC_MODES:
        values, scale = numeric_values(image, what)
        grey = np.clip(values / scale * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if image.mode in ("P", "PA"):
        image = image.convert("RGBA")
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def mask_values(image: Image.Image) -> tuple[np.ndarray, float, str]:
    """The values a mask is read from, their full scale, and which channel they are."""
    if image.has_transparency_data:
        alpha = np.asarray(image.convert("RGBA").getchannel("A"))
        if alpha.size and alpha.min() != alpha.max():
            return alpha, 255.0, "alpha"
    if image.mode == "1":
        return np.asarray(image, dtype=np.uint8), 1.0, "1-bit value"
    if image.mode in _NUMERIC_MODES:
        values, scale = numeric_values(image, "mask")
        return values, scale, "value"
    if image.mode == "L":
        return np.asarray(image), 255.0, "grey level"
    return np.asarray(image.convert("RGB")).max(axis=2), 255.0, "brightest channel"


def to_mask(image: Image.Image) -> np.ndarray:
    """Any PIL mode -> (H, W) uint8 in {0, 1} by the mask rule (see the top of the file)."""
    values, scale, _ = mask_values(image)
    if ((values == 0) | (values == 1)).all():  # a 0/1 label mask
        return (values == 1).astype(np.uint8)
    return (values >= scale / 2).astype(np.uint8)


def _rule(image: Image.Image) -> str:
    """How the mask rule read `image`, for error messages."""
    values, scale, channel = mask_values(image)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    return (
        f"read from its {channel}, values {low:g} to {high:g} of {scale:g}; foreground is "
        "at least half of that, or 1 in a 0/1 mask"
    )


def _same_aspect(height: int, width: int, other_height: int, other_width: int) -> bool:
    return abs((other_width / other_height) / (width / height) - 1.0) <= 0.01


def fit(
    what: str,
    size: tuple[int, int],
    height: int,
    width: int,
    stored: tuple[int, int],
    tag: int,
    input_name: str = "composite",
) -> None:
    """Refuse a mask or real of `size` (w, h) whose aspect ratio is not the input's (the
    composite's, or the real's in inverse runs: `input_name`).

    `stored` is the input's size as stored and `tag` its EXIF orientation: when the other
    image matches the stored pixels instead of the displayed ones, the message says so.
    """
    if _same_aspect(height, width, size[1], size[0]):
        return
    hint = ""
    if tag != 1 and _same_aspect(stored[1], stored[0], size[1], size[0]):
        hint = (
            f"; it matches the {input_name} as stored, which its EXIF orientation {tag} turns "
            f"to {width}x{height}: save the {what} as the {input_name} is displayed"
        )
    raise SampleError(
        f"{what} is {size[0]}x{size[1]} but the {input_name} is {width}x{height} as displayed "
        f"(aspect ratios differ{hint})"
    )


def decode_sample(
    composite: bytes,
    mask: bytes,
    real: bytes | None,
    max_pixels: int,
    *,
    input_name: str = "composite",
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Bytes -> composite (H, W, 3), mask (H, W) in {0, 1}, real (H, W, 3) or None.

    `composite` is the model's input; `input_name` names it in errors ("real" in inverse
    runs, whose input is the real image)."""
    composite_image = open_image(composite, input_name, max_pixels)
    stored, tag = composite_image.size, orientation(composite_image)
    composite_rgb = to_rgb(upright(composite_image), input_name)
    height, width = composite_rgb.shape[:2]

    mask_image = upright(open_image(mask, "mask", max_pixels))
    fit("mask", mask_image.size, height, width, stored, tag, input_name)
    mask_binary = to_mask(mask_image)
    if mask_binary.shape != (height, width):
        resized = Image.fromarray(mask_binary).resize((width, height), Image.Resampling.NEAREST)
        mask_binary = np.asarray(resized)
    foreground = int(mask_binary.sum())
    if foreground == 0:
        raise SampleError(f"mask is empty: no foreground to harmonize ({_rule(mask_image)})")
    if foreground == mask_binary.size:
        raise SampleError(
            f"mask covers the whole image: no background to harmonize against ({_rule(mask_image)})"
        )

    real_rgb = None
    if real is not None:
        real_image = upright(open_image(real, "real", max_pixels))
        fit("real", real_image.size, height, width, stored, tag, input_name)
        real_rgb = to_rgb(real_image, "real")
        if real_rgb.shape[:2] != (height, width):
            resized = Image.fromarray(real_rgb).resize((width, height), Image.Resampling.BILINEAR)
            real_rgb = np.asarray(resized)
    return composite_rgb, mask_binary, real_rgb
