"""A worker node dies mid-run (Ray's multi-node test cluster, in a process of its own).

DiffHarmony (tiny weights) from a `file://` model directory, so that each node copies the
model into its own cache. After the kill: the run completes (or, if it fails, the rerun with
the same run id does), every sample has exactly one ok row and one image, and the surviving
node's cache verifies against its checksums with no half-copied leftovers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tiny_checkpoint import write_tiny_model_dir

from bench.common import grown_manifest
from pipeline.models.cache import cache_path, verify_cache
from pipeline.results import read_results

REPO = Path(__file__).resolve().parent.parent


def test_worker_node_killed_mid_run(demo_manifest: str, tmp_path: Path) -> None:
    manifest = grown_manifest(demo_manifest, tmp_path / "manifest.parquet", 32)
    model_uri = write_tiny_model_dir(tmp_path / "model").as_uri()
    work = tmp_path / "work"
    # Each node has its own HOME (its own model cache); token authentication would look for
    # its token under HOME, and this private cluster needs none.
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    done = subprocess.run(
        [sys.executable, str(REPO / "tests" / "node_failure.py"), str(work), manifest, model_uri],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert "problem" not in report, report
    assert 4 <= report["images_at_kill"] < 32, "the node was not killed mid-run"
    if report["first"] is None:  # the run failed: one line, and the rerun finished the job
        assert "\n" not in report["first_error"], report["first_error"]
        final = report["resumed"]
        assert final["ok"] + final["skipped"] == 32, report
    else:
        assert report["first"] == {"samples": 32, "ok": 32, "skipped": 0}, report

    results = read_results(str(work / "out" / "results"), {})
    assert results is not None
    ok = [sid for sid, status in zip(results["sample_id"].to_pylist(),
                                     results["status"].to_pylist()) if status == "ok"]  # fmt: skip
    assert len(ok) == len(set(ok)) == 32, "every sample exactly once"
    assert len(list((work / "out" / "images").glob("*.png"))) == 32

    surviving = cache_path(model_uri, Path(report["surviving_home"]) / ".cache/harmonize/models")
    assert surviving.is_dir() and verify_cache(surviving) == []
    assert not list(surviving.parent.glob(f".{surviving.name}.*")), "half-copied leftovers"
