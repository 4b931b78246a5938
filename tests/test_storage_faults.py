"""Transient storage errors: S3 behind a proxy that answers 503 to a fifth of the requests."""

from __future__ import annotations

from typing import Any

from flaky_proxy import FlakyProxy

from pipeline.config import ModelConfig, RunConfig
from pipeline.demo import build_demo
from pipeline.run import read_results, run


def test_run_survives_flaky_s3(
    ray_cluster: None, s3_server: dict[str, Any], s3_bucket: str
) -> None:
    manifest = build_demo(f"s3://{s3_bucket}/demo", s3_server)  # uploaded without faults
    with FlakyProxy(s3_server["endpoint_url"], failure_rate=0.2) as proxy:
        flaky = {**s3_server, "endpoint_url": proxy.url}
        config = RunConfig(
            manifest, f"s3://{s3_bucket}/out", model=ModelConfig(resolution=64),
            storage_options=flaky, show_progress=False,
        )  # fmt: skip
        summary = run(config)
        assert proxy.failures >= 5, f"only {proxy.failures} of {proxy.requests} requests failed"
    assert (summary.samples, summary.ok, summary.error) == (8, 8, 0), summary.errors
    results = read_results(f"s3://{s3_bucket}/out/results", s3_server)
    assert results is not None and sorted(results["sample_id"].to_pylist()) == sorted(
        results["sample_id"].unique().to_pylist()
    )
    assert results.num_rows == 8
