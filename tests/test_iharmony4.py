"""iHarmony4 end to end on a miniature tree: manifest -> pipeline -> the official table.

The tree has the benchmark's exact layout and naming (`{subset}/composite_images/name_i_j.jpg`,
`masks/name_i.png`, `real_images/name.jpg`, `IHD_test.txt`, per-subset list files), built from
the photos scikit-image ships: one real photo per `name`, a mask per `i` (sized so that every
foreground-ratio bucket is used), a colour-shifted composite per `j`. Subsets have unequal
sizes, so the mean over images ("All") differs from the mean of the subset means.

The reference scores below follow the official script line by line (PIL resize, float32
arrays, scikit-image's metrics); `harmonize evaluate` must agree with them.
"""

from __future__ import annotations

import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from skimage.metrics import mean_squared_error, peak_signal_noise_ratio
from storage_args import cli_args
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import ModelConfig, RunConfig
from pipeline.datasets.build import ManifestBuildError
from pipeline.datasets.demo import OBJECTS, lab_statistics, load_photo, make_composite, object_mask
from pipeline.datasets.folder import build_folder
from pipeline.datasets.iharmony4 import build_iharmony4
from pipeline.results import ResultsError, read_results
from pipeline.run import run
from pipeline.storage import filesystem, join, write_atomic
from pipeline.tools.evaluate import evaluate


@dataclass(frozen=True)
class Composite:
    subset: str
    name: str  # the real photo's name: c1, a2, …
    photo: str  # scikit-image photo it is made from
    side: int  # longest side of the real image
    i: int  # mask number
    j: int  # composite number
    box: tuple[float, float, float, float]  # around the object whose colours change
    reference: tuple[str, str]  # the object (demo.OBJECTS) whose colour statistics it takes
    target_mse: float  # the composite's MSE to the real, as iHarmony4's (45-230)
    split: str = "test"

    @property
    def stem(self) -> str:
        return f"{self.name}_{self.i}_{self.j}"


FACE, SUIT = OBJECTS["astronaut", "face"], OBJECTS["astronaut", "suit"]
TREE = [
    Composite("HCOCO", "c1", "astronaut", 160, 1, 1, SUIT, ("chelsea", "cat"), 150),
    Composite("HCOCO", "c1", "astronaut", 160, 1, 2, SUIT, ("coffee", "cup"), 60),
    Composite("HCOCO", "c1", "astronaut", 160, 2, 1, FACE, ("rocket", "rocket"), 45),
    Composite("HAdobe5k", "a1", "coffee", 320, 1, 1, OBJECTS["coffee", "saucer"],
              ("motorcycle_left", "motorcycle"), 120),
    Composite("HAdobe5k", "a2", "rocket", 160, 1, 1, OBJECTS["rocket", "rocket"],
              ("chelsea", "cat"), 45),
    Composite("HFlickr", "f1", "chelsea", 200, 1, 1, OBJECTS["chelsea", "cat"],
              ("astronaut", "suit"), 230),
    Composite("HFlickr", "f1", "chelsea", 200, 2, 1, (0.3, 0.2, 0.8, 0.75),
              ("coffee", "saucer"), 90),
    Composite("Hday2night", "d1", "motorcycle_left", 160, 1, 1,
              OBJECTS["motorcycle_left", "motorcycle"], ("astronaut", "face"), 180),
    Composite("HCOCO", "c2", "ihc", 128, 1, 1, (0.25, 0.25, 0.75, 0.75), ("chelsea", "cat"),
              100, "train"),
    Composite("HFlickr", "f2", "color", 128, 1, 1, (0.25, 0.25, 0.75, 0.75), ("coffee", "cup"),
              100, "train"),
]  # fmt: skip
TEST = [c for c in TREE if c.split == "test"]
SUBSETS = ("HCOCO", "HAdobe5k", "HFlickr", "Hday2night")
# The official script's foreground-ratio buckets: low <= sum(mask) / (256 * 256) < high.
BUCKETS = (("0-5%", 0.0, 0.05), ("5-15%", 0.05, 0.15), ("15-100%", 0.15, 1.0))


