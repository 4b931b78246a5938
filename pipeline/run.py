"""The Ray Data graph, from manifest to results, and the run's summary.

Enters: a `RunConfig`.
Leaves: `{output}/images/…` (one image per ok sample), `{output}/results/{run_id}/*.parquet`
(one row per sample processed by this run), `{output}/logs/{run_id}.log` (Ray's own logs,
when the command line's console runs it), and a `RunSummary`.

    read_parquet(manifest)                       rows
    → map_batches(expand_variants)    (fused)    inverse runs: a row per variant
    → map_batches(drop_done)          (fused)    rows not yet done with these parameters
    → repartition(16 rows per block)  streaming  parallel fetch tasks, steady flow
    → map_batches(fetch_and_decode)   CPU tasks  + decoded pixels, status, error
    → map_batches(HarmonizeActor)     actor pool + harmonized pixels, model columns, metrics
    → map_batches(write_images)       CPU tasks  images written; rows in the results schema
    → write_datasink(ResultsSink)                results/{run_id}/part-{attempt}-*.parquet

Incremental runs: a sample is done when some earlier results row has `status = ok` and the
same `params_hash` (model, weights fingerprint and every output parameter). Re-running on a
grown manifest, or after a crash, processes only the rest; errors are retried. A run id may
be used again: each execution writes its own files beside the earlier ones, and its summary
counts only those.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, replace

import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.data import ActorPoolStrategy, DataContext, Dataset

from pipeline import preflight
from pipeline.config import MODELS, RunConfig
from pipeline.console import Console
from pipeline.fetch import fetch_and_decode
from pipeline.harmonize import HarmonizeActor, check_device, load_classifier, params_hash
from pipeline.manifest import Manifest, open_manifest
from pipeline.models import load_harmonizer
from pipeline.models.layout import ModelDirError
from pipeline.placement import (
    ClusterGPUs,
    Placement,
    PlacementError,
    check_paths_reachable,
    init_ray,
    plan_placement,
)
from pipeline.results import done_sample_ids, read_results, run_folder
from pipeline.storage import absolute, filesystem, join, to_pyarrow
from pipeline.variants import expand_variants
from pipeline.write import ResultsSink, write_images
from schemas.results import results_schema_with

log = logging.getLogger(__name__)

# Rows per fetch/write task: enough to overlap object-store latency, small enough to stream.
IO_BATCH_SIZE = 16


def drop_done(batch: pa.Table, done: ray.ObjectRef) -> pa.Table:
    """Ray `map_batches` function: keep the rows whose sample is not done yet."""
    done_ids = ray.get(done)
    if len(done_ids) == 0:
        return batch
    return batch.filter(pc.invert(pc.is_in(batch["sample_id"], value_set=done_ids)))


def place(config: RunConfig) -> tuple[RunConfig, Placement]:
    """Decide GPU or CPU from the cluster (not from this driver), check that every node sees the
    run's local paths, and return the config with the model's device resolved."""
    placement = plan_placement(
        config.model.device, config.concurrency, config.gpus_per_actor, ClusterGPUs.of_cluster()
    )
    paths = {"--manifest": config.manifest}
    if config.model.model_dir:
        paths["--model-dir"] = config.model.model_dir
    if config.classifier:
        paths["--classifier"] = config.classifier
    check_paths_reachable(paths, config.output)
    log.info("placement: %s", placement.describe())
    if config.model.device == "auto" and placement.device == "cpu":
        # Worth a warning only for a model that is slow on a CPU; the others run there anyway.
        slow = MODELS[config.model.name].slow_on_cpu
        log.log(
            logging.WARNING if slow else logging.INFO,
            "this Ray cluster has no GPU: the model runs on CPU (--device cuda requires one)",
        )
    if placement.min_actors < placement.max_actors:
        log.warning(
            "%d actors start on the GPUs up now; up to %d as GPU nodes join",
            placement.min_actors, placement.max_actors,
        )  # fmt: skip
    return replace(config, model=replace(config.model, device=placement.device)), placement


def probe_params_hash(config: RunConfig, placement: Placement) -> str:
    """Load the model once where the actors will run (which also fills that node's model cache)
    and hash its fingerprint with the output parameters."""

    def probe() -> str:
        from pipeline.models.layout import ModelDirError

        check_device(config.model.device)
        try:
            harmonizer = load_harmonizer(config.model, config.storage_options)
            classifier = load_classifier(config, harmonizer.device)
        except ModelDirError as exc:  # the model directory or the classifier: one line
            raise preflight.PreflightError(str(exc)) from None
        return params_hash(
            config.model.name,
            harmonizer.fingerprint,
            config.model.output_params(),
            classifier.fingerprint if classifier else None,
        )

    try:
        return ray.get(ray.remote(**placement.actor_options())(probe).remote())
    except (PlacementError, ModelDirError, preflight.PreflightError) as exc:
        # Ray re-raises the worker's error as its own subclass, which prints as a traceback;
        # its cause says it in one line.
        cause = getattr(exc, "cause", exc)
        raise type(cause)(str(cause)) from None


def rows_to_do(config: RunConfig, manifest: Manifest, done: pa.Array) -> int:
    """The rows this run makes (a row per variant in inverse runs): the progress bar's total."""
    ids = manifest.sample_ids
    if ids is None:
        return manifest.num_rows
    if config.model.direction == "inverse":
        ids = expand_variants(pa.table({"sample_id": ids}), config.variants)["sample_id"]
    if len(done) == 0:
        return len(ids)
    return len(ids) - int(pc.sum(pc.is_in(ids, value_set=done)).as_py() or 0)


def build_dataset(
    config: RunConfig, manifest: Manifest, placement: Placement, done: pa.Array | None = None
) -> Dataset:
    """The lazy Ray Data plan; nothing runs until it is written."""
    context = DataContext.get_current()  # settings are copied when read_* is called
    context.enable_progress_bars = config.show_progress
    context.execution_options.preserve_order = config.preserve_order
    # Per-sample errors are caught inside the stages and become error rows; a block that
    # still fails is an infrastructure fault, and the run should stop rather than drop rows.
    context.max_errored_blocks = 0

    fs, _ = filesystem(manifest.uri, config.storage_options)
    schema = results_schema_with(manifest.passthrough)

    dataset = ray.data.read_parquet(
        manifest.files, filesystem=to_pyarrow(fs), schema=manifest.schema
    )  # files unified
    if config.model.direction == "inverse":
        # A row per variant, before the done ones are dropped: resume works per variant.
        dataset = dataset.map_batches(
            expand_variants,
            fn_kwargs={"variants": config.variants},
            batch_format="pyarrow",
            num_cpus=0.5,
        )
    if done is not None and len(done):
        dataset = dataset.map_batches(
            drop_done, fn_kwargs={"done": ray.put(done)}, batch_format="pyarrow", num_cpus=0.5
        )
    # Manifest rows are tiny, so a read block can hold a whole file; cut the stream into
    # small blocks (streaming, no barrier) so that fetch tasks run in parallel and finished
    # rows flow on to the model and to storage while the rest is still being read.
    dataset = dataset.repartition(target_num_rows_per_block=IO_BATCH_SIZE)
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
        compute=ActorPoolStrategy(**placement.pool_size(), max_tasks_in_flight_per_actor=2),
        **placement.actor_options(),
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
    skipped: int  # already done by earlier runs with the same parameters
    samples: int
    ok: int
    error: int
    seconds: float
    images_dir: str
    results_dir: str
    mse: float | None  # mean MSE to ground truth of the harmonized images (rows with real)
    composite_mse: float | None  # the same for the raw composites
    better: int  # samples with ground truth whose output MSE is below the composite's
    worse: int  # ... and above or equal to it
    errors: list[str]
    devices: dict[str, int]  # where the model ran ('cuda:<GPU name>', 'cpu') -> samples
    direction: str = "forward"
    sources: int = 0  # inverse: manifest samples the variants came from
    fmse: float | None = None  # inverse: mean fMSE of the generated composites to the real
    unharmony_prob: float | None = None  # mean over the rows the classifier scored

    @property
    def images_per_second(self) -> float:
        return self.ok / self.seconds if self.seconds > 0 else 0.0

    def text(self) -> str:
        lines = [
            f"run {self.run_id}: {self.samples} samples, {self.ok} ok, {self.error} error "
            f"in {self.seconds:.1f} s ({self.images_per_second:.2f} images/s)"
            + (f"; {self.skipped} already done, skipped" if self.skipped else ""),
            f"images:  {self.images_dir}",
            f"results: {self.results_dir}",
        ]
        if self.devices:
            ran = ", ".join(f"{device} ({n})" for device, n in sorted(self.devices.items()))
            lines.append(f"ran on:  {ran}")
        if self.mse is not None and self.composite_mse is not None:
            verdict = "lower" if self.mse < self.composite_mse else "NOT lower"
            lines.append(
                f"MSE to ground truth (256 px, uint8): composite {self.composite_mse:.2f} -> "
                f"harmonized {self.mse:.2f} ({verdict}); closer to the ground truth than the "
                f"composite: {self.better} of {self.better + self.worse} samples, further: "
                f"{self.worse}"
            )
        if self.direction == "inverse" and self.mse is not None:
            lines.append(
                f"generated composites vs the real (256 px, uint8): MSE {self.mse:.2f}, fMSE "
                f"{self.fmse:.2f} (how strong the disharmony is), from {self.sources} samples"
            )
        if self.unharmony_prob is not None:
            lines.append(f"harmony classifier: mean unharmony_prob {self.unharmony_prob:.3f}")
        for message in self.errors[:10]:
            lines.append(f"error: {message}")
        if len(self.errors) > 10:
            lines.append(f"… and {len(self.errors) - 10} more errors in the results")
        return "\n".join(lines)


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None and not math.isnan(v)]
    return sum(present) / len(present) if present else None


