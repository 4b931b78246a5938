"""Incremental runs, a reused run id, resume after the driver is SIGKILLed (resumed under the
same run id), actor death and retry."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from bench.common import grown_manifest
from pipeline.cli import app
from pipeline.config import ModelConfig, RunConfig
from pipeline.harmonize import HarmonizeActor
from pipeline.results import list_runs, read_results
from pipeline.run import run
from pipeline.tools.selection import select_samples
from pipeline.tools.stats import stats

REPO = Path(__file__).resolve().parent.parent


def all_results(output: str) -> pa.Table:
    table = read_results(os.path.join(output, "results"), {})
    assert table is not None
    return table


def test_incremental_runs_process_only_new_samples(
    ray_cluster: None, demo_manifest: str, tmp_path: Path
) -> None:
    output = str(tmp_path / "out")
    small = pq.read_table(demo_manifest).slice(0, 3)
    pq.write_table(small, Path(demo_manifest).parent / "small.parquet")
    model = ModelConfig(resolution=128)

    def config(manifest: str, run_id: str, model: ModelConfig = model) -> RunConfig:
        return RunConfig(manifest, output, model=model, run_id=run_id, show_progress=False)

    first = run(config(str(Path(demo_manifest).parent / "small.parquet"), "day1"))
    assert (first.samples, first.skipped) == (3, 0)
    second = run(config(demo_manifest, "day2"))  # the manifest grew from 3 to 8 samples
    assert (second.samples, second.ok, second.skipped) == (5, 5, 3)
    third = run(config(demo_manifest, "day3"))
    assert (third.samples, third.skipped) == (0, 8)
    ids = all_results(output)["sample_id"].to_pylist()
    assert len(ids) == len(set(ids)) == 8
    # A changed parameter is another model output: everything is processed again.
    changed = run(config(demo_manifest, "day4", ModelConfig(resolution=64)))
    assert (changed.samples, changed.skipped) == (8, 0)

    runs = list_runs(output, {}).to_pylist()
    assert [(r["run_id"], r["ok"], r["error"]) for r in runs] == [
        ("day1", 3, 0), ("day2", 5, 0), ("day4", 8, 0),
    ]  # fmt: skip
    assert runs[0]["params_hash"] == runs[1]["params_hash"] != runs[2]["params_hash"]
    listed = CliRunner().invoke(app, ["runs", "--output", output])
    assert listed.exit_code == 0, listed.output
    lines = [line.split() for line in listed.output.splitlines()[1:]]
    assert [(line[0], line[3], line[4]) for line in lines] == [
        ("day1", "3", "0"), ("day2", "5", "0"), ("day4", "8", "0"),
    ]  # fmt: skip


def test_reusing_a_run_id_keeps_every_result(
    ray_cluster: None, demo_manifest: str, tmp_path: Path
) -> None:
    """A scheduler retrying with the same --run-id, after a partial and after a complete run."""
    full = grown_manifest(demo_manifest, tmp_path / "full.parquet", 8)  # 8 samples
    partial = tmp_path / "partial.parquet"
    pq.write_table(pq.read_table(full).slice(0, 3), partial)
    output = str(tmp_path / "out")

    def config(manifest: str) -> RunConfig:
        return RunConfig(
            manifest, output, model=ModelConfig(resolution=64), run_id="daily",
            results_rows_per_file=2, show_progress=False,
        )  # fmt: skip

    first = run(config(str(partial)))
    assert (first.samples, first.ok) == (3, 3)
    second = run(config(full))  # the same id: the other 5, beside the first 3
    assert (second.samples, second.ok, second.skipped) == (5, 5, 3)
    third = run(config(full))  # the same id after a complete run: nothing to do, nothing lost
    assert (third.samples, third.skipped) == (0, 8)
    results = all_results(output)
    ids = results["sample_id"].to_pylist()
    assert len(ids) == len(set(ids)) == 8 and set(results["status"].to_pylist()) == {"ok"}
    assert set(results["run_id"].to_pylist()) == {"daily"}


@pytest.mark.parametrize("run_ids", [("one", "two"), ("same", "same")])
def test_two_concurrent_runs_into_one_output(
    ray_cluster: None, demo_manifest: str, tmp_path: Path, run_ids: tuple[str, str]
) -> None:
    """Neither run sees the other's results, so both harmonize every sample: select and stats
    must still see each sample once (its latest ok row), and no results file may be lost."""
    output = str(tmp_path / "out")
    configs = [
        RunConfig(demo_manifest, output, model=ModelConfig(resolution=64), run_id=run_id,
                  results_rows_per_file=2, show_progress=False)
        for run_id in run_ids
    ]  # fmt: skip
    with ThreadPoolExecutor(max_workers=2) as pool:
        summaries = list(pool.map(run, configs))
    assert sum(s.samples for s in summaries) == 16 - sum(s.skipped for s in summaries)
    assert all(s.error == 0 for s in summaries)
    results = all_results(output)
    assert results.num_rows == sum(s.samples for s in summaries)  # every row written is kept
    assert sorted(set(results["sample_id"].to_pylist())) == sorted(
        pq.read_table(demo_manifest)["sample_id"].to_pylist()
    )
    summary = stats(output)
    assert (summary.ok_samples, summary.samples, summary.failed_samples) == (8, 8, 0)
    selection = select_samples(output, "true", str(tmp_path / "selected.parquet"))
    ids = pq.read_table(tmp_path / "selected.parquet")["sample_id"].to_pylist()
    assert selection.selected == 8 and len(ids) == len(set(ids)) == 8


def test_sigkill_driver_then_resume(demo_manifest: str, tmp_path: Path) -> None:
    manifest = grown_manifest(demo_manifest, tmp_path / "big.parquet", 96)  # 96 samples
    output = tmp_path / "out"
    command = [sys.executable, str(REPO / "jobs" / "harmonize.py"), "--manifest", manifest,
               "--output", str(output), "--no-progress", "--ray-address", "local",
               "--num-cpus", "4", "--batch-size", "2",
               "--results-rows-per-file", "8"]  # fmt: skip
    driver = subprocess.Popen(
        [*command, "--run-id", "killed"], cwd=REPO, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    results = output / "results" / "killed"
    deadline = time.monotonic() + 240
    while not list(results.glob("part-*.parquet")):
        assert driver.poll() is None, "the run ended before any results were written"
        assert time.monotonic() < deadline, "no results file after 240 s"
        time.sleep(0.02)
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and the local cluster it started
    driver.wait()

    partial = pads.dataset(str(output / "results")).to_table()
    assert 0 < partial.num_rows < 96, "the kill came too late to test a resume"
    for uri in partial["output_uri"].to_pylist():  # no row points at a missing image
        assert Path(uri).is_file()

    resumed = subprocess.run(
        [*command, "--run-id", "killed"], cwd=REPO, capture_output=True, text=True, timeout=400
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{partial.num_rows} already done, skipped" in resumed.stdout

    final = all_results(str(output))
    ids = final["sample_id"].to_pylist()
    assert len(ids) == len(set(ids)) == 96 and set(final["status"].to_pylist()) == {"ok"}
    images = [p for p in (output / "images").iterdir() if not p.name.startswith(".")]
    assert len(images) == 96


class CrashOnce(HarmonizeActor):
    """The pipeline's actor, except that the first one to find no file at `marker` creates it
    and dies hard, as a segfault or an OOM kill would: Ray must restart it and retry its batch.
    Shipped to the workers by value (the test module is not importable there)."""

    marker = ""  # set by the test

    def __call__(self, batch: pa.Table) -> pa.Table:
        if not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os._exit(1)
        return super().__call__(batch)


def test_actor_death_is_retried(
    ray_cluster: None, demo_manifest: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ray.cloudpickle

    import pipeline.run

    marker = tmp_path / "crashed"
    monkeypatch.setattr(CrashOnce, "marker", str(marker))
    monkeypatch.setattr(pipeline.run, "HarmonizeActor", CrashOnce)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        config = RunConfig(
            demo_manifest, str(tmp_path / "out"), model=ModelConfig(resolution=64),
            show_progress=False,
        )  # fmt: skip
        summary = run(config)
    finally:
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert marker.exists(), "the fault was not injected"
    assert (summary.samples, summary.ok) == (8, 8)
    ids = all_results(config.output)["sample_id"].to_pylist()
    assert len(ids) == len(set(ids)) == 8
