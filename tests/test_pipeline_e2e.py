"""End to end through the real Ray Data pipeline: local folder and S3 (moto server)."""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import ModelConfig, RunConfig
from pipeline.datasets.demo import build_demo
from pipeline.results import read_results, run_folder
from pipeline.run import run
from pipeline.storage import filesystem, read_bytes, resolve


def run_results(config: RunConfig) -> pa.Table:
    table = read_results(run_folder(config.output, config.run_id), config.storage_options)
    assert table is not None, "the run wrote no results"
    return table


def decode(uri: str, options: dict[str, Any], mode: str = "RGB") -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(read_bytes(uri, options))).convert(mode))


def manifest_rows(manifest_uri: str, options: dict[str, Any]) -> list[dict[str, Any]]:
    fs, path = filesystem(manifest_uri, options)
    with fs.open(path, "rb") as handle:
        return pq.read_table(handle).to_pylist()


def check_outputs(config: RunConfig, manifest_uri: str) -> pa.Table:
    """Every image exists, decodes, has its input's size; background pixels are unchanged."""
    options = config.storage_options
    base_dir = manifest_uri.rsplit("/", 1)[0]
    rows = manifest_rows(manifest_uri, options)
    results = run_results(config)
    assert sorted(results.column("sample_id").to_pylist()) == sorted(r["sample_id"] for r in rows)
    by_id = {r["sample_id"]: r for r in results.to_pylist()}
    for row in rows:
        result = by_id[row["sample_id"]]
        assert result["status"] == "ok", result["error"]
        composite = decode(resolve(base_dir, row["composite_uri"]), options)
        mask = decode(resolve(base_dir, row["mask_uri"]), options, "L") >= 128
        harmonized = decode(result["output_uri"], options)
        assert harmonized.shape == composite.shape
        assert (result["height"], result["width"]) == composite.shape[:2]
        np.testing.assert_array_equal(harmonized[~mask], composite[~mask])
        assert np.abs(harmonized[mask].astype(int) - composite[mask]).mean() > 1.0
        assert result["subset"] == row["subset"] and result["photo"] == row["photo"]
    return results


def test_demo_run_local(ray_cluster: None, demo_manifest: str, output_dir: str) -> None:
    """The demo as `make demo` runs it (Reinhard, default parameters; batches of 3 here): the
    README shows its summary line, so that line must be what this run prints."""
    config = RunConfig(
        manifest=demo_manifest, output=output_dir, batch_size=3, show_progress=False
    )  # fmt: skip
    summary = run(config)
    assert (summary.samples, summary.ok, summary.error) == (8, 8, 0)
    results = check_outputs(config, demo_manifest)
    mse = results.column("mse").to_numpy()
    composite_mse = results.column("composite_mse").to_numpy()
    assert summary.mse == pytest.approx(mse.mean())
    assert summary.composite_mse == pytest.approx(composite_mse.mean())
    assert (summary.better, summary.worse) == (
        (mse < composite_mse).sum(),
        (mse >= composite_mse).sum(),
    )
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    (line,) = [x for x in summary.text().splitlines() if x.startswith("MSE to ground truth")]
    assert f"\n{line}\n" in readme, line
    assert set(results.column("model").to_pylist()) == {"reinhard"}
    assert results.schema.field("created_at").type == pa.timestamp("us", tz="UTC")


def test_demo_run_on_s3(ray_cluster: None, s3_server: dict[str, Any], s3_bucket: str) -> None:
    manifest = build_demo(f"s3://{s3_bucket}/demo", s3_server)
    config = RunConfig(
        manifest=manifest, output=f"s3://{s3_bucket}/run", model=ModelConfig(resolution=256),
        storage_options=s3_server, batch_size=4, show_progress=False,
    )  # fmt: skip
    summary = run(config)
    assert (summary.samples, summary.ok) == (8, 8)
    results = check_outputs(config, manifest)
    assert all(
        uri.startswith(f"s3://{s3_bucket}/run/images/") for uri in results["output_uri"].to_pylist()
    )


def test_bad_rows_become_error_rows(ray_cluster: None, tmp_path: Any) -> None:
    root = tmp_path / "data"
    manifest = build_demo(str(root))
    table = pq.read_table(manifest)
    extra = pa.table(
        {
            "sample_id": ["missing", "corrupt"],
            "composite_uri": ["composites/nothing-here.png", "corrupt.png"],
            "mask_uri": ["masks/astronaut_0.png", "masks/astronaut_0.png"],
            "real_uri": [None, None],
            "subset": ["demo", "demo"],
            "photo": ["none", "none"],
        },
        schema=table.schema,
    )
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    pq.write_table(pa.concat_tables([table, extra]), manifest)
    config = RunConfig(manifest=manifest, output=str(tmp_path / "out"),
                       model=ModelConfig(resolution=128), show_progress=False)  # fmt: skip
    summary = run(config)
    assert (summary.samples, summary.ok, summary.error) == (10, 8, 2)
    errors = {r["sample_id"]: r for r in run_results(config).to_pylist() if r["status"] == "error"}
    assert "'missing'" in errors["missing"]["error"] and "not found" in errors["missing"]["error"]
    assert (
        "'corrupt'" in errors["corrupt"]["error"] and "readable image" in errors["corrupt"]["error"]
    )
    assert errors["missing"]["output_uri"] is None