def summarize(config: RunConfig, seconds: float, skipped: int, file_prefix: str) -> RunSummary:
    """Read back the results this execution wrote (a few small columns) and count them."""
    uri = run_folder(config.output, config.run_id)
    columns = ["status", "error", "mse", "composite_mse", "device", "fmse", "unharmony_prob",
               "source_sample_id"]  # fmt: skip
    table = read_results(uri, config.storage_options, columns, name_prefix=file_prefix)
    rows = table.to_pydict() if table is not None else {name: [] for name in columns}
    pairs = [
        (c, m)
        for c, m in zip(rows["composite_mse"], rows["mse"])
        if c is not None and m is not None
    ]
    devices: dict[str, int] = {}
    for device in rows.get("device", []):
        if device:
            devices[device] = devices.get(device, 0) + 1
    ok = sum(1 for s in rows["status"] if s == "ok")
    return RunSummary(
        run_id=config.run_id,
        skipped=skipped,
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
        better=sum(1 for c, m in pairs if m < c),
        worse=sum(1 for c, m in pairs if m >= c),
        errors=[e for e in rows["error"] if e],
        devices=devices,
        direction=config.model.direction,
        sources=len({s for s in rows["source_sample_id"] if s is not None}),
        fmse=_mean(rows["fmse"]),
        unharmony_prob=_mean(rows["unharmony_prob"]),
    )


