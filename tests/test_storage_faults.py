"""Transient storage errors: S3 behind a proxy that answers 503 to a fifth of the requests,
or 500 to the first tries of a request."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flaky_proxy import FlakyProxy
from tiny_checkpoint import write_tiny_model_dir

from pipeline.config import ModelConfig, RunConfig
from pipeline.datasets.demo import build_demo
from pipeline.models import load_harmonizer
from pipeline.results import read_results
from pipeline.run import run
from pipeline.storage import filesystem


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


def test_model_download_gets_the_s3_retry_settings(
    s3_server: dict[str, Any], s3_bucket: str, tmp_path: Path
) -> None:
    """The model folder, the largest download of a run, is read with the retry settings every
    other read has (`storage.S3_RETRIES`): a 500 InternalError on the first five tries of one
    of its files (s3fs leaves those to botocore, whose default gives up after five) does not
    stop the load."""
    fs, _ = filesystem(f"s3://{s3_bucket}", s3_server)
    fs.put(str(write_tiny_model_dir(tmp_path / "model")), f"{s3_bucket}/tiny", recursive=True)
    with FlakyProxy(s3_server["endpoint_url"], fail_first=5, only="/unet/config.json") as proxy:
        model = ModelConfig(
            name="diffharmony", model_dir=f"s3://{s3_bucket}/tiny", resolution=64, steps=1,
            cache_dir=str(tmp_path / "cache"),
        )  # fmt: skip
        harmonizer = load_harmonizer(model, {**s3_server, "endpoint_url": proxy.url})
        assert proxy.failures == 5, "the fault was not injected"
    assert harmonizer.fingerprint
