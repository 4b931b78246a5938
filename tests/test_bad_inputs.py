"""The bad-input matrix: each case is one sample of one pipeline run, checked on its own row.

Every bad sample must become a results row with status error and a message naming the sample
and the cause, while every good sample of the same run is written.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageOps

from pipeline.config import ModelConfig, RunConfig
from pipeline.results import read_results
from pipeline.run import run

H, W = 60, 90
MAX_PIXELS = 200_000


def photo(height: int = H, width: int = W, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    gradient = np.linspace(40, 200, width)[None, :, None] * np.ones((height, 1, 3))
    return np.clip(gradient + rng.normal(0, 10, (height, width, 3)), 0, 255).astype(np.uint8)


def box_mask(height: int = H, width: int = W) -> np.ndarray:
    mask = np.zeros((height, width), np.uint8)
    mask[height // 4 : 3 * height // 4, width // 4 : width // 2] = 255
    return mask


def encode(image: Image.Image, fmt: str = "PNG", **kwargs: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def rgb_png(pixels: np.ndarray) -> bytes:
    return encode(Image.fromarray(pixels))


def mask_png(mask: np.ndarray) -> bytes:
    return encode(Image.fromarray(mask))


def exif_rotated_jpeg() -> bytes:
    """Stored 90x60 (landscape) with orientation 6: displayed 60x90 (portrait)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(Image.fromarray(photo()), "JPEG", quality=95, exif=exif.tobytes())


def square_exif_jpeg() -> bytes:
    """Square, orientation 6: only the tag says how it is displayed."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(Image.fromarray(photo(H, H)), "JPEG", quality=95, exif=exif.tobytes())


def corner_mask(height: int = H, width: int = W) -> np.ndarray:
    """Off every symmetry axis, so that a turned or flipped mask shows."""
    mask = np.zeros((height, width), np.uint8)
    mask[3 : height // 3, 5 : width // 2] = 255
    return mask


def rgba_cutout() -> bytes:
    """A cut-out: the object's colours, and the mask in alpha."""
    return encode(Image.fromarray(np.dstack([photo(seed=1), corner_mask()]), "RGBA"))


def red_mask() -> bytes:
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[..., 0] = corner_mask()
    return encode(Image.fromarray(rgb))


def float_tiff() -> bytes:
    """Mode F on the 0-255 scale."""
    return encode(Image.fromarray(photo()[..., 0].astype(np.float32)), "TIFF")


def palette_png_with_transparency() -> bytes:
    image = Image.fromarray(photo()).convert("P", palette=Image.Palette.ADAPTIVE)
    return encode(image, transparency=0)


def sixteen_bit_png() -> bytes:
    values = (np.linspace(0, 65535, W)[None, :] * np.ones((H, 1))).astype(np.uint16)
    return encode(Image.fromarray(values))  # mode I;16


