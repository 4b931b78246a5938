"""The pixel limit holds in every tool that decodes images, not only in the pipeline's fetch.

`harmonize evaluate` and `harmonize report` read images that a run wrote or that a manifest
named: a decompression bomb among them (a small file that claims a huge image) must be refused
from its header, as the fetch stage refuses it, before any pixel is decoded. And importing any
module of the project must leave PIL's own decompression-bomb check as PIL set it.
"""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.config import DEFAULT_MAX_PIXELS

REPO = Path(__file__).resolve().parent.parent
SIDE = 8200  # 67.2 million pixels: over the default limit, under PIL's own error threshold


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(side: int = SIDE) -> bytes:
    """A valid grey PNG of side x side black pixels in about 70 KB, written row by row (the
    test itself never holds the decoded image)."""
    compressor = zlib.compressobj(9)
    row = b"\x00" * (side + 1)  # filter byte 0, then the row's grey levels
    data = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", data)
        + _chunk(b"IEND", b"")
    )


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def bomb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    assert SIDE * SIDE > DEFAULT_MAX_PIXELS
    path = tmp_path_factory.mktemp("bomb") / "bomb.png"
    path.write_bytes(bomb_png())
    return path


def _results(tmp_path: Path, **uris: str) -> str:
    """A results folder with one ok row naming `uris` (as a run would have written it)."""
    small = tmp_path / "small.png"
    small.write_bytes(png(np.full((64, 64, 3), 90, np.uint8)))
    mask = np.zeros((64, 64), np.uint8)
    mask[8:40, 8:40] = 255
    (tmp_path / "mask.png").write_bytes(png(mask))
    row = {
        "sample_id": "bomb", "status": "ok", "error": None, "composite_uri": str(small),
        "output_uri": str(small), "real_uri": str(small), "mask_uri": str(tmp_path / "mask.png"),
        "params_hash": "p", "model": "reinhard",
    }  # fmt: skip
    row.update(uris)
    folder = tmp_path / "out" / "results" / "run"
    folder.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([row]), folder / "part-0.parquet")
    return str(tmp_path / "out")


def test_evaluate_refuses_an_image_over_the_pixel_limit(bomb: Path, tmp_path: Path) -> None:
    from pipeline.tools.evaluate import evaluate

    evaluation = evaluate(_results(tmp_path, output_uri=str(bomb)))
    assert evaluation.per_image.num_rows == 0
    ((sample_id, reason),) = evaluation.not_scored
    assert sample_id == "bomb"
    assert f"over the limit of {DEFAULT_MAX_PIXELS}" in reason, reason


def test_report_refuses_an_image_over_the_pixel_limit(bomb: Path, tmp_path: Path) -> None:
    from pipeline.tools.report import build_report

    summary = build_report(
        _results(tmp_path, composite_uri=str(bomb)), str(tmp_path / "report.html")
    )
    refused = [line for line in summary.failed if line.startswith("bomb composite:")]
    assert refused and f"over the limit of {DEFAULT_MAX_PIXELS}" in refused[0], summary.failed


def test_no_module_changes_pils_own_bomb_check() -> None:
    """Import every module of the product in a fresh interpreter: PIL's limit is untouched."""
    script = (
        "import pkgutil, importlib, PIL.Image as I\n"
        "default = I.MAX_IMAGE_PIXELS\n"
        "import pipeline, schemas\n"
        "for package in (pipeline, schemas):\n"
        "    for module in pkgutil.walk_packages(package.__path__, package.__name__ + '.'):\n"
        "        if not module.name.endswith('__main__'):  # runs the command line\n"
        "            importlib.import_module(module.name)\n"
        "        assert I.MAX_IMAGE_PIXELS == default, (module.name, I.MAX_IMAGE_PIXELS)\n"
        "print('untouched', default)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("untouched")
