"""The decoding rules of `pipeline/decode.py`, checked against PIL's own reading of each file.

Mask semantics (alpha, 0/1 label masks, colour masks), one EXIF rule for composite, mask and
real (as `ImageOps.exif_transpose`), value scales of float and integer images.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageOps

from pipeline.decode import SampleError, decode_sample

LIMIT = 10_000_000
S = 48  # square side


def encode(image: Image.Image, fmt: str = "PNG", **kwargs: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def corner_mask(height: int, width: int) -> np.ndarray:
    """A box in the top-left quarter, off every symmetry axis: any wrong turn or flip shows."""
    mask = np.zeros((height, width), bool)
    mask[2 : height // 3, 3 : width // 2] = True
    return mask


def with_orientation(image: Image.Image, tag: int, fmt: str = "PNG") -> bytes:
    exif = Image.Exif()
    exif[0x0112] = tag
    return encode(image, fmt, exif=exif.tobytes())


def pil_upright(data: bytes) -> Image.Image:
    """What PIL itself displays for a file."""
    return ImageOps.exif_transpose(Image.open(io.BytesIO(data)))


def decode(composite: bytes, mask: bytes, real: bytes | None = None) -> Any:
    return decode_sample(composite, mask, real, LIMIT)


COMPOSITE = encode(Image.fromarray(photo(S, S + 12)))
MASK = corner_mask(S, S + 12)


# --- mask semantics -------------------------------------------------------------------------


def test_rgba_cutout_mask_is_read_from_its_alpha() -> None:
    """A cut-out: colour channels are the object's photo, alpha is the mask."""
    cutout = np.dstack([photo(S, S + 12, seed=1), MASK.astype(np.uint8) * 255])
    data = encode(Image.fromarray(cutout, "RGBA"))
    _, mask, _ = decode(COMPOSITE, data)
    np.testing.assert_array_equal(
        mask, np.asarray(Image.open(io.BytesIO(data)).getchannel("A")) >= 128
    )
    np.testing.assert_array_equal(mask, MASK)


def test_la_mask_with_white_colour_is_read_from_its_alpha() -> None:
    la = np.dstack([np.full((S, S + 12), 255, np.uint8), MASK.astype(np.uint8) * 255])
    _, mask, _ = decode(COMPOSITE, encode(Image.fromarray(la, "LA")))
    np.testing.assert_array_equal(mask, MASK)


def test_palette_mask_with_a_transparent_entry_is_read_from_its_alpha() -> None:
    image = Image.fromarray(np.where(MASK, 1, 0).astype(np.uint8), "L").convert("P")
    image.putpalette([255, 255, 255, 255, 255, 255])  # both entries white: only alpha tells
    _, mask, _ = decode(COMPOSITE, encode(image, transparency=0))
    np.testing.assert_array_equal(mask, MASK)


def test_opaque_rgba_mask_is_read_from_its_colour() -> None:
    """Alpha that is the same everywhere says nothing: the white-on-black colour is the mask."""
    grey = MASK.astype(np.uint8) * 255
    rgba = np.dstack([grey, grey, grey, np.full_like(grey, 255)])
    _, mask, _ = decode(COMPOSITE, encode(Image.fromarray(rgba, "RGBA")))
    np.testing.assert_array_equal(mask, MASK)


@pytest.mark.parametrize("mode", ["L", "1", "I;16"])
def test_zero_one_label_mask(mode: str) -> None:
    values = MASK.astype(np.uint16 if mode == "I;16" else np.uint8)
    image = Image.fromarray(values.astype(bool)) if mode == "1" else Image.fromarray(values)
    assert image.mode == mode
    _, mask, _ = decode(COMPOSITE, encode(image))
    np.testing.assert_array_equal(mask, MASK)


@pytest.mark.parametrize("colour", [(255, 0, 0), (0, 160, 0), (20, 40, 200)])
def test_colour_on_black_mask(colour: tuple[int, int, int]) -> None:
    """The brightest channel: any colour at least half-bright on black is foreground."""
    rgb = np.zeros((S, S + 12, 3), np.uint8)
    rgb[MASK] = colour
    _, mask, _ = decode(COMPOSITE, encode(Image.fromarray(rgb)))
    np.testing.assert_array_equal(mask, MASK)


def test_grey_mask_is_binarized_at_half() -> None:
    grey = np.where(MASK, 128, 127).astype(np.uint8)
    _, mask, _ = decode(COMPOSITE, encode(Image.fromarray(grey)))
    np.testing.assert_array_equal(mask, MASK)