def test_cli_run_output_size_model(ray_cluster: None, demo_manifest: str, output_dir: str) -> None:
    result = CliRunner().invoke(
        app,
        ["run", "--manifest", demo_manifest, "--output", output_dir, "--resolution", "128",
         "--output-size", "model", "--format", "webp", "--no-progress", "--run-id", "cli-test"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "8 ok, 0 error" in result.output and "images/s" in result.output
    config = replace(RunConfig(manifest=demo_manifest, output=output_dir), run_id="cli-test")
    for uri in run_results(config)["output_uri"].to_pylist():
        assert uri.endswith(".webp") and decode(uri, {}).shape == (256, 256, 3)


def test_invalid_manifest_fails_before_the_run(tmp_path: Any) -> None:
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"sample_id": ["a", "a"], "composite_uri": ["x", "y"]}), manifest)
    result = CliRunner().invoke(app, ["run", "-m", str(manifest), "-o", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "missing required column 'mask_uri'" in result.output


def test_diffharmony_cli_through_ray_is_deterministic(
    ray_cluster: None, demo_manifest: str, tmp_path: Any
) -> None:
    """The tiny random-weight checkpoint, in the official layout, through the real pipeline."""
    from tiny_checkpoint import write_tiny_model_dir

    model_dir = write_tiny_model_dir(tmp_path / "model")
    outputs = {}
    for batch_size in (3, 1):
        output = str(tmp_path / f"out-b{batch_size}")
        result = CliRunner().invoke(
            app,
            ["run", "-m", demo_manifest, "-o", output, "--model", "diffharmony",
             "--model-dir", str(model_dir), "--resolution", "64", "--steps", "2",
             "--batch-size", str(batch_size), "--no-progress", "--run-id", "tiny"],
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        assert "8 ok, 0 error" in result.output
        config = RunConfig(manifest=demo_manifest, output=output, run_id="tiny")
        results = check_outputs(config, demo_manifest)
        assert set(results["model"].to_pylist()) == {"diffharmony"}
        assert len(set(results["model_fingerprint"].to_pylist())) == 1
        outputs[batch_size] = {
            r["sample_id"]: decode(r["output_uri"], {}).astype(int) for r in results.to_pylist()
        }
    # A sample's output does not depend on its batch (float rounding may move one grey level).
    for sample_id, image in outputs[3].items():
        assert np.abs(image - outputs[1][sample_id]).max() <= 1


def test_diffharmony_model_dir_on_s3(
    ray_cluster: None, s3_server: dict[str, Any], s3_bucket: str, tmp_path: Any
) -> None:
    from tiny_checkpoint import write_tiny_model_dir

    model_dir = write_tiny_model_dir(tmp_path / "model")
    fs, _ = filesystem(f"s3://{s3_bucket}", s3_server)
    fs.put(str(model_dir), f"{s3_bucket}/models/tiny", recursive=True)
    manifest = build_demo(f"s3://{s3_bucket}/demo", s3_server)
    model = ModelConfig(
        name="diffharmony", model_dir=f"s3://{s3_bucket}/models/tiny", resolution=64, steps=1,
        refine=False, cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    config = RunConfig(manifest=manifest, output=f"s3://{s3_bucket}/out", model=model,
                       storage_options=s3_server, show_progress=False)  # fmt: skip
    summary = run(config)
    assert (summary.samples, summary.ok) == (8, 8), summary.errors
    check_outputs(config, manifest)


def test_folder_manifest_whose_files_differ(
    ray_cluster: None, demo_manifest: str, tmp_path: Path
) -> None:
    """The second file widens a column and adds one: every row keeps both, typed as unified."""
    table = pq.read_table(demo_manifest)
    base = Path(demo_manifest).parent
    for column in ("composite_uri", "mask_uri", "real_uri"):
        absolute = [str(base / uri) for uri in table[column].to_pylist()]
        table = table.set_column(table.schema.get_field_index(column), column, pa.array(absolute))
    folder = tmp_path / "manifest"
    folder.mkdir()
    first, second = table.slice(0, 4), table.slice(4)
    pq.write_table(
        first.append_column("score", pa.array(range(4), pa.int32())), folder / "a.parquet"
    )
    second = second.append_column("score", pa.array([2**40 + i for i in range(4)], pa.int64()))
    pq.write_table(second.append_column("note", pa.array(["late"] * 4)), folder / "b.parquet")

    config = RunConfig(str(folder), str(tmp_path / "out"), model=ModelConfig(resolution=64),
                       show_progress=False)  # fmt: skip
    summary = run(config)
    assert (summary.ok, summary.error) == (8, 0), summary.errors
    results = run_results(config)
    assert results.schema.field("score").type == pa.int64()
    rows = {r["sample_id"]: r for r in results.to_pylist()}
    ids = table["sample_id"].to_pylist()
    assert [rows[i]["score"] for i in ids] == [0, 1, 2, 3] + [2**40 + i for i in range(4)]
    assert [rows[i]["note"] for i in ids] == [None] * 4 + ["late"] * 4
