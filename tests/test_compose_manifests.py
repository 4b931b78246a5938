"""compose's inputs from folders: `harmonize manifest objects / backgrounds`, then compose on
what they wrote, locally and on S3 (moto)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from storage_args import cli_args
from test_compose import manifest_rows, object_pixels, png
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.storage import filesystem, to_pyarrow, write_atomic

# One folder a class, masks beside by stem; `bird/o3` has no mask.
OBJECTS = {"ball/o0": True, "ball/o1": True, "egg/o2": True, "bird/o3": False}


def write_folder(root: str, options: dict[str, Any]) -> None:
    for i, (name, with_mask) in enumerate(OBJECTS.items()):
        rgb, mask = object_pixels(i)
        write_atomic(f"{root}/objects/{name}.png", png(rgb), options)
        if with_mask:
            stem = name.split("/")[1]
            write_atomic(f"{root}/masks/{stem}.png", png(mask.astype("uint8") * 255), options)
    for i in range(2):
        pixels = object_pixels(10 + i)[0].repeat(3, axis=0).repeat(3, axis=1)  # 102x78 and up
        write_atomic(f"{root}/backgrounds/b{i}.jpg", png(pixels), options)
    write_atomic(f"{root}/backgrounds/notes.txt", b"not a photo", options)


def read_table(uri: str, options: dict[str, Any]) -> list[dict[str, Any]]:
    fs, path = filesystem(uri, options)
    table = pq.read_table(path, filesystem=to_pyarrow(fs))
    return sorted(table.to_pylist(), key=lambda row: str(next(iter(row.values()))))


def build(root: str, storage: list[str]) -> tuple[str, str, str]:
    """Both manifests through the CLI; returns their URIs and what `objects` printed."""
    runner = CliRunner()
    objects = runner.invoke(
        app,
        ["manifest", "objects", root, "--images", "objects/*/*.png",
         "--masks", "masks/{stem}.png", "--match", r"objects/(?P<cls>[^/]+)/[^/]+",
         "--category", "{cls}", "--out", f"{root}/objects.parquet", *storage],
    )  # fmt: skip
    assert objects.exit_code == 0, objects.output  # a left-out object is reported, not fatal
    backgrounds = runner.invoke(
        app,
        ["manifest", "backgrounds", root, "--images", "backgrounds/*.jpg",
         "--out", f"{root}/backgrounds.parquet", *storage],
    )  # fmt: skip
    assert backgrounds.exit_code == 0, backgrounds.output
    assert "2 backgrounds" in backgrounds.output
    return f"{root}/objects.parquet", f"{root}/backgrounds.parquet", objects.output


def check_and_compose(
    root: str, objects: str, backgrounds: str, printed: str, options: dict[str, Any],
    storage: list[str], output: str,
) -> None:  # fmt: skip
    # The object without a mask is named and left out; the others carry their folder's class.
    assert "3 objects (ball 2, egg 1)" in printed
    assert f"missing mask: {root}/masks/o3.png (object o3)" in printed
    rows = read_table(objects, options)
    assert [(r["object_id"], r["category"]) for r in rows] == [
        ("o0", "ball"), ("o1", "ball"), ("o2", "egg"),
    ]  # fmt: skip
    assert rows[0]["image_uri"] == f"{root}/objects/ball/o0.png"
    assert rows[0]["mask_uri"] == f"{root}/masks/o0.png"
    assert [r["background_id"] for r in read_table(backgrounds, options)] == ["b0", "b1"]

    composed = CliRunner().invoke(
        app,
        ["compose", "--objects", objects, "--backgrounds", backgrounds, "-o", output,
         "--per-background", "2", "--scale", "0.3", "0.5", "--no-progress", *storage],
    )  # fmt: skip
    assert composed.exit_code == 0, composed.output
    assert "4 composites, 4 ok, 0 error" in composed.output
    made = manifest_rows(output, options)
    pasted = {(i["object_id"], i["category"]) for r in made for i in r["instances"]}
    assert pasted and pasted <= {("o0", "ball"), ("o1", "ball"), ("o2", "egg")}


def test_objects_and_backgrounds_from_a_local_folder(ray_cluster: None, tmp_path: Path) -> None:
    root = str(tmp_path / "data")
    write_folder(root, {})
    objects, backgrounds, printed = build(root, [])
    check_and_compose(root, objects, backgrounds, printed, {}, [], str(tmp_path / "composed"))


def test_objects_and_backgrounds_from_s3(
    ray_cluster: None, s3_server: dict[str, str], s3_bucket: str
) -> None:
    options = s3_server
    storage = cli_args(options)
    root = f"s3://{s3_bucket}/data"
    write_folder(root, options)
    objects, backgrounds, printed = build(root, storage)
    check_and_compose(
        root, objects, backgrounds, printed, options, storage, f"s3://{s3_bucket}/composed"
    )


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        (["--images", "nothing/*.png", "--masks", "masks/{stem}.png"],
         "error: no file matches 'nothing/*.png'"),
        (["--images", "objects/*/*.png", "--masks", "/abs/{stem}.png"],
         "error: mask pattern '/abs/{stem}.png' must be relative to the folder"),
        (["--images", "objects/*/*.png", "--masks", "masks/{stem}.png", "--category", "{kind}"],
         "error: category pattern '{kind}' uses ['kind']"),
        (["--images", "objects/*/*.png", "--masks", "masks/{stem}.png", "--object-id", "same"],
         "error: object_id 'same' is given by two different images"),
    ],
)  # fmt: skip
def test_objects_manifest_that_cannot_be_built(
    tmp_path: Path, arguments: list[str], expected: str
) -> None:
    root = str(tmp_path / "data")
    write_folder(root, {})
    result = CliRunner().invoke(
        app, ["manifest", "objects", root, *arguments, "--out", str(tmp_path / "o.parquet")]
    )
    assert result.exit_code == 1
    assert result.output.startswith(expected), result.output
    assert not (tmp_path / "o.parquet").exists()
