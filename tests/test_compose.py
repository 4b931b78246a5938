"""Copy-paste end to end: compose (Ray) -> harmonize run -> export (COCO), locally and on S3;
annotations checked against the written pixels with pycocotools; determinism across batch
sizes; resume; bad inputs as error rows; COCO objects as input; the report's contact sheet."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from storage_args import cli_args
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.compose.inputs import ComposeConfig, open_objects
from pipeline.compose.job import compose, compose_batch
from pipeline.compose.layout import LayoutRules
from pipeline.config import ModelConfig, RunConfig
from pipeline.preflight import PreflightError
from pipeline.run import run
from pipeline.storage import filesystem, read_bytes, to_pyarrow, write_atomic
from pipeline.tools.export import export_coco
from pipeline.tools.report import build_report

RULES = LayoutRules(
    per_background=2, min_objects=1, max_objects=3, scale=(0.3, 0.6), max_overlap=0.3
)
CATEGORIES = ("ball", "egg")


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def object_pixels(i: int) -> tuple[np.ndarray, np.ndarray]:
    """A textured object in an ellipse, with a margin: (h, w, 3) and its mask (h, w) bool."""
    h, w = 30 + 4 * i, 24 + 2 * i
    rng = np.random.default_rng(i)
    yy, xx = np.mgrid[:h, :w]
    mask = ((yy - h / 2) / (h / 2 - 3)) ** 2 + ((xx - w / 2) / (w / 2 - 3)) ** 2 <= 1
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8), mask


def write_inputs(root: str, options: dict[str, Any], backgrounds: int = 4) -> tuple[str, str]:
    """4 objects (relative URIs) and `backgrounds` 96x64 backgrounds (a gradient plus noise)."""
    files: dict[str, bytes] = {}
    objects: dict[str, list[str]] = {
        "object_id": [],
        "image_uri": [],
        "mask_uri": [],
        "category": [],
    }
    for i in range(4):
        rgb, mask = object_pixels(i)
        files[f"objects/o{i}.png"] = png(rgb)
        files[f"objects/o{i}_mask.png"] = png(mask.astype(np.uint8) * 255)
        objects["object_id"].append(f"o{i}")
        objects["image_uri"].append(f"objects/o{i}.png")
        objects["mask_uri"].append(f"objects/o{i}_mask.png")
        objects["category"].append(CATEGORIES[i % 2])
    rows: dict[str, list[str]] = {"background_id": [], "image_uri": []}
    for i in range(backgrounds):
        rng = np.random.default_rng(100 + i)
        ramp = np.linspace(0, 200, 96, dtype=np.float64)[None, :, None]
        pixels = np.clip(ramp + rng.normal(0, 10, (64, 96, 3)) + 20 * i, 0, 255).astype(np.uint8)
        files[f"backgrounds/b{i}.png"] = png(pixels)
        rows["background_id"].append(f"b{i}")
        rows["image_uri"].append(f"backgrounds/b{i}.png")
    for name, table in (("objects.parquet", objects), ("backgrounds.parquet", rows)):
        buffer = io.BytesIO()
        pq.write_table(pa.table(table), buffer)
        files[name] = buffer.getvalue()
    for name, data in files.items():
        write_atomic(f"{root}/{name}", data, options)
    return f"{root}/objects.parquet", f"{root}/backgrounds.parquet"


def manifest_rows(output: str, options: dict[str, Any]) -> list[dict[str, Any]]:
    fs, path = filesystem(f"{output}/manifest", options)
    files = [f for f in fs.find(path) if f.endswith(".parquet")]
    table = pads.dataset(files, filesystem=to_pyarrow(fs)).to_table()
    return sorted(table.to_pylist(), key=lambda r: r["sample_id"])


def decode(uri: str, options: dict[str, Any]) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(read_bytes(uri, options))))


def check_composites(rows: list[dict[str, Any]], rules: LayoutRules, options: dict) -> None:
    """What the manifest says against what the files hold."""
    for row in rows:
        composite = decode(row["composite_uri"], options)
        mask = decode(row["mask_uri"], options)
        labels = decode(row["instances_uri"], options)
        background = decode(row["background_uri"], options)
        assert composite.shape == background.shape and labels.shape == mask.shape
        np.testing.assert_array_equal(mask, (labels > 0).astype(np.uint8) * 255)
        np.testing.assert_array_equal(composite[labels == 0], background[labels == 0])
        assert (composite[labels > 0] != background[labels > 0]).any(axis=-1).mean() > 0.9
        assert sorted(np.unique(labels[labels > 0])) == [i["label"] for i in row["instances"]]
        for instance in row["instances"]:
            visible = labels == instance["label"]
            rle = mask_utils.encode(np.asfortranarray(visible.astype(np.uint8)))
            assert instance["area"] == int(mask_utils.area(rle))
            assert instance["bbox"] == [float(v) for v in mask_utils.toBbox(rle)]
            assert instance["visible"] >= 1 - rules.max_overlap - 1e-9
            assert rules.scale[0] <= instance["scale"] <= rules.scale[1]
            assert instance["height"] == round(instance["scale"] * background.shape[0])
            assert 0 <= instance["x"] and instance["x"] + instance["width"] <= background.shape[1]
            assert 0 <= instance["y"] and instance["y"] + instance["height"] <= background.shape[0]
            assert instance["category"] == CATEGORIES[int(instance["object_id"][1:]) % 2]


def check_coco(path: str, harmonized: dict[str, dict[str, Any]], options: dict) -> COCO:
    """Read the export back with pycocotools; every annotation against the instance PNG."""
    coco = COCO(path)
    present = {i["category"] for row in harmonized.values() for i in row["instances"]}
    assert {c["name"] for c in coco.loadCats(coco.getCatIds())} == present
    assert len(coco.getImgIds()) == len(harmonized)
    for image in coco.loadImgs(coco.getImgIds()):
        row = harmonized[image["sample_id"]]
        assert image["file_name"] == row["output_uri"]
        output = decode(row["output_uri"], options)
        assert (image["height"], image["width"]) == output.shape[:2]
        labels = decode(row["instances_uri"], options)
        annotations = coco.loadAnns(coco.getAnnIds(imgIds=image["id"]))
        assert len(annotations) == len(row["instances"])
        for annotation, instance in zip(annotations, row["instances"]):
            visible = labels == instance["label"]
            np.testing.assert_array_equal(coco.annToMask(annotation).astype(bool), visible)
            assert annotation["area"] == visible.sum()
            ys, xs = np.nonzero(visible)
            assert annotation["bbox"] == [
                xs.min(),
                ys.min(),
                xs.max() - xs.min() + 1,
                ys.max() - ys.min() + 1,
            ]
            assert coco.loadCats(annotation["category_id"])[0]["name"] == instance["category"]
            assert annotation["object_id"] == instance["object_id"] and annotation["iscrowd"] == 0
    return coco


@pytest.fixture(scope="module")
def composed(ray_cluster: None, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("compose")
    objects, backgrounds = write_inputs(str(root / "inputs"), {})
    config = ComposeConfig(
        objects, backgrounds, str(root / "composed"), rules=RULES, batch_size=3, show_progress=False
    )
    summary = compose(config)
    assert (summary.composites, summary.ok, summary.error, summary.skipped) == (8, 8, 0, 0)
    return root, config.params_hash()


def test_compose_run_export_local(composed: tuple[Path, str]) -> None:
    root, _ = composed
    rows = manifest_rows(str(root / "composed"), {})
    assert [r["sample_id"] for r in rows] == [f"b{i}-{k}" for i in range(4) for k in range(2)]
    check_composites(rows, RULES, {})
    assert sum(len(r["instances"]) for r in rows) > len(rows)  # several objects per composite
    # harmonize run reads the composite manifest as it is.
    config = RunConfig(
        str(root / "composed" / "manifest"),
        str(root / "harmonized"),
        model=ModelConfig(resolution=64),
        show_progress=False,
    )
    summary = run(config)
    assert (summary.samples, summary.ok) == (8, 8)
    results = pads.dataset(str(root / "harmonized" / "results")).to_table().to_pylist()
    harmonized = {r["sample_id"]: r for r in results}
    assert harmonized["b0-0"]["instances"] == rows[0]["instances"]  # passed through
    out = str(root / "train" / "instances.json")
    export = export_coco(str(root / "harmonized"), "true", out)
    assert (export.selected, export.images, export.left_out) == (8, 8, [])
    check_coco(out, harmonized, {})
    # A filter: the JSON holds only the selected samples.
    export = export_coco(str(root / "harmonized"), "sample_id LIKE 'b1-%'", out)
    assert export.images == 2
    check_coco(out, {k: v for k, v in harmonized.items() if k.startswith("b1-")}, {})
    # The report's contact sheet: each composite next to its harmonized output.
    report = build_report(str(root / "harmonized"), str(root / "r.html"), count=1, sheet=4)
    text = (root / "r.html").read_text()
    assert report.failed == [] and text.count('class="pair"') == 4
    for sid in ("b0-0", "b0-1", "b1-0", "b1-1"):
        cell = text.split(f'data-pair-id="{sid}"', 1)[1].split("</figure>", 1)[0]
        assert f'alt="composite of {sid}"' in cell and f'alt="harmonized of {sid}"' in cell


def test_same_composites_whatever_the_batch_size_and_resume(
    composed: tuple[Path, str], tmp_path: Path
) -> None:
    root, params_hash = composed
    objects, backgrounds = (
        str(root / "inputs" / "objects.parquet"),
        str(root / "inputs" / "backgrounds.parquet"),
    )
    again = ComposeConfig(
        objects, backgrounds, str(tmp_path / "one"), rules=RULES, batch_size=1, show_progress=False
    )
    assert compose(again).ok == 8 and again.params_hash() == params_hash
    first, second = manifest_rows(str(root / "composed"), {}), manifest_rows(again.output, {})
    for a, b in zip(first, second):
        assert (a["sample_id"], a["instances"], a["compose_seed"]) == (
            b["sample_id"],
            b["instances"],
            b["compose_seed"],
        )
        for column in ("composite_uri", "mask_uri", "instances_uri"):
            assert read_bytes(a[column], {}) == read_bytes(b[column], {})
    # Another seed: other composites.
    other = ComposeConfig(
        objects, backgrounds, str(tmp_path / "seed"), rules=RULES, seed=1, show_progress=False
    )
    compose(other)
    assert [r["instances"] for r in manifest_rows(other.output, {})] != [
        r["instances"] for r in first
    ]
    # Rerun into the same output: nothing to do. A grown background list: only the new ones.
    rerun = compose(again)
    assert (rerun.composites, rerun.skipped) == (0, 8)
    write_inputs(str(tmp_path / "grown"), {}, backgrounds=5)
    grown = ComposeConfig(
        str(tmp_path / "grown" / "objects.parquet"),
        str(tmp_path / "grown" / "backgrounds.parquet"),
        again.output,
        rules=RULES,
        show_progress=False,
    )
    summary = compose(grown)
    assert (summary.composites, summary.ok, summary.skipped) == (2, 2, 8)
    assert [r["sample_id"] for r in manifest_rows(again.output, {})][-2:] == ["b4-0", "b4-1"]
    # Other rules into the same output are refused before any work.
    with pytest.raises(PreflightError, match="other rules or another seed"):
        compose(
            ComposeConfig(
                objects, backgrounds, again.output, rules=LayoutRules(), show_progress=False
            )
        )


def one_composite(tmp_path: Path, objects: dict[str, list], background: bytes) -> dict:
    """compose_batch (the Ray task's function) on one composite, without Ray."""
    (tmp_path / "bg.png").write_bytes(background)
    pq.write_table(pa.table(objects), tmp_path / "objects.parquet")
    config = ComposeConfig(
        str(tmp_path / "objects.parquet"),
        "",
        str(tmp_path / "out"),
        rules=LayoutRules(scale=(0.4, 0.5)),
    )
    batch = pa.table(
        {
            "sample_id": ["bg-0"],
            "background_id": ["bg"],
            "background_uri": [str(tmp_path / "bg.png")],
        }
    )
    return compose_batch(batch, config, open_objects(config)).to_pylist()[0]


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing mask", r"composite 'bg-0': object 'o' mask not found: .*/gone\.png"),
        ("empty mask", r"composite 'bg-0': object 'o': mask is empty \(no foreground pixel\)"),
        (
            "larger than background",
            r"object 'o' \(200x10\) is larger than the background \(96x64\)",
        ),
        ("unreadable object", r"object 'o' image is not a readable image"),
        ("unreadable background", r"composite 'bg-0': background 'bg' is not a readable image"),
    ],
)
def test_bad_inputs_become_error_rows(tmp_path: Path, case: str, expected: str) -> None:
    rgb, mask = object_pixels(0)
    if case == "larger than background":
        rgb, mask = np.zeros((10, 200, 3), np.uint8), np.ones((10, 200), bool)
    (tmp_path / "o.png").write_bytes(b"not an image" if case == "unreadable object" else png(rgb))
    mask_pixels = np.zeros_like(mask) if case == "empty mask" else mask
    (tmp_path / "m.png").write_bytes(png(mask_pixels.astype(np.uint8) * 255))
    objects = {
        "object_id": ["o"],
        "image_uri": [str(tmp_path / "o.png")],
        "mask_uri": [str(tmp_path / ("gone.png" if case == "missing mask" else "m.png"))],
    }
    background = (
        b"\x89PNG broken"
        if case == "unreadable background"
        else png(np.full((64, 96, 3), 128, np.uint8))
    )
    row = one_composite(tmp_path, objects, background)
    assert row["status"] == "error" and row["composite_uri"] is None
    assert "\n" not in row["error"]
    assert re.search(expected, row["error"]), row["error"]
    assert row["object_ids"] == ["o"]


