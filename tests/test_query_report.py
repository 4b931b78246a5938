"""`harmonize stats / select / report` on the results of a real pipeline run of the demo set.

One Reinhard run (128 px) per module; every test reads its results. The metrics the actor
wrote are checked against the images on disk; select's manifest is run through the pipeline
again; the report is parsed (every thumbnail decodes) and rendered in headless Chromium.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image
from skimage.metrics import mean_squared_error
from storage_args import cli_args
from tiny_checkpoint import write_harmony_classifier
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import ModelConfig, RunConfig
from pipeline.manifest import open_manifest
from pipeline.results import ResultsError, read_results
from pipeline.run import run
from pipeline.score import BG_PSNR_CAP
from pipeline.storage import filesystem
from pipeline.tools.report import IMAGE_KINDS, build_report
from pipeline.tools.selection import MANIFEST_METRIC_PREFIX, select_samples
from schemas.results import METRIC_COLUMNS, RESULTS_SCHEMA

RUN_ID = "metrics-run"


@pytest.fixture(scope="module")
def demo_run(
    ray_cluster: None, demo_manifest: str, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, pa.Table]:
    """(output prefix, results table) of one run of the demo set, scored by the harmony
    classifier too (the release's pickled state dict)."""
    output = str(tmp_path_factory.mktemp("query") / "output")
    classifier = write_harmony_classifier(tmp_path_factory.mktemp("release") / "classifier")
    config = RunConfig(
        manifest=demo_manifest, output=output,
        model=ModelConfig(resolution=128, allow_unsafe_pickle=True), batch_size=3,
        show_progress=False, run_id=RUN_ID, classifier=str(classifier),
    )  # fmt: skip
    summary = run(config)
    assert (summary.ok, summary.error) == (8, 0), summary.errors
    table = read_results(os.path.join(output, "results"), {})
    assert table is not None
    return output, table


def decode(path: str, mode: str = "RGB") -> np.ndarray:
    return np.asarray(Image.open(path).convert(mode))


def invoke(*args: str) -> Any:
    result = CliRunner().invoke(app, list(args))
    assert "Traceback" not in result.output, result.output
    return result


# --- metrics written by the actor ------------------------------------------------------------


def test_results_hold_every_metric_and_they_match_the_files(demo_run: tuple[str, pa.Table]) -> None:
    _, table = demo_run
    for name in METRIC_COLUMNS:
        field = table.schema.field(name)
        assert field.type == pa.float64()
        assert b"better" in RESULTS_SCHEMA.field(name).metadata
        assert table[name].null_count == 0, name  # the demo has ground truth for every sample
    for row in table.to_pylist():
        output = decode(row["output_uri"]).astype(float)
        composite = decode(row["composite_uri"]).astype(float)
        real = decode(row["real_uri"]).astype(float)
        mask = decode(row["mask_uri"], "L") >= 128
        # Full-resolution metrics, recomputed from the files written and read.
        assert row["mse_full"] == pytest.approx(mean_squared_error(output, real))
        assert row["psnr_full"] == pytest.approx(10 * math.log10(255**2 / row["mse_full"]))
        # Reinhard changes only the foreground: the background is the composite's exactly.
        assert row["bg_psnr"] == BG_PSNR_CAP
        assert row["fg_change"] == pytest.approx(np.abs(output - composite)[mask].mean())
        assert row["mask_area"] == pytest.approx(mask.mean())
        # Colour transfer matches the foreground's Lab statistics to the background's.
        assert row["lab_gap_after"] < row["lab_gap_before"]
        assert 0.5 < row["sharpness_ratio"] < 2.0
        assert 0.0 < row["ssim"] <= 1.0


# --- stats -----------------------------------------------------------------------------------


def test_stats_counts_quantiles_and_subset_means(demo_run: tuple[str, pa.Table]) -> None:
    output, table = demo_run
    result = invoke("stats", "--results", output)
    assert result.exit_code == 0, result.output
    assert "rows: 8 (ok 8, error 0)" in result.output
    for name in METRIC_COLUMNS:
        assert f"\n{name} " in result.output
    assert "\ndemo " in result.output and "\nAll " in result.output
    assert "ran on: cpu (8)" in result.output  # where the model ran, from each row

    result = invoke("stats", "--results", output, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["rows"] == {"total": 8, "ok": 8, "error": 0}
    for name in METRIC_COLUMNS:
        values = table[name].to_numpy()
        metric = summary["metrics"][name]
        assert metric["count"] == 8
        assert metric["mean"] == pytest.approx(values.mean())
        assert metric["quantiles"]["0.5"] == pytest.approx(np.median(values))
        assert metric["quantiles"]["0.05"] == pytest.approx(np.quantile(values, 0.05))
        assert (metric["min"], metric["max"]) == pytest.approx((values.min(), values.max()))
    subsets = {row["subset"]: row for row in summary["subsets"]}
    assert set(subsets) == {"demo", "All"} and subsets["demo"]["images"] == 8
    assert summary["devices"] == {"cpu": 8}
    # The reference-free filter against the ground truth, counted over the same rows.
    rows = table.to_pylist()
    keep = [
        r["bg_psnr"] > 35 and r["fg_delta_e_p95"] < 12 and abs(r["fg_hue_shift"]) < 30
        and r["fg_structure"] > 0.8 for r in rows
    ]  # fmt: skip
    better = [r["mse"] < r["composite_mse"] for r in rows]
    quality = summary["quality_filter"]
    assert quality["kept_better"] == sum(k and b for k, b in zip(keep, better))
    assert quality["rejected_worse"] == sum(not k and not b for k, b in zip(keep, better))
    assert sum(v for k, v in quality.items() if k != "condition") == 8
    assert subsets["demo"]["means"]["fmse"] == pytest.approx(table["fmse"].to_numpy().mean())

    median = float(np.median(table["psnr"].to_numpy()))
    result = invoke("stats", "--results", output, "--where", f"psnr > {median}", "--json")
    assert json.loads(result.output)["samples"]["matching"] == 4


# --- select ----------------------------------------------------------------------------------


def test_select_writes_a_smaller_manifest_that_the_pipeline_reads_back(
    demo_run: tuple[str, pa.Table], tmp_path: Path
) -> None:
    output, table = demo_run
    median = float(np.median(table["psnr"].to_numpy()))
    where = f"bg_psnr > 35 AND lab_gap_after < lab_gap_before AND psnr > {median!r}"
    expected = sorted(
        r["sample_id"]
        for r in table.to_pylist()
        if r["bg_psnr"] > 35 and r["lab_gap_after"] < r["lab_gap_before"] and r["psnr"] > median
    )
    assert 0 < len(expected) < 8
    out = str(tmp_path / "train" / "manifest.parquet")
    result = invoke("select", "--results", output, "--where", where, "--out", out,
                    "--metric", "bg_psnr", "--metric", "psnr")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"selected {len(expected)} of 8 ok samples" in result.output

    manifest = pq.read_table(out)
    assert manifest["sample_id"].to_pylist() == expected
    by_id = {r["sample_id"]: r for r in table.to_pylist()}
    for row in manifest.to_pylist():
        source = by_id[row["sample_id"]]
        assert row["image_uri"] == row["composite_uri"] == source["output_uri"]
        assert row["mask_uri"] == source["mask_uri"] and row["real_uri"] == source["real_uri"]
        assert row["source_composite_uri"] == source["composite_uri"]
        assert row["source_run_id"] == RUN_ID and row["source_model"] == "reinhard"
        assert row[f"{MANIFEST_METRIC_PREFIX}psnr"] == source["psnr"]
        assert row["subset"] == "demo" and row["photo"] == source["photo"]
    assert f"{MANIFEST_METRIC_PREFIX}mse" not in manifest.column_names  # only the chosen ones

    # A valid manifest: the pipeline reads it back and harmonizes the selected samples.
    assert open_manifest(out, {}).num_rows == len(expected)
    config = RunConfig(manifest=out, output=str(tmp_path / "again"),
                       model=ModelConfig(resolution=128), show_progress=False)  # fmt: skip
    summary = run(config)
    assert (summary.samples, summary.ok, summary.error) == (len(expected), len(expected), 0)


def test_where_errors_are_messages_not_tracebacks(
    demo_run: tuple[str, pa.Table], tmp_path: Path
) -> None:
    output, _ = demo_run
    out = str(tmp_path / "m.parquet")
    cases = {
        "no_such_column > 1": "no column 'no_such_column' in the results",
        "psnr >": "not valid SQL",
        "psnr > 1); SELECT 1; SELECT (1": "single condition",
        "EXISTS (SELECT * FROM read_csv('/etc/hostname'))": "disabled",
        "": "--where is empty",
    }
    for where, message in cases.items():
        result = invoke("select", "--results", output, "--where", where, "--out", out)
        assert result.exit_code == 2, (where, result.output)
        assert message in result.output, (where, result.output)
        assert not os.path.exists(out)
    result = invoke("stats", "--results", str(tmp_path / "nothing"))
    assert result.exit_code == 2 and "no results at" in result.output


def _write_results(table: pa.Table, folder: Path) -> None:
    folder.mkdir(parents=True)
    pq.write_table(table, folder / "part-000000.parquet")


def test_results_older_than_a_metric(demo_run: tuple[str, pa.Table], tmp_path: Path) -> None:
    """Results written before the new metrics: a clear message naming the column."""
    _, table = demo_run
    new = ["ssim", "mse_full", "psnr_full", "bg_psnr", "fg_change", "lab_gap_before",
           "lab_gap_after", "sharpness_ratio", "mask_area"]  # fmt: skip
    old = table.drop_columns(new)
    _write_results(old, tmp_path / "old" / "results" / "old-run")
    result = invoke("select", "--results", str(tmp_path / "old"), "--where", "bg_psnr > 35",
                    "--out", str(tmp_path / "m.parquet"))  # fmt: skip
    assert result.exit_code == 2
    assert "no column 'bg_psnr'" in result.output and "written before" in result.output
    assert "re-run the pipeline" in result.output.lower()
    # What the old results do have still works, and stats says what they lack.
    result = invoke("select", "--results", str(tmp_path / "old"), "--where", "psnr > 0",
                    "--out", str(tmp_path / "m.parquet"))  # fmt: skip
    assert result.exit_code == 0 and "selected 8 of 8" in result.output
    result = invoke("stats", "--results", str(tmp_path / "old"))
    assert result.exit_code == 0 and "not in these results" in result.output
    assert "lab_gap_after" in result.output.split("not in these results")[1]

    # An old run and a newer one side by side: the schema is the union of both files' (the
    # old file sorts first), and each sample's newest row is the one queried.
    mixed = tmp_path / "mixed" / "results"
    hour_earlier = pc.subtract(old["created_at"], pa.scalar(3_600_000_000, pa.duration("us")))
    index = old.schema.get_field_index("created_at")
    _write_results(old.set_column(index, "created_at", hour_earlier), mixed / "a-old")
    _write_results(table, mixed / "b-new")
    selection = select_samples(
        str(tmp_path / "mixed"), "bg_psnr >= 100", str(tmp_path / "n.parquet")
    )
    assert (selection.ok_samples, selection.selected) == (8, 8)


def test_several_parameter_sets_need_params_hash(
    demo_run: tuple[str, pa.Table], tmp_path: Path
) -> None:
    _, table = demo_run
    other = table.set_column(table.schema.get_field_index("params_hash"), "params_hash",
                             pa.array(["other-params"] * table.num_rows))  # fmt: skip
    _write_results(table, tmp_path / "out" / "results" / "run-a")
    _write_results(other, tmp_path / "out" / "results" / "run-b")
    with pytest.raises(ResultsError, match="2 parameter sets"):
        select_samples(str(tmp_path / "out"), "psnr > 0", str(tmp_path / "m.parquet"))
    chosen = select_samples(str(tmp_path / "out"), "psnr > 0", str(tmp_path / "m.parquet"),
                    params_hash="other-params")  # fmt: skip
    assert chosen.selected == 8
    assert set(pq.read_table(tmp_path / "m.parquet")["source_params_hash"].to_pylist()) == {
        "other-params"
    }


def test_select_and_stats_on_s3(
    demo_run: tuple[str, pa.Table], s3_server: dict[str, Any], s3_bucket: str
) -> None:
    output, table = demo_run
    fs, _ = filesystem(f"s3://{s3_bucket}", s3_server)
    fs.put(os.path.join(output, "results"), f"{s3_bucket}/out/results", recursive=True)
    s3 = cli_args(s3_server)
    out = f"s3://{s3_bucket}/train/manifest.parquet"
    result = invoke("select", "--results", f"s3://{s3_bucket}/out", "--where",
                    "mask_area > 0.1 AND bg_psnr > 35", "--out", out, *s3)  # fmt: skip
    assert result.exit_code == 0, result.output
    expected = sorted(r["sample_id"] for r in table.to_pylist() if r["mask_area"] > 0.1)
    assert 0 < len(expected) < 8
    manifest = open_manifest(out, s3_server)
    assert manifest.num_rows == len(expected)
    with fs.open(f"{s3_bucket}/train/manifest.parquet", "rb") as handle:
        assert pq.read_table(handle)["sample_id"].to_pylist() == expected
    result = invoke("stats", "--results", f"s3://{s3_bucket}/out/results/{RUN_ID}", *s3)
    assert result.exit_code == 0 and "rows: 8 (ok 8, error 0)" in result.output


# --- report ----------------------------------------------------------------------------------


class _Page(HTMLParser):
    """Collects <img> sources, every src/href, the metric panels and the sample sections."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.links: list[str] = []
        self.metrics: list[str] = []
        self.sections: list[list[str]] = []
        self.missing = 0
        self.csp = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.links += [v or "" for k, v in attrs if k in ("src", "href")]
        if tag == "img":
            self.images.append(a["src"] or "")
        if tag == "meta" and a.get("http-equiv") == "Content-Security-Policy":
            self.csp = a.get("content") or ""
        if tag == "h3":
            self.sections.append([])
        if a.get("data-metric"):
            self.metrics.append(a["data-metric"] or "")
        if a.get("data-sample-id") is not None:
            self.sections[-1].append(a["data-sample-id"] or "")
        if "missing" in (a.get("class") or "").split():
            self.missing += 1


def parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text())
    return page


@pytest.fixture(scope="module")
def report(demo_run: tuple[str, pa.Table], tmp_path_factory: pytest.TempPathFactory) -> Path:
    output, _ = demo_run
    path = tmp_path_factory.mktemp("report") / "report.html"
    result = invoke("report", "--results", output, "--out", str(path), "--count", "3",
                    "--metric", "psnr")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "45 thumbnails" in result.output and "failed" not in result.output
    return path


def test_report_is_self_contained_and_every_thumbnail_decodes(
    report: Path, demo_run: tuple[str, pa.Table]
) -> None:
    _, table = demo_run
    page = parse(report)
    # Best, worst and random 3: composite, harmonized, mask, real and |harmonized - composite|.
    assert len(page.images) == 3 * 3 * (len(IMAGE_KINDS) + 1)
    for src in page.images:
        assert src.startswith("data:image/jpeg;base64,")
        image = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        image.load()
        assert image.format == "JPEG" and 0 < max(image.size) <= 192
    assert all(link.startswith("data:") for link in page.links)
    assert "default-src 'none'" in page.csp and "img-src data:" in page.csp
    assert page.missing == 0
    assert page.metrics == METRIC_COLUMNS  # a histogram for every metric
    ranked = sorted(table.to_pylist(), key=lambda r: (-r["psnr"], r["sample_id"]))
    best, worst, random = page.sections
    assert best == [r["sample_id"] for r in ranked[:3]]
    assert worst == [r["sample_id"] for r in ranked[::-1][:3]]
    assert len(set(random)) == 3
    text = report.read_text()
    assert "<p>ran on: cpu (8)</p>" in text
    # Composite MSE against output MSE, one point per sample with ground truth.
    assert 'data-points="8"' in text and text.count("<circle ") == 8
    worse = sum(r["mse"] >= r["composite_mse"] for r in table.to_pylist())
    assert f"{8 - worse} closer to the ground truth" in text and f"{worse} further" in text


def test_report_shows_an_image_it_cannot_read(
    demo_run: tuple[str, pa.Table], tmp_path: Path
) -> None:
    _, table = demo_run
    ids = table["sample_id"].to_pylist()
    broken = [str(tmp_path / "gone.png") if i == 0 else uri
              for i, uri in enumerate(table["output_uri"].to_pylist())]  # fmt: skip
    index = table.schema.get_field_index("output_uri")
    _write_results(table.set_column(index, "output_uri", pa.array(broken)),
                   tmp_path / "out" / "results" / "r")  # fmt: skip
    summary = build_report(str(tmp_path / "out"), str(tmp_path / "r.html"), count=8)
    assert summary.failed and all(ids[0] in message for message in summary.failed)
    assert "FileNotFoundError" in summary.failed[0]
    page = parse(tmp_path / "r.html")
    # Sections of 8 of 8 samples: the sample is in all three, without its harmonized image
    # and so without its difference image.
    assert page.missing == 6
    assert len(page.images) == 3 * 8 * (len(IMAGE_KINDS) + 1) - 6
    # The command says so on stderr and exits 1; the page is still written.
    (tmp_path / "r.html").unlink()
    result = invoke("report", "--results", str(tmp_path / "out"), "--out",
                    str(tmp_path / "r.html"), "--count", "8")  # fmt: skip
    assert result.exit_code == 1, result.output
    assert f"error: 1 of {8 * len(IMAGE_KINDS)} images could not be shown" in result.output
    assert (tmp_path / "r.html").is_file()


def test_relative_output_is_stored_absolute(
    ray_cluster: None, demo_manifest: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--output RelOut: results name the images absolutely, so report and the manifest that
    select writes work from any folder."""
    (tmp_path / "here").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    result = invoke("run", "-m", demo_manifest, "-o", "RelOut", "--resolution", "64",
                    "--no-progress")  # fmt: skip
    assert result.exit_code == 0, result.output
    output = tmp_path / "here" / "RelOut"
    table = read_results(str(output / "results"), {})
    assert table is not None and table.num_rows == 8
    for uri in table["output_uri"].to_pylist():
        assert uri.startswith(str(output / "images") + "/") and Path(uri).is_file()

    monkeypatch.chdir(tmp_path / "elsewhere")
    report = invoke("report", "--results", str(output), "--out", "r.html", "--count", "2")
    assert report.exit_code == 0 and "failed" not in report.output, report.output
    selected = invoke("select", "--results", str(output), "--where", "true", "--out", "s.parquet")
    assert selected.exit_code == 0, selected.output
    manifest = open_manifest("s.parquet", {})
    rows = pq.read_table(manifest.files[0]).to_pylist()
    assert len(rows) == 8 and all(Path(row["composite_uri"]).is_file() for row in rows)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="chromium is not installed (`make install` installs Debian's chromium when run as "
    "root; or: apt-get install chromium)",
)
def test_report_renders_in_headless_chromium(report: Path, tmp_path: Path) -> None:
    """Every image loads (counted by the page's own script) and nothing reaches the console."""
    command = [
        str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr",
        "--v=0", "--virtual-time-budget=10000", "--dump-dom", report.as_uri(),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    body = done.stdout[done.stdout.index("<body") :].split(">", 1)[0]
    attributes = dict(part.split("=", 1) for part in body.split()[1:] if "=" in part)
    total = 3 * 3 * (len(IMAGE_KINDS) + 1)
    assert attributes.get("data-images-total") == f'"{total}"', body
    assert attributes.get("data-images-loaded") == f'"{total}"', body
    assert attributes.get("data-images-broken") == '"0"', body
    # Console output: a script error, a CSP violation (a resource from elsewhere), a failed load.
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    assert console == [], console
