"""DiffHarmony++ end to end on tiny fixtures in the release's format: inverse harmonization
(variants, seeds, background, errors, resume), the harmony classifier's `unharmony_prob`, and
the worked example: generate variants per real -> keep the most unharmonious per real ->
training manifest -> harmonize it forward -> evaluate against the reals. Locally and on S3."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from storage_args import cli_args
from tiny_checkpoint import write_harmony_classifier, write_tiny_model_dir
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import ModelConfig
from pipeline.models import load_harmonizer
from pipeline.models.base import HarmonizeBatch, sample_seed, variant_seed
from pipeline.models.classifier import HarmonyClassifier
from pipeline.score import to_eval_scale
from pipeline.storage import filesystem, read_bytes, to_pyarrow
from pipeline.variants import expand_variants

runner = CliRunner()
TINY = ["--resolution", "64", "--steps", "2", "--no-progress"]


@pytest.fixture(scope="module")
def inverse_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The inverse model as `model assemble --direction inverse` makes it from the release:
    diffharmony-gen's UNet, cvae-gen's Harmony-VAE."""
    root = tmp_path_factory.mktemp("inverse") / "model"
    return write_tiny_model_dir(root, harmony_vae=True, direction="inverse")


@pytest.fixture(scope="module")
def forward_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model_dir(tmp_path_factory.mktemp("forward") / "model", harmony_vae=True)


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The release's harmony_classifier/model_state_dict.pth (a pickle)."""
    return write_harmony_classifier(tmp_path_factory.mktemp("release") / "harmony_classifier")


@pytest.fixture(scope="module")
def reals_manifest(demo_manifest: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The demo's real images and masks (no composite_uri), plus one row whose real is missing."""
    table = pq.read_table(demo_manifest).drop_columns(["composite_uri"])
    base = Path(demo_manifest).parent
    rows = [
        {**row, "real_uri": str(base / row["real_uri"]), "mask_uri": str(base / row["mask_uri"])}
        for row in table.to_pylist()
    ]
    rows.append({**rows[0], "sample_id": "lost", "real_uri": str(base / "real" / "lost.png")})
    path = tmp_path_factory.mktemp("reals") / "reals.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def _results(output: Path | str, options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    fs, path = filesystem(f"{output}/results", options or {})
    files = [f for f in fs.find(path) if f.endswith(".parquet")]
    return pads.dataset(files, filesystem=to_pyarrow(fs)).to_table().to_pylist()


def _pixels(uri: str, options: dict[str, Any] | None = None, mode: str = "RGB") -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(read_bytes(uri, options or {}))).convert(mode))