def test_error_rows_in_a_run_and_the_summary(ray_cluster: None, tmp_path: Path) -> None:
    """A missing background and an object whose mask is missing: their composites are error
    rows under errors/, the others are made, the command exits 0 and prints the causes."""
    objects, backgrounds = write_inputs(str(tmp_path), {})
    table = pq.read_table(backgrounds)
    pq.write_table(
        pa.concat_tables(
            [table, pa.table({"background_id": ["gone"], "image_uri": ["backgrounds/gone.png"]})]
        ),
        backgrounds,
    )
    (tmp_path / "objects" / "o3_mask.png").unlink()
    result = CliRunner().invoke(
        app,
        [
            "compose",
            "--objects",
            objects,
            "--backgrounds",
            backgrounds,
            "-o",
            str(tmp_path / "out"),
            "--max-objects",
            "2",
            "--no-progress",
            "--batch-size",
            "4",
        ],
    )
    assert result.exit_code == 0, result.output
    errors = pads.dataset(str(tmp_path / "out" / "errors")).to_table().to_pylist()
    made = manifest_rows(str(tmp_path / "out"), {})
    assert len(errors) + len(made) == 5
    by_id = {e["sample_id"]: e["error"] for e in errors}
    assert "background 'gone' not found" in by_id["gone-0"]
    for sid, error in by_id.items():
        assert sid == "gone-0" or "object 'o3' mask not found" in error
        assert f"error: {error}" in result.output
    assert all("o3" not in [i["object_id"] for i in r["instances"]] for r in made)
    assert f"5 composites, {len(made)} ok, {len(errors)} error" in result.output


