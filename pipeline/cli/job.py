"""`harmonize run`, `runs` and `schema`: the pipeline's job, and what describes it.

Enters: the run's options (`harmonize run --help`; jobs/harmonize.py passes the same), a demo
folder, an output prefix.
Leaves: a run's summary printed (per-sample errors are results: the exit code stays 0); a run
that cannot start, or whose storage fails, as one line (exit 2 before any work, 1 after); the
runs under an output; the manifest and results schemas with their column descriptions.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import typer

from pipeline.cli.app import app, fail
from pipeline.cli.options import (
    MODEL,
    RUN,
    BatchArg,
    ClassifierArg,
    ConcurrencyArg,
    DeviceArg,
    DirectionArg,
    DTypeArg,
    FormatArg,
    GpusPerActorArg,
    ManifestArg,
    MaxPixelsArg,
    ModelArg,
    ModelDirArg,
    NumCpusArg,
    OutputArg,
    OutputResolutionArg,
    OutputSizeArg,
    PickleArg,
    ProgressArg,
    RayAddressArg,
    RefineArg,
    ResolutionArg,
    RowsPerFileArg,
    RunIdArg,
    SeedArg,
    StepsArg,
    VariantsArg,
    VerboseArg,
    checked_config,
    refine_for,
    with_storage_options,
)
from pipeline.config import ModelConfig, RunConfig

if TYPE_CHECKING:  # Ray is imported only when a job runs, after cli/app.py set its auth mode
    from pipeline.console import Console, RunLog


@app.command("run")
@with_storage_options
def run_command(
    manifest: ManifestArg,
    output: OutputArg,
    model: ModelArg = MODEL.name,
    model_dir: ModelDirArg = MODEL.model_dir,
    resolution: ResolutionArg = MODEL.resolution,
    steps: StepsArg = MODEL.steps,
    seed: SeedArg = MODEL.seed,
    refine: RefineArg = None,
    direction: DirectionArg = MODEL.direction,
    variants: VariantsArg = RUN["variants"],
    classifier: ClassifierArg = RUN["classifier"],
    output_size: OutputSizeArg = MODEL.output_size,
    output_resolution: OutputResolutionArg = MODEL.output_resolution,
    dtype: DTypeArg = MODEL.dtype,
    device: DeviceArg = MODEL.device,
    image_format: FormatArg = RUN["image_format"],
    batch_size: BatchArg = RUN["batch_size"],
    concurrency: ConcurrencyArg = RUN["concurrency"],
    gpus_per_actor: GpusPerActorArg = RUN["gpus_per_actor"],
    max_pixels: MaxPixelsArg = RUN["max_pixels"],
    run_id: RunIdArg = None,
    allow_unsafe_pickle: PickleArg = MODEL.allow_unsafe_pickle,
    progress: ProgressArg = RUN["show_progress"],
    num_cpus: NumCpusArg = RUN["num_cpus"],
    ray_address: RayAddressArg = RUN["ray_address"],
    results_rows_per_file: RowsPerFileArg = RUN["results_rows_per_file"],
    verbose: VerboseArg = False,
    *,
    storage_options: dict[str, Any],
) -> None:
    """Harmonize every sample of a manifest and write images + results Parquet.

    Re-running with the same --output processes only the samples not yet done with the same
    model and parameters (incremental daily runs, resume after a crash). --direction inverse
    makes new training composites from real images instead (--variants per real).
    """
    with checked_config():
        model_config = ModelConfig(
            name=model, model_dir=model_dir, resolution=resolution, steps=steps, seed=seed,
            refine=refine_for(refine, direction), output_size=output_size,  # type: ignore[arg-type]
            output_resolution=output_resolution, dtype=dtype,  # type: ignore[arg-type]
            device=device, allow_unsafe_pickle=allow_unsafe_pickle,  # type: ignore[arg-type]
            direction=direction,  # type: ignore[arg-type]
        )  # fmt: skip
        config = RunConfig(
            manifest=manifest, output=output, model=model_config,
            image_format=image_format,  # type: ignore[arg-type]
            batch_size=batch_size, concurrency=concurrency, gpus_per_actor=gpus_per_actor,
            max_pixels=max_pixels, storage_options=storage_options, show_progress=progress,
            num_cpus=num_cpus, ray_address=ray_address,
            results_rows_per_file=results_rows_per_file, variants=variants, classifier=classifier,
            **({"run_id": run_id} if run_id else {}),
        )  # fmt: skip
    run_and_report(config, verbose)


def run_and_report(config: RunConfig, verbose: bool = False) -> None:
    """Run the pipeline with its console and print its summary (see `run_job`)."""
    from pipeline.console import RunLog, log_uri
    from pipeline.run import run
    from pipeline.storage import absolute

    config = replace(config, output=absolute(config.output), log_to_driver=verbose)
    run_job(
        lambda console: run(config, console),
        RunLog(log_uri(config.output, config.run_id), config.storage_options, verbose),
        config.show_progress,
    )


def run_job(job: Callable[[Console], Any], run_log: RunLog, show_progress: bool = True) -> None:
    """Run a Ray job with the console a person reads (`job(console)` prints the header, draws
    the progress bar and returns a summary with `text()`), Ray's own logs in `run_log` (and on
    the console with `run_log.verbose`), and print its summary. A job that cannot start, or
    whose storage fails, is one line."""
    from pipeline.console import Console
    from pipeline.models.layout import ModelDirError
    from pipeline.placement import PlacementError
    from pipeline.preflight import PreflightError, storage_failure
    from schemas.manifest import ManifestError

    # Found before any work: a bad manifest, storage, placement or model directory.
    refused = (ManifestError, PreflightError, PlacementError, ModelDirError)
    try:
        with run_log.active():
            try:
                summary = job(Console(run_log, show_progress=show_progress))
            except refused:
                run_log.discard()
                raise
    except refused as exc:
        fail(exc, 2)
    except Exception as exc:  # storage failing mid-run (disk full, access revoked): one line
        line = storage_failure(exc)
        if line is None:
            raise
        if run_log.verbose:
            traceback.print_exception(exc)
        fail(line, 1)
    # Per-sample errors are results (status = error), not a failed run: the exit code stays 0.
    typer.echo(summary.text())


@app.command("runs")
@with_storage_options
def runs_command(output: OutputArg, *, storage_options: dict[str, Any]) -> None:
    """List the runs under an output prefix: ok / error counts, model, parameters, times."""
    from pipeline.results import list_runs

    runs = list_runs(output, storage_options).to_pylist()
    if not runs:
        typer.echo(f"no runs under {output}")
        return
    typer.echo(f"{'run_id':<26} {'model':<12} {'params_hash':<17} {'ok':>8} {'error':>6}  finished")
    for run in runs:
        typer.echo(
            f"{run['run_id']:<26} {run['model']:<12} {run['params_hash']:<17} "
            f"{run['ok']:>8} {run['error']:>6}  {run['finished']:%Y-%m-%d %H:%M:%S}"
        )


@app.command("schema")
def schema_command() -> None:
    """Print the manifest and results schemas, and compose's, with column descriptions."""
    from schemas import MANIFEST_SCHEMA, RESULTS_SCHEMA
    from schemas.compose import (
        BACKGROUNDS_SCHEMA,
        COMPOSE_ERROR_SCHEMA,
        COMPOSITE_SCHEMA,
        OBJECTS_SCHEMA,
    )

    for title, schema in (
        ("manifest", MANIFEST_SCHEMA), ("results", RESULTS_SCHEMA),
        ("compose objects", OBJECTS_SCHEMA), ("compose backgrounds", BACKGROUNDS_SCHEMA),
        ("composite manifest (compose's manifest/)", COMPOSITE_SCHEMA),
        ("compose errors (compose's errors/)", COMPOSE_ERROR_SCHEMA),
    ):  # fmt: skip
        typer.echo(f"{title}:")
        for field in schema:
            description = (field.metadata or {}).get(b"description", b"").decode()
            typer.echo(f"  {field.name:<18} {field.type!s:<24} {description}")