def _invoke(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


# --- units --------------------------------------------------------------------------------------


def test_variants_expand_rows_and_are_seeded_per_variant() -> None:
    table = pa.table({"sample_id": ["a", "b__v1"], "real_uri": ["ra", "rb"], "x": [1, 2]})
    expanded = expand_variants(table, 3).to_pydict()
    assert expanded["sample_id"] == [
        "a__v0", "a__v1", "a__v2", "b__v1__v0", "b__v1__v1", "b__v1__v2",
    ]  # fmt: skip
    assert expanded["source_sample_id"] == ["a"] * 3 + ["b__v1"] * 3
    assert expanded["variant"] == [0, 1, 2] * 2 and expanded["x"] == [1] * 3 + [2] * 3
    seeds = {variant_seed(0, "a", k) for k in range(3)} | {sample_seed(0, "a")}
    assert len(seeds) == 4  # every variant its own noise
    assert variant_seed(0, "a", 1) == variant_seed(0, "a", 1) != variant_seed(1, "a", 1)


def test_inverse_output_size_model_pastes_the_reals_background(inverse_dir: Path) -> None:
    """As the official inverse.py: the square output's background is the real image's."""
    config = ModelConfig(
        name="diffharmony", model_dir=str(inverse_dir), resolution=64, output_resolution=32,
        device="cpu", refine=False, direction="inverse", output_size="model",
    )  # fmt: skip
    model = load_harmonizer(config)
    real = torch.rand(3, 48, 48, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(1, 48, 48)
    mask[:, 12:36, 6:30] = 1
    output = model.harmonize(HarmonizeBatch(["r"], [real], [mask], [5]))[0]
    assert output.shape == (3, 32, 32)
    small_mask = torch.nn.functional.interpolate(mask[None], size=(32, 32), mode="nearest-exact")
    small_real = torch.nn.functional.interpolate(
        real[None], size=(32, 32), mode="bilinear", antialias=True
    )
    background = (small_mask[0] < 0.5).expand(3, -1, -1)
    torch.testing.assert_close(output[background], small_real[0][background], atol=1e-6, rtol=0)
    assert (output - small_real[0]).abs()[~background].mean() > 1e-2


def test_options_that_do_not_fit_an_inverse_run_are_refused(
    reals_manifest: str, demo_manifest: str, inverse_dir: Path, tmp_path: Path
) -> None:
    base = ["run", "-o", str(tmp_path / "o"), "--model", "diffharmony",
            "--model-dir", str(inverse_dir)]  # fmt: skip
    refined = runner.invoke(app, [*base, "-m", reals_manifest, "--direction", "inverse",
                                  "--refine"])  # fmt: skip
    assert refined.exit_code == 2 and "no stage 2" in refined.output
    forward_variants = runner.invoke(app, [*base, "-m", demo_manifest, "--variants", "2"])
    assert forward_variants.exit_code == 2 and "--direction inverse" in forward_variants.output
    # A forward run needs composites: the reals' manifest has none.
    no_composites = runner.invoke(app, [*base, "-m", reals_manifest, "--no-progress"])
    assert no_composites.exit_code == 2
    assert "missing required column 'composite_uri'" in no_composites.output


# --- the worked example, locally ----------------------------------------------------------------


def test_generate_select_harmonize_evaluate(
    ray_cluster: None,
    reals_manifest: str,
    inverse_dir: Path,
    forward_dir: Path,
    classifier_dir: Path,
    tmp_path: Path,
) -> None:
    generated = tmp_path / "generated"
    inverse = ["run", "-m", reals_manifest, "--model", "diffharmony", "--model-dir",
               str(inverse_dir), "--direction", "inverse", "--classifier", str(classifier_dir),
               "--allow-unsafe-pickle", *TINY]  # fmt: skip
    printed = _invoke(*inverse, "-o", str(generated), "--variants", "2", "--batch-size", "3")
    assert "18 samples, 16 ok, 2 error" in printed
    assert "generated composites vs the real" in printed and "unharmony_prob" in printed

    rows = _results(generated)
    manifest = {r["sample_id"]: r for r in pq.read_table(reals_manifest).to_pylist()}
    classifier = HarmonyClassifier.load(
        str(classifier_dir), device=torch.device("cpu"), allow_unsafe_pickle=True
    )
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == 16 and {r["direction"] for r in rows} == {"inverse"}
    for row in ok:
        source, k = row["source_sample_id"], row["variant"]
        assert row["sample_id"] == f"{source}__v{k}" and k in (0, 1)
        assert row["output_uri"].endswith(f"/images/{source}__v{k}.png")
        assert row["sample_seed"] == variant_seed(0, source, k)
        assert row["composite_uri"] is None and row["real_uri"] == manifest[source]["real_uri"]
        # The real's background, pixel-exact; a new foreground.
        real = _pixels(row["real_uri"])
        mask = _pixels(row["mask_uri"], mode="L") >= 128
        output = _pixels(row["output_uri"])
        np.testing.assert_array_equal(output[~mask], real[~mask])
        assert np.abs(output[mask].astype(int) - real[mask]).mean() > 1.0
        # Metrics of a generated composite: against the real; no input-vs-real baseline.
        assert row["fmse"] > 0 and row["bg_psnr"] == 100.0
        assert row["composite_mse"] is None and row["composite_psnr"] is None
        # unharmony_prob is the classifier's on the written pixels (up to batched kernels
        # rounding differently, ~1e-5; another image moves it by ~1e-1).
        written = torch.from_numpy(output.copy()).permute(2, 0, 1).float() / 255
        expected = classifier.unharmony_prob(to_eval_scale([written])).item()
        assert row["unharmony_prob"] == pytest.approx(expected, abs=2e-4)
        assert row["classifier_fingerprint"] == classifier.fingerprint
    variants = {(r["source_sample_id"], r["variant"]): r for r in ok}
    assert any(  # two variants of one real differ (their own seeds)
        (_pixels(variants[(s, 0)]["output_uri"]) != _pixels(variants[(s, 1)]["output_uri"])).any()
        for s, _ in variants
    )
    errors = [r for r in rows if r["status"] == "error"]
    assert sorted(r["sample_id"] for r in errors) == ["lost__v0", "lost__v1"]
    assert all("real not found" in r["error"] for r in errors)

    # A variant does not depend on its batch: another batch size, the same pixels (batched
    # kernels round differently, ~1e-6, which can flip a grey level; another seed changes the
    # foreground by tens).
    rebatched = tmp_path / "rebatched"
    _invoke(*inverse, "-o", str(rebatched), "--variants", "2", "--batch-size", "5")
    for row in ok:
        again = _pixels(str(rebatched / "images" / Path(row["output_uri"]).name)).astype(int)
        difference = np.abs(again - _pixels(row["output_uri"]))
        assert difference.max() <= 1 and difference.mean() < 1e-3

    # Resume per variant: a third variant later makes only the new ones (errors are retried).
    more = _invoke(*inverse, "-o", str(generated), "--variants", "3")
    assert "11 samples, 8 ok, 3 error" in more and "16 already done, skipped" in more

    # Stats and report show the new columns.
    stats = _invoke("stats", "--results", str(generated))
    assert "inverse harmonization: 24 generated composites from 8 real images (3 variants" in stats
    assert "unharmony_prob" in stats
    report = _invoke("report", "--results", str(generated), "--out", str(tmp_path / "r.html"),
                     "--metric", "unharmony_prob", "--count", "2")  # fmt: skip
    page = (tmp_path / "r.html").read_text()
    assert "report:" in report and "|generated - real| x 4" in page and "real (input)" in page

    # Keep the most unharmonious variant of each real: a training manifest.
    train = tmp_path / "train.parquet"
    selected = _invoke("select", "--results", str(generated), "--per-source-max",
                       "unharmony_prob", "--out", str(train))  # fmt: skip
    assert "selected 8 of 24 ok samples: the max unharmony_prob per source sample" in selected
    picked = pq.read_table(train).to_pylist()
    current = [r for r in _results(generated) if r["status"] == "ok"]
    for row in picked:
        candidates = [r for r in current if r["source_sample_id"] == row["generated_from"]]
        best = min(candidates, key=lambda r: (-r["unharmony_prob"], r["sample_id"]))  # ties: id
        assert row["sample_id"] == best["sample_id"]
        assert row["sample_id"] == f"{row['generated_from']}__v{row['generated_variant']}"
        assert row["composite_uri"] == best["output_uri"] and row["real_uri"] == best["real_uri"]
        assert row["metric_unharmony_prob"] == best["unharmony_prob"]
    assert {r["generated_from"] for r in picked} == {s for s, _ in variants}
    # The mildest variant of each real among those that changed the object enough.
    mild = tmp_path / "mild.parquet"
    _invoke("select", "--results", str(generated), "--where", "fg_delta_e > 1",
            "--per-source-min", "fmse", "--out", str(mild))  # fmt: skip
    kept = [r for r in current if r["fg_delta_e"] > 1]
    for row in pq.read_table(mild).to_pylist():
        candidates = [r for r in kept if r["source_sample_id"] == row["generated_from"]]
        mildest = min(candidates, key=lambda r: (r["fmse"], r["sample_id"]))
        assert row["sample_id"] == mildest["sample_id"]
    unknown = runner.invoke(app, ["select", "--results", str(generated), "--per-source-max",
                                  "sharpness", "--out", str(tmp_path / "x.parquet")])  # fmt: skip
    assert unknown.exit_code == 2 and "per source: 'max' or 'min' of a metric" in unknown.output

    # Harmonize the generated composites forward, score them, evaluate against the reals.
    harmonized = tmp_path / "harmonized"
    forward = _invoke("run", "-m", str(train), "-o", str(harmonized), "--model", "diffharmony",
                      "--model-dir", str(forward_dir), "--classifier", str(classifier_dir),
                      "--allow-unsafe-pickle", *TINY)  # fmt: skip
    assert "8 samples, 8 ok, 0 error" in forward and "MSE to ground truth" in forward
    forward_rows = _results(harmonized)
    assert {r["direction"] for r in forward_rows} == {"forward"}
    assert all(r["unharmony_prob"] is not None and r["composite_mse"] is not None
               for r in forward_rows)  # fmt: skip
    assert {r["generated_from"] for r in forward_rows} == {s for s, _ in variants}  # passed on
    table = _invoke("evaluate", "--results", str(harmonized))
    assert "iHarmony4 evaluation of 8 outputs" in table
    baseline = _invoke("evaluate", "--results", str(harmonized), "--composites")
    assert "iHarmony4 evaluation of 8 composites (unharmonized baseline)" in baseline


# --- on S3 ---------------------------------------------------------------------------------------


def test_inverse_and_classifier_on_s3(
    ray_cluster: None,
    s3_server: dict[str, Any],
    s3_bucket: str,
    reals_manifest: str,
    inverse_dir: Path,
    forward_dir: Path,
    classifier_dir: Path,
    tmp_path: Path,
) -> None:
    options = {k: v for k, v in s3_server.items() if k != "client_kwargs"}
    fs, _ = filesystem(f"s3://{s3_bucket}", s3_server)
    for name, folder in (("inverse", inverse_dir), ("forward", forward_dir),
                         ("classifier", classifier_dir)):  # fmt: skip
        fs.put(str(folder), f"{s3_bucket}/models/{name}", recursive=True)
    rows = pq.read_table(reals_manifest).to_pylist()[:3]
    for row in rows:
        for column in ("real_uri", "mask_uri"):
            key = f"{s3_bucket}/data/{Path(row[column]).parent.name}/{Path(row[column]).name}"
            fs.put_file(row[column], key)
            row[column] = f"{Path(row[column]).parent.name}/{Path(row[column]).name}"  # relative
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    fs.pipe_file(f"{s3_bucket}/data/reals.parquet", buffer.getvalue())
    storage = cli_args(options)
    env = {"HOME": str(tmp_path)}  # the node's model cache goes under ~/.cache
    out = f"s3://{s3_bucket}/generated"

    def invoke(*args: str) -> str:
        result = runner.invoke(app, [*args, *storage], env=env)
        assert result.exit_code == 0, result.output
        return result.output

    models = f"s3://{s3_bucket}/models"
    printed = invoke("run", "-m", f"s3://{s3_bucket}/data/reals.parquet", "-o", out,
                     "--model", "diffharmony", "--model-dir", f"{models}/inverse",
                     "--direction", "inverse", "--variants", "2", "--classifier",
                     f"{models}/classifier", "--allow-unsafe-pickle", *TINY)  # fmt: skip
    assert "6 samples, 6 ok, 0 error" in printed
    results = _results(out, s3_server)
    assert sorted(r["sample_id"] for r in results) == sorted(
        f"{r['sample_id']}__v{k}" for r in rows for k in (0, 1)
    )
    for row in results:
        assert row["output_uri"].startswith(f"s3://{s3_bucket}/generated/images/")
        assert row["unharmony_prob"] is not None
        real = _pixels(row["real_uri"], s3_server)
        mask = _pixels(row["mask_uri"], s3_server, "L") >= 128
        np.testing.assert_array_equal(_pixels(row["output_uri"], s3_server)[~mask], real[~mask])

    train = f"s3://{s3_bucket}/train/most_unharmonious.parquet"
    invoke("select", "--results", out, "--per-source-max", "unharmony_prob", "--out", train)
    forward = invoke("run", "-m", train, "-o", f"s3://{s3_bucket}/harmonized", "--model",
                     "diffharmony", "--model-dir", f"{models}/forward", *TINY)  # fmt: skip
    assert "3 samples, 3 ok, 0 error" in forward
    table = invoke("evaluate", "--results", f"s3://{s3_bucket}/harmonized")
    assert "iHarmony4 evaluation of 3 outputs" in table


def test_progress_total_counts_variants_and_skips_done_ones(tmp_path: Path) -> None:
    """The progress bar's total: a row per variant, less the variants done earlier."""
    from pipeline.config import RunConfig
    from pipeline.manifest import Manifest
    from pipeline.run import rows_to_do

    ids = pa.array(["a", "b", "c"])
    manifest = Manifest("m", ["m"], "", pa.schema([]), 3, None, ids)
    inverse = ModelConfig(name="diffharmony", model_dir=str(tmp_path), direction="inverse",
                          refine=False)  # fmt: skip
    config = RunConfig(manifest="m", output=str(tmp_path), model=inverse, variants=4)
    assert rows_to_do(config, manifest, pa.array([], pa.string())) == 12
    assert rows_to_do(config, manifest, pa.array(["a__v0", "a__v3", "x__v0", "a"])) == 10
    forward = RunConfig(manifest="m", output=str(tmp_path))
    assert rows_to_do(forward, manifest, pa.array(["a", "zz"])) == 2