def test_coco_objects_polygons_and_rle(ray_cluster: None, tmp_path: Path) -> None:
    """Objects from a COCO instances JSON: cut by polygon or RLE, crowd regions left out."""
    _, backgrounds = write_inputs(str(tmp_path), {})
    rgb, _ = object_pixels(3)
    (tmp_path / "images").mkdir(exist_ok=True)
    Image.fromarray(rgb).save(tmp_path / "images" / "p.png")
    h, w = rgb.shape[:2]
    square = np.zeros((h, w), np.uint8)
    square[5:20, 4:16] = 1
    rle = mask_utils.encode(np.asfortranarray(square))
    coco = {
        "images": [{"id": 7, "file_name": "p.png", "height": h, "width": w}],
        "categories": [{"id": 1, "name": "kite"}, {"id": 2, "name": "box"}],
        "annotations": [
            {
                "id": 11,
                "image_id": 7,
                "category_id": 1,
                "iscrowd": 0,
                "segmentation": [[3.0, 3.0, 20.0, 3.0, 20.0, 30.0, 3.0, 30.0]],
            },
            {
                "id": 12,
                "image_id": 7,
                "category_id": 2,
                "iscrowd": 0,
                "segmentation": {"size": [h, w], "counts": rle["counts"].decode()},
            },
            {
                "id": 13,
                "image_id": 7,
                "category_id": 2,
                "iscrowd": 1,
                "segmentation": {"size": [h, w], "counts": rle["counts"].decode()},
            },
        ],
    }
    (tmp_path / "annotations.json").write_text(json.dumps(coco))
    config = ComposeConfig(
        str(tmp_path / "annotations.json"),
        backgrounds,
        str(tmp_path / "out"),
        coco_images=str(tmp_path / "images"),
        rules=LayoutRules(scale=(0.5, 0.5), flip=0.0),
        show_progress=False,
    )
    objects = open_objects(config)
    assert objects["object_id"].to_pylist() == ["11", "12"]  # the crowd one left out
    assert compose(config).ok == 4
    for row in manifest_rows(config.output, {}):
        (instance,) = row["instances"]
        labels = decode(row["instances_uri"], {})
        # The pasted shape is the annotation's, resized: a filled rectangle of its box.
        box = [int(v) for v in instance["bbox"]]
        patch = labels[box[1] : box[1] + box[3], box[0] : box[0] + box[2]]
        assert (patch == instance["label"]).all()
        expected = {"11": (28 / 18, "kite"), "12": (15 / 12, "box")}[instance["object_id"]]
        assert box[3] / box[2] == pytest.approx(expected[0], rel=0.1)
        assert instance["category"] == expected[1]