def run(config: RunConfig, console: Console | None = None) -> RunSummary:
    """Validate the manifest, run the Ray graph, write the results, summarize.

    `console` (the command line's): a header once the manifest is read, and one progress bar
    instead of Ray Data's while the graph runs."""
    # Workers run in other folders, and results name their images: a local relative output
    # becomes absolute here, once.
    config = replace(config, output=absolute(config.output))
    # Footers and key columns, checked for the run's direction (inverse runs read real_uri).
    manifest = open_manifest(config.manifest, config.storage_options, config.model.direction)
    preflight.check(config, manifest.first_composite_uri)  # storage, output: before any model
    log.info("manifest %s: %d samples", manifest.uri, manifest.num_rows)
    if console is not None:
        console.header(
            f"harmonize run {config.run_id}: {manifest.num_rows} samples of {manifest.uri}, "
            f"model {config.model.name} -> {config.output}"
        )
        config = replace(config, show_progress=False)  # the console draws the one bar
    init_ray(config)
    config, placement = place(config)  # fails here, before any model loads
    start = time.perf_counter()
    # An unusable model directory (a missing repository or revision, broken weights) fails
    # here, before any sample is read: `ModelDirError`.
    done = done_sample_ids(
        config.output, config.storage_options, probe_params_hash(config, placement)
    )
    to_do = rows_to_do(config, manifest, done)
    log.info("%d samples to do, %d done earlier with the same parameters", to_do, len(done))
    sink = ResultsSink(run_folder(config.output, config.run_id), config)
    # The callback that counts progress is read from the DataContext when the plan is built.
    with console.executing(to_do) if console else contextlib.nullcontext():
        dataset = build_dataset(config, manifest, placement, done)
        dataset.write_datasink(sink)
    return summarize(config, time.perf_counter() - start, len(done), sink.file_prefix)