# name -> (sample_id, composite bytes, mask bytes, expected: "ok" or an error substring)
CASES: dict[str, tuple[str, Callable[[], bytes] | None, Callable[[], bytes], str]] = {
    "good": ("good", lambda: rgb_png(photo()), lambda: mask_png(box_mask()), "ok"),
    "corrupt bytes": ("corrupt", lambda: b"\xff\xd8\xff\xe0 broken jpeg", lambda: mask_png(box_mask()), "not a readable image"),
    "missing object": ("missing", None, lambda: mask_png(box_mask()), "composite not found"),
    "mask other size, same aspect": ("mask-half", lambda: rgb_png(photo()), lambda: mask_png(box_mask(H // 2, W // 2)), "ok"),
    "mask other aspect": ("mask-aspect", lambda: rgb_png(photo()), lambda: mask_png(box_mask(H, H)), "aspect ratios differ"),
    "empty mask": ("empty-mask", lambda: rgb_png(photo()), lambda: mask_png(np.zeros((H, W), np.uint8)), "mask is empty"),
    "full mask": ("full-mask", lambda: rgb_png(photo()), lambda: mask_png(np.full((H, W), 255, np.uint8)), "covers the whole image"),
    "soft mask": ("soft-mask", lambda: rgb_png(photo()), lambda: mask_png((box_mask() * 0.6).astype(np.uint8) + 20), "ok"),
    "16-bit png": ("png16", sixteen_bit_png, lambda: mask_png(box_mask()), "ok"),
    "cmyk jpeg": ("cmyk", lambda: encode(Image.fromarray(photo()).convert("CMYK"), "JPEG"), lambda: mask_png(box_mask()), "ok"),
    "palette png with transparency": ("palette", palette_png_with_transparency, lambda: mask_png(box_mask()), "ok"),
    "exif-rotated jpeg": ("exif", exif_rotated_jpeg, lambda: mask_png(np.rot90(box_mask(), k=-1)), "ok"),
    "exif mask on the stored pixels": ("exif-stored", exif_rotated_jpeg, lambda: mask_png(box_mask()), "matches the composite as stored"),
    "square exif jpeg": ("exif-square", square_exif_jpeg, lambda: mask_png(corner_mask(H, H)), "ok"),
    "rgba cut-out mask": ("rgba-mask", lambda: rgb_png(photo()), rgba_cutout, "ok"),
    "0/1 mask": ("zero-one-mask", lambda: rgb_png(photo()), lambda: mask_png(corner_mask() // 255), "ok"),
    "red mask": ("red-mask", lambda: rgb_png(photo()), red_mask, "ok"),
    "float tiff composite": ("float-tiff", float_tiff, lambda: mask_png(corner_mask()), "ok"),
    "greyscale": ("grey", lambda: encode(Image.fromarray(photo()[..., 0])), lambda: mask_png(box_mask()), "ok"),
    "1x1 image": ("tiny", lambda: rgb_png(photo(1, 1)), lambda: mask_png(np.full((1, 1), 255, np.uint8)), "covers the whole image"),
    "over the pixel limit": ("huge", lambda: rgb_png(photo(500, 500)), lambda: mask_png(box_mask(500, 500)), "over the limit of 200000"),
    "unsafe sample_id": ("../../etc/pass wd/été", lambda: rgb_png(photo()), lambda: mask_png(box_mask()), "ok"),
}  # fmt: skip


@pytest.fixture(scope="module")
def matrix_run(ray_cluster: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("bad")
    rows: dict[str, list[str]] = {"sample_id": [], "composite_uri": [], "mask_uri": []}
    for index, (sample_id, composite, mask, _) in enumerate(CASES.values()):
        if composite is not None:
            (root / f"c{index}.img").write_bytes(composite())
        (root / f"m{index}.img").write_bytes(mask())
        rows["sample_id"].append(sample_id)
        rows["composite_uri"].append(f"c{index}.img")
        rows["mask_uri"].append(f"m{index}.img")
    pq.write_table(pa.table(rows), root / "manifest.parquet")
    config = RunConfig(
        str(root / "manifest.parquet"), str(root / "out"), model=ModelConfig(resolution=64),
        max_pixels=MAX_PIXELS, batch_size=4, show_progress=False,
    )  # fmt: skip
    summary = run(config)
    results = read_results(str(root / "out" / "results"), {})
    assert results is not None
    return {
        "root": root,
        "summary": summary,
        "rows": {r["sample_id"]: r for r in results.to_pylist()},
        "count": results.num_rows,
    }


def output_image(result: dict[str, Any]) -> np.ndarray:
    return np.asarray(Image.open(result["output_uri"]))


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_case(matrix_run: dict[str, Any], case: str) -> None:
    sample_id, _, _, expected = CASES[case]
    result = matrix_run["rows"][sample_id]
    if expected == "ok":
        assert result["status"] == "ok", result["error"]
        assert result["error"] is None
        image = output_image(result)
        assert image.ndim == 3 and image.shape[2] == 3
        out_dir = (matrix_run["root"] / "out" / "images").resolve()
        assert Path(result["output_uri"]).resolve().parent == out_dir
    else:
        assert result["status"] == "error" and result["output_uri"] is None
        assert repr(sample_id) in result["error"], "the message names the sample"
        assert expected in result["error"]


def test_one_row_per_sample_and_good_samples_all_written(matrix_run: dict[str, Any]) -> None:
    assert matrix_run["count"] == len(CASES)
    good = [c for c in CASES.values() if c[3] == "ok"]
    assert matrix_run["summary"].ok == len(good)


def test_soft_mask_is_binarized_at_half(matrix_run: dict[str, Any]) -> None:
    result = matrix_run["rows"]["soft-mask"]
    composite = photo()
    out = output_image(result)
    inside = box_mask() > 0  # soft value 0.6*255+20 = 173 >= 128: foreground; 20 < 128: not
    np.testing.assert_array_equal(out[~inside], composite[~inside])
    assert np.abs(out[inside].astype(int) - composite[inside]).mean() > 0.5


def test_sixteen_bit_png_is_scaled_not_clipped(matrix_run: dict[str, Any]) -> None:
    out = output_image(matrix_run["rows"]["png16"])
    background = out[0]  # first row: outside the mask, so the decoded composite itself
    expected = np.round(np.linspace(0, 65535, W) / 65535 * 255).astype(int)
    assert np.abs(background[:, 0].astype(int) - expected).max() <= 1


def test_exif_orientation_applied_to_composite_and_mask(matrix_run: dict[str, Any]) -> None:
    result = matrix_run["rows"]["exif"]
    assert (result["width"], result["height"]) == (H, W)  # displayed portrait
    stored = np.asarray(Image.open(io.BytesIO(exif_rotated_jpeg())))  # raw, landscape
    displayed = np.rot90(stored, k=-1)  # orientation 6: rotate 90 degrees clockwise
    mask = np.rot90(box_mask(), k=-1) > 0
    out = output_image(result)
    np.testing.assert_array_equal(out[~mask], displayed[~mask])


def _displayed(data: bytes) -> np.ndarray:
    """The composite as PIL itself shows it (its EXIF orientation applied), in RGB."""
    return np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))


# sample_id -> (composite as displayed, the mask the rule must read)
MASK_RULE_CASES: dict[str, tuple[Callable[[], np.ndarray], Callable[[], np.ndarray]]] = {
    "exif-square": (lambda: _displayed(square_exif_jpeg()), lambda: corner_mask(H, H) > 0),
    "rgba-mask": (photo, lambda: corner_mask() > 0),
    "zero-one-mask": (photo, lambda: corner_mask() > 0),
    "red-mask": (photo, lambda: corner_mask() > 0),
    "float-tiff": (lambda: np.repeat(photo()[..., :1], 3, 2), lambda: corner_mask() > 0),
}


@pytest.mark.parametrize("sample_id", list(MASK_RULE_CASES))
def test_mask_rule_decides_what_is_harmonized(matrix_run: dict[str, Any], sample_id: str) -> None:
    """Outside the mask the output is the displayed composite, pixel for pixel; inside it
    changed. A mask read from the wrong channel, or turned, fails one or the other."""
    composite, mask = (make() for make in MASK_RULE_CASES[sample_id])
    result = matrix_run["rows"][sample_id]
    assert result["status"] == "ok", result["error"]
    assert result["mask_area"] == pytest.approx(mask.mean())
    out = output_image(result)
    np.testing.assert_array_equal(out[~mask], composite[~mask])
    assert np.abs(out[mask].astype(int) - composite[mask]).mean() > 0.5


def test_unsafe_sample_id_stays_inside_the_output(matrix_run: dict[str, Any]) -> None:
    uri = matrix_run["rows"]["../../etc/pass wd/été"]["output_uri"]
    name = Path(uri).name
    assert "/" not in name and " " not in name and name.isascii() and ".." not in name
    assert not (matrix_run["root"] / "etc").exists()