def test_compose_run_export_on_s3(
    ray_cluster: None, s3_server: dict[str, str], s3_bucket: str, tmp_path: Path
) -> None:
    options = s3_server
    objects, backgrounds = write_inputs(f"s3://{s3_bucket}/inputs", options, backgrounds=2)
    storage = cli_args(options)
    runner = CliRunner()
    composed = runner.invoke(
        app,
        [
            "compose",
            "--objects",
            objects,
            "--backgrounds",
            backgrounds,
            "-o",
            f"s3://{s3_bucket}/composed",
            "--per-background",
            "2",
            "--max-objects",
            "2",
            "--no-progress",
            *storage,
        ],
    )
    assert composed.exit_code == 0, composed.output
    assert "4 composites, 4 ok, 0 error" in composed.output
    s3 = options
    rows = manifest_rows(f"s3://{s3_bucket}/composed", s3)
    assert all(r["composite_uri"].startswith(f"s3://{s3_bucket}/composed/") for r in rows)
    check_composites(rows, LayoutRules(max_overlap=0.3), s3)
    harmonized = runner.invoke(
        app,
        [
            "run",
            "-m",
            f"s3://{s3_bucket}/composed/manifest",
            "-o",
            f"s3://{s3_bucket}/harmonized",
            "--resolution",
            "64",
            "--no-progress",
            *storage,
        ],
    )
    assert harmonized.exit_code == 0, harmonized.output
    assert "4 samples, 4 ok, 0 error" in harmonized.output
    exported = runner.invoke(
        app,
        [
            "export",
            "--results",
            f"s3://{s3_bucket}/harmonized",
            "--where",
            "bg_psnr > 35",
            "--out",
            f"s3://{s3_bucket}/train/instances.json",
            *storage,
        ],
    )
    assert exported.exit_code == 0, exported.output
    assert "selected 4 of 4 samples where bg_psnr > 35; exported 4 images" in exported.output
    local = tmp_path / "instances.json"
    local.write_bytes(read_bytes(f"s3://{s3_bucket}/train/instances.json", s3))
    fs, path = filesystem(f"s3://{s3_bucket}/harmonized/results", s3)
    files = [f for f in fs.find(path) if f.endswith(".parquet")]
    results = pads.dataset(files, filesystem=to_pyarrow(fs)).to_table().to_pylist()
    check_coco(str(local), {r["sample_id"]: r for r in results}, s3)


