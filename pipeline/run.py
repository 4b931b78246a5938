"""The Ray Data graph, from manifest to results, and the run's summary.

Enters: a `RunConfig`.
Leaves: `{output}/images/…` (one image per ok sample), `{output}/results/{run_id}/*.parquet`
(one row per sample), and a `RunSummary`.

    read_parquet(manifest)                       rows
    → map_batches(fetch_and_decode)   CPU tasks  + decoded pixels, status, error
    → map_batches(HarmonizeActor)     actor pool + harmonized pixels, model columns, metrics
    → map_batches(write_images)       CPU tasks  images written; rows in the results schema
    → write_parquet(results/{run_id})
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import pyarrow.dataset as pads
import ray
import torch
from ray.data import ActorPoolStrategy, DataContext, Dataset

from pipeline.config import RunConfig
from pipeline.fetch import fetch_and_decode
from pipeline.harmonize import HarmonizeActor
from pipeline.manifest import Manifest, open_manifest
from pipeline.storage import filesystem, join, to_pyarrow
from pipeline.write import write_images
from schemas.results import results_schema_with

log = logging.getLogger(__name__)

# Rows per fetch/write task: enough to overlap object-store latency, small enough to stream.
IO_BATCH_SIZE = 16


def init_ray(config: RunConfig) -> None:
    """Attach to a running cluster (`ray job submit`, RAY_ADDRESS, `ray start`), else start one.

    Sizing is passed only when starting a local cluster: `ray.init(num_cpus=…)` raises when it
    connects to an existing one. Local clusters get more logical CPUs than cores, so that the
    I/O stages and the actor pool cannot deadlock waiting for each other on small machines.
    """
    if ray.is_initialized():
        return
    try:
        ray.init(address="auto", log_to_driver=True)
    except ConnectionError:
        import os

        ray.init(
            num_cpus=config.num_cpus or max(4, 2 * (os.cpu_count() or 1)),
            object_store_memory=config.object_store_memory,
        )


def results_dir(config: RunConfig) -> str:
    return join(config.output, "results", config.run_id)


def build_dataset(config: RunConfig, manifest: Manifest) -> Dataset:
    """The lazy Ray Data plan; nothing runs until it is written."""
    context = DataContext.get_current()  # settings are copied when read_* is called
    context.enable_progress_bars = config.show_progress
    context.execution_options.preserve_order = config.preserve_order
    # Per-sample errors are caught inside the stages and become error rows; a block that
    # still fails is an infrastructure fault, and the run should stop rather than drop rows.
    context.max_errored_blocks = 0

    fs, _ = filesystem(manifest.uri, config.storage_options)
    use_gpu = torch.cuda.is_available() and config.model.device in ("auto", "cuda")
    schema = results_schema_with(manifest.passthrough)

    dataset = ray.data.read_parquet(manifest.files, filesystem=to_pyarrow(fs))
    dataset = dataset.map_batches(
        fetch_and_decode,
        fn_kwargs={"config": config, "base_dir": manifest.base_dir},
        batch_format="pyarrow",
        batch_size=IO_BATCH_SIZE,
        num_cpus=0.5,
    )
    dataset = dataset.map_batches(
        HarmonizeActor,
        fn_constructor_kwargs={"config": config},
        batch_format="pyarrow",
        batch_size=config.batch_size,
        compute=ActorPoolStrategy(size=config.concurrency, max_tasks_in_flight_per_actor=2),
        num_gpus=1 if use_gpu else 0,
        num_cpus=1,
    )
    return dataset.map_batches(
        write_images,
        fn_kwargs={"config": config, "schema": schema},
        batch_format="pyarrow",
        batch_size=IO_BATCH_SIZE,
        num_cpus=0.5,
    )


@dataclass(frozen=True)
class RunSummary:
    run_id: str
    samples: int
    ok: int
    error: int
    seconds: float
    images_dir: str
    results_dir: str
    mse: float | None  # mean MSE to ground truth of the harmonized images (rows with real)
    composite_mse: float | None  # the same for the raw composites
    errors: list[str]

    @property
    def images_per_second(self) -> float:
        return self.ok / self.seconds if self.seconds > 0 else 0.0

    def text(self) -> str:
        lines = [
            f"run {self.run_id}: {self.samples} samples, {self.ok} ok, {self.error} error "
            f"in {self.seconds:.1f} s ({self.images_per_second:.2f} images/s)",
            f"images:  {self.images_dir}",
            f"results: {self.results_dir}",
        ]
        if self.mse is not None and self.composite_mse is not None:
            verdict = "lower" if self.mse < self.composite_mse else "NOT lower"
            lines.append(
                f"MSE to ground truth (256 px, uint8): composite {self.composite_mse:.2f} -> "
                f"harmonized {self.mse:.2f} ({verdict})"
            )
        for message in self.errors[:10]:
            lines.append(f"error: {message}")
        if len(self.errors) > 10:
            lines.append(f"… and {len(self.errors) - 10} more errors in the results")
        return "\n".join(lines)


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None and not math.isnan(v)]
    return sum(present) / len(present) if present else None


def summarize(config: RunConfig, seconds: float) -> RunSummary:
    """Read back this run's results (a few small columns) and count them."""
    uri = results_dir(config)
    fs, path = filesystem(uri, config.storage_options)
    columns = ["status", "error", "mse", "composite_mse"]
    if fs.exists(path):
        files = sorted(f for f in fs.find(path) if f.endswith(".parquet"))
        table = pads.dataset(files, filesystem=to_pyarrow(fs)).to_table(columns=columns)
        rows = table.to_pydict()
    else:
        rows = {name: [] for name in columns}
    ok = sum(1 for s in rows["status"] if s == "ok")
    return RunSummary(
        run_id=config.run_id,
        samples=len(rows["status"]),
        ok=ok,
        error=len(rows["status"]) - ok,
        seconds=seconds,
        images_dir=join(config.output, "images"),
        results_dir=uri,
        mse=_mean(rows["mse"]),
        composite_mse=_mean(
            [c for c, m in zip(rows["composite_mse"], rows["mse"]) if m is not None]
        ),
        errors=[e for e in rows["error"] if e],
    )


def run(config: RunConfig) -> RunSummary:
    """Validate the manifest, run the Ray graph, write the results, summarize."""
    manifest = open_manifest(config.manifest, config.storage_options)  # fails before any model
    log.info("manifest %s: %d samples", manifest.uri, manifest.num_rows)
    init_ray(config)
    start = time.perf_counter()
    dataset = build_dataset(config, manifest)
    fs, path = filesystem(results_dir(config), config.storage_options)
    dataset.write_parquet(path, filesystem=to_pyarrow(fs))
    return summarize(config, time.perf_counter() - start)
