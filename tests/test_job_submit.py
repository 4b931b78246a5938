"""The real thing: `ray start --head` on loopback (`ray_head.py`), `ray job submit` of
jobs/harmonize.py."""

from __future__ import annotations

from pathlib import Path

import pyarrow.dataset as pads
from ray_head import local_head


def test_ray_job_submit_against_local_head(demo_manifest: str, tmp_path: Path) -> None:
    output = tmp_path / "out"
    with local_head(tmp_path) as head:
        printed = head.submit(
            "jobs/harmonize.py",
            ["--manifest", demo_manifest, "--output", str(output), "--resolution", "128",
             "--no-progress", "--run-id", "submitted"],
            timeout=420,
        )  # fmt: skip
    assert "8 samples, 8 ok, 0 error" in printed
    results = pads.dataset(str(output / "results" / "submitted")).to_table()
    assert results.num_rows == 8 and set(results["status"].to_pylist()) == {"ok"}
    for uri in results["output_uri"].to_pylist():
        assert Path(uri).is_file()