def test_export_leaves_out_what_it_cannot_annotate(
    composed: tuple[Path, str], tmp_path: Path
) -> None:
    """Square model-size outputs do not match the instance masks: left out, listed, exit 1."""
    root, _ = composed
    config = RunConfig(
        str(root / "composed" / "manifest"),
        str(tmp_path / "square"),
        model=ModelConfig(resolution=64, output_size="model"),
        show_progress=False,
    )
    assert run(config).ok == 8
    result = CliRunner().invoke(
        app,
        [
            "export",
            "--results",
            str(tmp_path / "square"),
            "--where",
            "true",
            "--out",
            str(tmp_path / "c.json"),
        ],
    )
    assert result.exit_code == 1
    assert (
        "left out: sample 'b0-0': harmonized image is 256x256 but its instance masks are 96x64"
        in result.output
    )
    assert json.loads((tmp_path / "c.json").read_text())["images"] == []
    # Results that did not come from compose: a clear refusal.
    plain = CliRunner().invoke(
        app,
        [
            "export",
            "--results",
            str(root / "composed" / "manifest"),
            "--where",
            "true",
            "--out",
            str(tmp_path / "d.json"),
        ],
    )
    assert plain.exit_code == 2 and "error:" in plain.output


def test_compose_refuses_bad_rules_and_inputs_before_any_work(tmp_path: Path) -> None:
    objects, backgrounds = write_inputs(str(tmp_path), {})
    runner = CliRunner()
    bad = runner.invoke(
        app,
        [
            "compose",
            "--objects",
            objects,
            "--backgrounds",
            backgrounds,
            "-o",
            str(tmp_path / "o"),
            "--scale",
            "0.6",
            "0.2",
        ],
    )
    assert bad.exit_code == 2 and "--scale 0.6 0.2: need 0 < MIN <= MAX" in bad.output
    table = pq.read_table(objects)
    pq.write_table(table.set_column(0, "object_id", pa.array(["a", "a", "b", ""])), objects)
    dup = runner.invoke(
        app,
        ["compose", "--objects", objects, "--backgrounds", backgrounds, "-o", str(tmp_path / "o")],
    )
    assert dup.exit_code == 2
    assert "column 'object_id' is null or empty in rows 3" in dup.output
    assert "duplicated value(s) 'a'" in dup.output
    assert not (tmp_path / "o").exists()
    gone = runner.invoke(
        app,
        [
            "compose",
            "--objects",
            str(tmp_path / "nothing.parquet"),
            "--backgrounds",
            backgrounds,
            "-o",
            str(tmp_path / "o"),
        ],
    )
    assert gone.exit_code == 2 and f"objects: not found: {tmp_path}/nothing.parquet" in gone.output


def test_copy_paste_demo_prints_what_the_readme_shows(
    ray_cluster: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`harmonize demo --copy-paste` on the bundled photos: the README shows its summary lines
    (run ids, times and paths aside), so they must be what it prints."""
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["demo", "--copy-paste"])
    assert result.exit_code == 0, result.output

    def stable(line: str) -> str:
        line = re.sub(r"\d{8}T\d{6}Z-[0-9a-f]{6}", "RUN", line)
        line = re.sub(r"in [\d.]+ s( \([\d.]+ images/s\))?", "in T", line)
        return re.sub(r"(report: )\S+ \([\d.]+ MB\)", r"\1PATH", line)

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    shown = readme.split("### The recipe on the bundled photos", 1)[1].split("```\n", 2)[1]
    printed = {stable(line) for line in result.output.splitlines()}
    for line in shown.strip().splitlines():
        assert stable(line) in printed, line
    coco = COCO(str(tmp_path / "demo_output" / "train" / "instances.json"))
    assert len(coco.getImgIds()) == 3 and len(coco.getAnnIds()) == 5
    assert "Before / after" in (tmp_path / "demo_output" / "report.html").read_text()