@pytest.mark.parametrize(
    ("mask", "message"),
    [
        (np.full((S, S + 12), 100, np.uint8), "mask is empty: no foreground to harmonize (read "
         "from its grey level, values 100 to 100 of 255"),
        (np.full((S, S + 12, 3), (0, 0, 90), np.uint8), "read from its brightest channel, "
         "values 90 to 90 of 255"),
        (np.full((S, S + 12), 1, np.uint8), "mask covers the whole image"),
    ],
)  # fmt: skip
def test_a_mask_the_rule_cannot_read_says_how_it_read_it(mask: np.ndarray, message: str) -> None:
    with pytest.raises(SampleError, match=message.replace("(", r"\(")):
        decode(COMPOSITE, encode(Image.fromarray(mask)))


# --- one EXIF rule for composite, mask and real ---------------------------------------------


@pytest.mark.parametrize("tag", range(1, 9))
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_square_composite_with_exif_and_a_mask_drawn_on_the_displayed_image(
    tag: int, fmt: str
) -> None:
    stored = Image.fromarray(photo(S, S, seed=tag))
    composite = with_orientation(stored, tag, fmt)
    displayed = pil_upright(composite)
    assert displayed.size == (S, S)
    drawn = corner_mask(S, S)  # drawn on what a viewer shows: no EXIF of its own
    real = with_orientation(stored, tag)  # the ground truth stored like the composite

    rgb, mask, real_rgb = decode(composite, encode(Image.fromarray(drawn)), real)
    np.testing.assert_array_equal(rgb, np.asarray(displayed.convert("RGB")))
    np.testing.assert_array_equal(mask, drawn)  # not turned by the composite's tag
    np.testing.assert_array_equal(real_rgb, np.asarray(pil_upright(real).convert("RGB")))


@pytest.mark.parametrize("tag", [3, 6, 8])
def test_a_mask_with_its_own_exif_is_turned_by_its_own_tag(tag: int) -> None:
    stored_mask = Image.fromarray(corner_mask(S, S + 12).astype(np.uint8) * 255)
    data = with_orientation(stored_mask, tag)
    _, mask, _ = decode(with_orientation(Image.fromarray(photo(S, S + 12)), tag), data)
    np.testing.assert_array_equal(mask, np.asarray(pil_upright(data)) >= 128)


def test_mask_matching_the_stored_pixels_of_a_turned_composite_is_refused() -> None:
    composite = with_orientation(Image.fromarray(photo(S, S + 12)), 6)  # shown 48 wide, 60 high
    stored_aligned = encode(Image.fromarray(corner_mask(S, S + 12)))
    with pytest.raises(SampleError) as error:
        decode(composite, stored_aligned)
    assert str(error.value) == (
        "mask is 60x48 but the composite is 48x60 as displayed (aspect ratios differ; it "
        "matches the composite as stored, which its EXIF orientation 6 turns to 48x60: save "
        "the mask as the composite is displayed)"
    )


def test_real_of_another_aspect_is_refused() -> None:
    with pytest.raises(SampleError, match="real is 48x48 but the composite is 60x48"):
        decode(COMPOSITE, encode(Image.fromarray(MASK)), encode(Image.fromarray(photo(S, S))))


# --- value scales ---------------------------------------------------------------------------


def test_float_tiff_composite_on_the_0_255_scale() -> None:
    values = photo(S, S + 12)[..., 0].astype(np.float32)
    data = encode(Image.fromarray(values), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "F"
    rgb, _, _ = decode(data, encode(Image.fromarray(MASK)))
    np.testing.assert_array_equal(rgb, np.repeat(values.astype(np.uint8)[..., None], 3, 2))


def test_float_tiff_composite_on_the_0_1_scale() -> None:
    values = photo(S, S + 12)[..., 0].astype(np.float32)
    rgb, _, _ = decode(encode(Image.fromarray(values / 255), "TIFF"), encode(Image.fromarray(MASK)))
    assert np.abs(rgb[..., 0].astype(int) - values).max() <= 1


def test_float_image_outside_both_scales_is_refused() -> None:
    values = np.linspace(-5, 300, S * (S + 12), dtype=np.float32).reshape(S, S + 12)
    with pytest.raises(SampleError, match="composite is a float image with values -5 to 300"):
        decode(encode(Image.fromarray(values), "TIFF"), encode(Image.fromarray(MASK)))


def test_float_mask_on_the_0_1_scale() -> None:
    soft = np.where(MASK, 0.75, 0.1).astype(np.float32)
    _, mask, _ = decode(COMPOSITE, encode(Image.fromarray(soft), "TIFF"))
    np.testing.assert_array_equal(mask, MASK)