def _encode(pixels: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def build_tree(root: str, options: dict[str, Any]) -> None:
    """The miniature iHarmony4 tree under `root` (any URI), made as iHarmony4 was: a real
    object's mask and a colour transfer from another photo's object (pipeline/datasets/demo.py)."""
    statistics: dict[tuple[str, str], Any] = {}
    for c in TREE:
        photo = load_photo(c.photo)
        image = Image.fromarray(photo)
        factor = c.side / max(image.size)
        size = (round(image.width * factor), round(image.height * factor))
        real = np.asarray(image.resize(size, Image.Resampling.LANCZOS))
        mask = object_mask(real, c.box)
        if c.reference not in statistics:
            source = load_photo(c.reference[0])
            statistics[c.reference] = lab_statistics(
                source, object_mask(source, OBJECTS[c.reference])
            )
        composite, _ = make_composite(real, mask, statistics[c.reference], c.target_mse)
        files = {
            f"{c.subset}/real_images/{c.name}.jpg": _encode(real, "JPEG"),
            f"{c.subset}/masks/{c.name}_{c.i}.png": _encode(mask.astype(np.uint8) * 255, "PNG"),
            f"{c.subset}/composite_images/{c.stem}.jpg": _encode(composite, "JPEG"),
        }
        for relative, data in files.items():
            write_atomic(join(root, relative), data, options)
    for split in ("train", "test"):
        listed = [c for c in TREE if c.split == split]
        lines = "".join(f"{c.subset}/composite_images/{c.stem}.jpg\n" for c in listed)
        write_atomic(join(root, f"IHD_{split}.txt"), lines.encode(), options)
        for subset in SUBSETS:
            # Per-subset lists name the file alone (the folders are implied).
            names = "".join(f"{c.stem}.jpg\r\n" for c in listed if c.subset == subset)
            write_atomic(join(root, subset, f"{subset}_{split}.txt"), names.encode(), options)


def read_manifest(uri: str, options: dict[str, Any]) -> list[dict[str, Any]]:
    fs, path = filesystem(uri, options)
    with fs.open(path, "rb") as handle:
        return sorted(pq.read_table(handle).to_pylist(), key=lambda r: r["sample_id"])


def _open(uri: str, options: dict[str, Any]) -> Image.Image:
    fs, path = filesystem(uri, options)
    with fs.open(path, "rb") as handle:
        return Image.open(io.BytesIO(handle.read()))


def official_scores(
    image_uri: str, real_uri: str, mask_uri: str, options: dict[str, Any], use_gt_bg: bool
) -> dict[str, float]:
    """DiffHarmony's scripts/evaluate/main.py for one image, rewritten with the same calls."""

    def possible_resize(image: Image.Image) -> Image.Image:
        # torchvision's TF.resize on a PIL image is PIL's resize with BILINEAR.
        return image if image.size == (256, 256) else image.resize((256, 256), Image.BILINEAR)

    ot_img = possible_resize(_open(image_uri, options).convert("RGB"))
    mk_img = possible_resize(_open(mask_uri, options).convert("1"))
    gt_img = possible_resize(_open(real_uri, options).convert("RGB"))
    mk_np = np.array(mk_img, dtype=np.float32)[..., np.newaxis]
    gt_np = np.array(gt_img, dtype=np.float32)
    ot_np = np.array(ot_img, dtype=np.float32)
    if use_gt_bg:
        ot_np = ot_np * mk_np + gt_np * (1 - mk_np)
    w, h = ot_img.size
    return {
        "mse": mean_squared_error(ot_np, gt_np),
        "psnr": peak_signal_noise_ratio(gt_np, ot_np, data_range=255),
        "fmse": mean_squared_error(ot_np * mk_np, gt_np * mk_np) * (h * w) / mk_np.sum(),
        "bmse": mean_squared_error(ot_np * (1 - mk_np), gt_np * (1 - mk_np))
        * (h * w)
        / (1 - mk_np).sum(),
        "ratio": mk_np.sum() / (h * w),
    }


def official_table(
    results: list[dict[str, Any]], options: dict[str, Any], use_gt_bg: bool, column: str
) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
    """Per-image reference scores and the table built from them (means over images)."""
    per_image = {
        r["sample_id"]: {
            **official_scores(r[column], r["real_uri"], r["mask_uri"], options, use_gt_bg),
            "subset": r["subset"],
        }
        for r in results
    }

    def means(ids: list[str]) -> dict[str, Any]:
        metrics = ("mse", "psnr", "fmse", "bmse")
        return {
            "images": len(ids),
            **{m: float(np.mean([per_image[i][m] for i in ids])) for m in metrics},
        }

    table: dict[str, Any] = {
        "subsets": {
            s: means([i for i, v in per_image.items() if v["subset"] == s]) for s in SUBSETS
        },
        "all": means(list(per_image)),
        "foreground_ratio": {},
    }
    for label, low, high in BUCKETS:
        ids = [i for i, v in per_image.items() if low <= v["ratio"] < high]
        table["foreground_ratio"][label] = means(ids) if ids else {"images": 0}
    return per_image, table


def assert_table(summary: dict[str, Any], expected: dict[str, Any]) -> None:
    assert list(summary["subsets"]) == list(SUBSETS)  # the published tables' order
    for name in SUBSETS:
        assert summary["subsets"][name] == pytest.approx(expected["subsets"][name], rel=1e-9)
    assert summary["all"] == pytest.approx(expected["all"], rel=1e-9)
    assert list(summary["foreground_ratio"]) == ["0-5%", "5-15%", "15-100%"]
    for label, bucket in summary["foreground_ratio"].items():
        want = expected["foreground_ratio"][label]
        assert bucket["images"] == want["images"] > 0  # the tree fills every bucket
        got = {k: v for k, v in bucket.items() if k not in ("range", "subsets")}
        assert got == pytest.approx(want, rel=1e-9)
        assert sum(s["images"] for s in bucket["subsets"].values()) == bucket["images"]
    assert sum(b["images"] for b in summary["foreground_ratio"].values()) == len(TEST)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = str(tmp_path_factory.mktemp("ihd") / "iHarmony4")
    build_tree(root, {})
    return root


# --- manifests ------------------------------------------------------------------------------


def test_manifest_iharmony4_layout(tree: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        ["manifest", "iharmony4", tree, "--split", "test", "--out", str(tmp_path / "t.parquet")],
    )
    assert result.exit_code == 0, result.output
    assert "8 samples (HCOCO 3, HAdobe5k 2, HFlickr 2, Hday2night 1)" in result.output
    assert "WARNING" not in result.output
    rows = read_manifest(str(tmp_path / "t.parquet"), {})
    assert [r["sample_id"] for r in rows] == sorted(c.stem for c in TEST)
    for row, c in zip(rows, sorted(TEST, key=lambda c: c.stem)):
        base = f"{tree}/{c.subset}"
        assert row == {
            "sample_id": c.stem,
            "composite_uri": f"{base}/composite_images/{c.stem}.jpg",
            "mask_uri": f"{base}/masks/{c.name}_{c.i}.png",
            "real_uri": f"{base}/real_images/{c.name}.jpg",
            "subset": c.subset,
        }
    # Without IHD_test.txt the per-subset lists (bare names, CRLF) give the same manifest.
    copy = tmp_path / "copy"
    shutil.copytree(tree, copy)
    (copy / "IHD_test.txt").unlink()
    report = build_iharmony4(str(copy), str(tmp_path / "p.parquet"), "test")
    assert len(report.sources) == 4 and report.complete
    per_subset = read_manifest(str(tmp_path / "p.parquet"), {})
    assert [{**r, **{k: r[k].replace(str(copy), tree) for k in r if k.endswith("_uri")}}
            for r in per_subset] == rows  # fmt: skip
    # The train split and a subset filter.
    report = build_iharmony4(tree, str(tmp_path / "tr.parquet"), "train", subsets=["HFlickr"])
    assert [r["sample_id"] for r in read_manifest(str(tmp_path / "tr.parquet"), {})] == ["f2_1_1"]
    with pytest.raises(ManifestBuildError, match=r"subset\(s\) HAdobe5k not in the train list"):
        build_iharmony4(tree, str(tmp_path / "tr.parquet"), "train", subsets=["HAdobe5k"])


def test_manifest_missing_files_are_reported(tree: str, tmp_path: Path) -> None:
    root = tmp_path / "ihd"
    shutil.copytree(tree, root)
    (root / "HFlickr/masks/f1_2.png").unlink()
    (root / "HCOCO/real_images/c1.jpg").unlink()  # the real of three composites
    with open(root / "IHD_test.txt", "a") as handle:
        handle.write("HAdobe5k/composite_images/a9_1_1.jpg\nHCOCO/composite_images/oops.jpg\n")
        handle.write("HCOCO/composite_images/c1_1_1.jpg\n")  # a repeated line counts once
    out = tmp_path / "m.parquet"
    result = CliRunner().invoke(app, ["manifest", "iharmony4", str(root), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "manifest " + str(out) + ": 4 samples" in result.output
    assert "WARNING: 5 sample(s) left out: 5 file(s) missing (1 composite, 2 mask, 2 real)" in (
        result.output
    )
    assert f"missing mask: {root}/HFlickr/masks/f1_2.png (sample f1_2_1)" in result.output
    assert f"missing real: {root}/HCOCO/real_images/c1.jpg (samples c1_1_1, c1_1_2, c1_2_1)" in (
        result.output
    )
    assert f"missing composite: {root}/HAdobe5k/composite_images/a9_1_1.jpg" in result.output
    assert "WARNING: 1 entry not understood, left out:" in result.output
    assert "IHD_test.txt line 10: 'HCOCO/composite_images/oops.jpg' is not named name_i_j" in (
        result.output
    )
    assert "1 repeated list line(s)" in result.output
    assert [r["sample_id"] for r in read_manifest(str(out), {})] == [
        "a1_1_1", "a2_1_1", "d1_1_1", "f1_1_1"
    ]  # fmt: skip

    report = build_iharmony4(str(root), str(out))
    assert report.left_out == ["a9_1_1", "c1_1_1", "c1_1_2", "c1_2_1", "f1_2_1"]
    assert report.missing_files == 5 and not report.complete

    # Nothing to build from: a clear error and exit code 1, no traceback.
    for name in ["IHD_test.txt", *(f"{s}/{s}_test.txt" for s in SUBSETS)]:
        (root / name).unlink()
    result = CliRunner().invoke(app, ["manifest", "iharmony4", str(root), "--out", str(out)])
    assert result.exit_code == 1
    assert "no iHarmony4 list file for split 'test'" in result.output
    assert f"{root}/IHD_test.txt" in result.output and f"{root}/HCOCO/HCOCO_test.txt" in (
        result.output
    )


def test_manifest_folder(tree: str, tmp_path: Path) -> None:
    # A user's folder: photos/*.jpg, masks/<stem>_mask.png, gt/<stem>.png; one mask missing.
    folder = tmp_path / "mine"
    for k, c in enumerate(TEST[:3]):
        stem = f"shot{k}"
        for src, dst in ((f"composite_images/{c.stem}.jpg", f"photos/{stem}.jpg"),
                         (f"masks/{c.name}_{c.i}.png", f"masks/{stem}_mask.png"),
                         (f"real_images/{c.name}.jpg", f"gt/{stem}.png")):  # fmt: skip
            (folder / dst).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f"{tree}/{c.subset}/{src}", folder / dst)
    (folder / "masks/shot2_mask.png").unlink()
    out = tmp_path / "mine.parquet"
    result = CliRunner().invoke(
        app,
        ["manifest", "folder", str(folder), "--composites", "photos/*.jpg",
         "--masks", "masks/{stem}_mask.png", "--real", "gt/{stem}.png", "--out", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"missing mask: {folder}/masks/shot2_mask.png (sample shot2)" in result.output
    assert read_manifest(str(out), {}) == [
        {"sample_id": f"shot{k}", "composite_uri": f"{folder}/photos/shot{k}.jpg",
         "mask_uri": f"{folder}/masks/shot{k}_mask.png", "real_uri": f"{folder}/gt/shot{k}.png"}
        for k in (0, 1)
    ]  # fmt: skip

    # The benchmark through the generic rule gives the benchmark's manifest (train + test).
    report = build_folder(
        tree, str(tmp_path / "f.parquet"), "*/composite_images/*.jpg",
        masks="{subset}/masks/{name}_{i}.png", real="{subset}/real_images/{name}.jpg",
        match=r"(?P<subset>[^/]+)/composite_images/(?P<name>.+)_(?P<i>\d+)_\d+\.jpg",
        subset="{subset}",
    )  # fmt: skip
    assert report.rows == len(TREE) and report.complete
    build_iharmony4(tree, str(tmp_path / "test.parquet"), "test")
    build_iharmony4(tree, str(tmp_path / "train.parquet"), "train")
    both = read_manifest(str(tmp_path / "test.parquet"), {}) + read_manifest(
        str(tmp_path / "train.parquet"), {}
    )
    assert read_manifest(str(tmp_path / "f.parquet"), {}) == sorted(
        both, key=lambda r: r["sample_id"]
    )

    with pytest.raises(ManifestBuildError, match=r"uses \['nme'\]; available"):
        build_folder(str(folder), str(out), "photos/*.jpg", masks="masks/{nme}.png")
    with pytest.raises(ManifestBuildError, match="no file matches"):
        build_folder(str(folder), str(out), "nothing/*.jpg", masks="masks/{stem}.png")
    with pytest.raises(ManifestBuildError, match="given by two different composites"):
        build_folder(str(folder), str(out), "*/*", masks="masks/{stem}.png", sample_id="x")


# --- manifest -> pipeline -> evaluate --------------------------------------------------------


def test_reinhard_local_table_matches_the_official_computation(
    ray_cluster: None, tree: str, tmp_path: Path
) -> None:
    manifest = str(tmp_path / "manifest.parquet")
    assert build_iharmony4(tree, manifest, "test").rows == len(TEST)
    output = str(tmp_path / "out")
    # Outputs at the inputs' own sizes: evaluation resizes them to 256 as the official one does.
    config = RunConfig(manifest=manifest, output=output, model=ModelConfig(resolution=128),
                       show_progress=False, run_id="reinhard")  # fmt: skip
    summary = run(config)
    assert (summary.samples, summary.ok) == (len(TEST), len(TEST)), summary.errors
    results = read_results(output, {}).to_pylist()

    result = CliRunner().invoke(app, ["evaluate", "--results", output, "--json"])
    assert result.exit_code == 0, result.output
    evaluation = json.loads(result.stdout)
    per_image, expected = official_table(results, {}, use_gt_bg=False, column="output_uri")
    assert_table(evaluation, expected)
    assert evaluation["model"] == "reinhard" and evaluation["not_scored"] == []
    # "All" is the mean over images, not the mean of the subset means.
    subset_means = np.mean([expected["subsets"][s]["mse"] for s in SUBSETS])
    assert evaluation["all"]["mse"] != pytest.approx(subset_means, rel=1e-3)

    # Per image, evaluate agrees with the reference, and so do the metrics the pipeline
    # computed itself on the same images (the same PIL resampling, PNG outputs).
    scored = evaluate(output)
    pipeline_metrics = {r["sample_id"]: r for r in results}
    for row in scored.per_image.to_pylist():
        reference = per_image[row["sample_id"]]
        for name in ("mse", "psnr", "fmse", "bmse"):
            assert row[name] == pytest.approx(reference[name], rel=1e-9)
        assert row["fg_ratio"] == pytest.approx(reference["ratio"], rel=1e-9)
        for name in ("mse", "psnr", "fmse", "bmse"):
            assert pipeline_metrics[row["sample_id"]][name] == pytest.approx(row[name], rel=1e-12)

    # --use-gt-bg: the background is the ground truth's, so bMSE is 0 and MSE can only drop.
    result = CliRunner().invoke(app, ["evaluate", "--results", output, "--json", "--use-gt-bg"])
    with_bg = json.loads(result.stdout)
    _, expected_bg = official_table(results, {}, use_gt_bg=True, column="output_uri")
    assert_table(with_bg, expected_bg)
    assert with_bg["all"]["bmse"] == 0.0 and evaluation["all"]["bmse"] > 0.0
    assert with_bg["all"]["mse"] < evaluation["all"]["mse"]
    assert with_bg["convention"]["use_gt_bg"] is True

    # The unharmonized baseline. On composites made as iHarmony4's (an object's colours taken
    # from another photo), matching the foreground to the background's statistics does not
    # bring it back: Reinhard's fMSE is well above the composites'.
    result = CliRunner().invoke(app, ["evaluate", "--results", output, "--json", "--composites"])
    baseline = json.loads(result.stdout)
    _, expected_composites = official_table(results, {}, False, column="composite_uri")
    assert_table(baseline, expected_composites)
    assert evaluation["all"]["fmse"] > 2 * baseline["all"]["fmse"]

    # The text table.
    result = CliRunner().invoke(app, ["evaluate", "--results", output])
    lines = result.stdout.splitlines()
    header = lines.index(next(line for line in lines if line.startswith("subset")))
    assert lines[header].split() == ["subset", "images", "MSE", "PSNR", "fMSE", "bMSE"]
    assert [line.split()[0] for line in lines[header + 1 : header + 6]] == [*SUBSETS, "All"]
    all_row = lines[header + 5].split()
    assert all_row[1] == "8" and float(all_row[2]) == pytest.approx(
        expected["all"]["mse"], abs=0.01
    )
    bucket_header = lines.index(next(line for line in lines if line.startswith("foreground")))
    assert [line.split()[0] for line in lines[bucket_header + 1 : bucket_header + 4]] == [
        "0-5%", "5-15%", "15-100%"
    ]  # fmt: skip


def test_evaluate_reports_what_it_cannot_score(
    ray_cluster: None, tree: str, tmp_path: Path
) -> None:
    """A deleted output image and an error row are listed, not fatal; two parameter sets in one
    results folder must be told apart."""
    manifest = str(tmp_path / "manifest.parquet")
    build_iharmony4(tree, manifest, "test", subsets=["HFlickr", "Hday2night"])
    table = pq.read_table(manifest)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    extra = pa.table({"sample_id": ["broken"], "composite_uri": [str(broken)],
                      "mask_uri": table["mask_uri"][0:1], "real_uri": table["real_uri"][0:1],
                      "subset": ["HFlickr"]})  # fmt: skip
    pq.write_table(pa.concat_tables([table, extra]), manifest)
    output = str(tmp_path / "out")
    config = RunConfig(manifest=manifest, output=output, model=ModelConfig(resolution=64),
                       show_progress=False, run_id="r1")  # fmt: skip
    assert run(config).error == 1
    results = read_results(output, {})
    gone = next(r for r in results.to_pylist() if r["sample_id"] == "d1_1_1")["output_uri"]
    Path(gone).unlink()

    scored = evaluate(output)
    assert sorted(scored.per_image["sample_id"].to_pylist()) == ["f1_1_1", "f1_2_1"]
    reasons = dict(scored.not_scored)
    assert "readable image" in reasons["broken"] and reasons["broken"].startswith("no ok result")
    assert reasons["d1_1_1"] == f"image not found: {gone}"
    text = scored.text()
    assert "not scored: 2 sample(s)" in text and f"d1_1_1: image not found: {gone}" in text

    # A second parameter set in the same results folder (as another run would leave).
    other = results.set_column(
        results.schema.get_field_index("params_hash"), "params_hash",
        pa.array(["0000000000000000"] * results.num_rows),
    )  # fmt: skip
    write_atomic(f"{output}/results/r2/part-000000.parquet", _parquet(other), {})
    with pytest.raises(ResultsError, match="2 parameter sets"):
        evaluate(output)
    result = CliRunner().invoke(app, ["evaluate", "--results", output])
    assert result.exit_code == 2 and "--params-hash" in result.output
    first = results["params_hash"][0].as_py()
    assert evaluate(output, params_hash=first).per_image.num_rows == 2
    assert evaluate(f"{output}/results/r1").per_image.num_rows == 2


def _parquet(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def test_diffharmony_on_s3_through_the_cli(
    ray_cluster: None, s3_server: dict[str, Any], s3_bucket: str, tmp_path: Path
) -> None:
    """The tree on the moto S3 server; manifest, run and evaluate all through the CLI."""
    from tiny_checkpoint import write_tiny_model_dir

    root = f"s3://{s3_bucket}/iHarmony4"
    build_tree(root, s3_server)
    model_dir = write_tiny_model_dir(tmp_path / "model")
    s3 = cli_args(s3_server)
    manifest = f"s3://{s3_bucket}/manifests/test.parquet"
    output = f"s3://{s3_bucket}/eval/diffharmony"
    runner = CliRunner()

    result = runner.invoke(app, ["manifest", "iharmony4", root, "--split", "test",
                                 "--out", manifest, *s3])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"manifest {manifest}: 8 samples" in result.output
    rows = read_manifest(manifest, s3_server)
    assert rows[0]["composite_uri"].startswith(f"{root}/")

    result = runner.invoke(
        app,
        ["run", "-m", manifest, "-o", output, "--model", "diffharmony",
         "--model-dir", str(model_dir), "--resolution", "64", "--steps", "1",
         "--output-size", "model", "--batch-size", "4", "--no-progress", *s3],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "8 ok, 0 error" in result.output

    per_image_uri = f"s3://{s3_bucket}/eval/per_image.parquet"
    result = runner.invoke(
        app, ["evaluate", "--results", output, "--json", "--per-image", per_image_uri, *s3]
    )
    assert result.exit_code == 0, result.output
    evaluation = json.loads(result.stdout)
    results = read_results(join(output, "results"), s3_server).to_pylist()
    for r in results:  # the official 256 px outputs, named as the official script expects
        assert r["output_uri"] == f"{output}/images/{r['sample_id']}.png"
        assert _open(r["output_uri"], s3_server).size == (256, 256)
    per_image, expected = official_table(results, s3_server, False, column="output_uri")
    assert_table(evaluation, expected)
    assert evaluation["model"] == "diffharmony"
    assert evaluation["params_hash"] == results[0]["params_hash"]
    written = {r["sample_id"]: r for r in read_manifest(per_image_uri, s3_server)}
    assert set(written) == set(per_image)
    for sample_id, reference in per_image.items():
        assert written[sample_id]["fmse"] == pytest.approx(reference["fmse"], rel=1e-9)
        assert written[sample_id]["subset"] == reference["subset"]
