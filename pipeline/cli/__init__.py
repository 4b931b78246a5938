"""The `harmonize` command line: run the pipeline, build the demo, assemble and check models.

Enters: command-line arguments (and, for storage credentials, the usual AWS/GCS environment
read by fsspec itself).
Leaves: a `RunConfig` handed to `pipeline.run.run`, and a printed summary.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from pipeline.config import DEFAULT_MAX_PIXELS, ModelConfig, RunConfig

app = typer.Typer(
    help="Harmonize composite images at scale: manifests on object storage in, harmonized "
    "images and scored results Parquet out, on a Ray cluster or this machine.",
    no_args_is_help=True,
    add_completion=False,
)
model_app = typer.Typer(
    help="Build and inspect DiffHarmony model directories.", no_args_is_help=True
)
app.add_typer(model_app, name="model")
manifest_app = typer.Typer(
    help="Build a manifest: from the iHarmony4 layout, or any folder with a naming rule.",
    no_args_is_help=True,
)
app.add_typer(manifest_app, name="manifest")


def _fail(exc: Exception | str, code: int) -> NoReturn:
    """A user's mistake or a missing input: one red line, no traceback, exit `code`."""
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code) from None


def parse_storage_options(values: list[str], endpoint_url: str | None) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep:
            raise typer.BadParameter(
                f"expected KEY=VALUE, got {key!r}", param_hint="--storage-option"
            )
        options[key] = value
    if endpoint_url:
        options["endpoint_url"] = endpoint_url
    return options


ManifestArg = Annotated[
    str,
    typer.Option(
        "--manifest",
        "-m",
        help="Manifest Parquet file or folder (path or URI: s3://, gs://, file://).",
    ),
]
OutputArg = Annotated[
    str, typer.Option("--output", "-o", help="Output prefix: images/ and results/ go under it.")
]
ModelArg = Annotated[
    str,
    typer.Option(
        help="Harmonizer: reinhard (classical baseline), diffharmony (two-stage diffusion "
        "model) or identity (no change; I/O benchmark)."
    ),
]
ModelDirArg = Annotated[
    str | None,
    typer.Option(
        help="DiffHarmony model directory (path or URI) in the official layout; see docs/models.md."
    ),
]
ResolutionArg = Annotated[
    int,
    typer.Option(
        help="Square working resolution of the model (multiple of 8; 512 official, 1024 "
        "the paper's high-resolution variant)."
    ),
]
StepsArg = Annotated[int, typer.Option(help="Stage-1 sampling steps.")]
SeedArg = Annotated[
    int, typer.Option(help="Run seed; each sample's seed derives from it and its sample_id.")
]
RefineArg = Annotated[
    bool, typer.Option("--refine/--no-refine", help="Apply the stage-2 refinement UNet.")
]
OutputSizeArg = Annotated[
    str,
    typer.Option(
        help="'input': outputs at each input's size; 'model': square --output-resolution "
        "(official evaluation)."
    ),
]
OutputResolutionArg = Annotated[
    int, typer.Option(help="Side of the square output with --output-size model (official 256).")
]
DTypeArg = Annotated[
    str, typer.Option(help="auto (fp16 on CUDA, fp32 on CPU), fp32, fp16 or bf16.")
]
DeviceArg = Annotated[
    str,
    typer.Option(
        help="Where the model runs: auto (GPUs when the Ray cluster has GPU resources, else "
        "CPU), cuda (fails before any work on a cluster without GPUs) or cpu."
    ),
]
FormatArg = Annotated[
    str, typer.Option("--format", help="Output image format: png, jpg or webp (lossless).")
]
BatchArg = Annotated[int, typer.Option(help="Samples per model call.")]
ConcurrencyArg = Annotated[
    int | None,
    typer.Option(
        help="Harmonizer actors. Default: one per GPU of the Ray cluster (per --gpus-per-actor; "
        "the pool grows as an autoscaler adds GPU nodes), 1 on CPU.",
        show_default=False,
    ),
]
GpusPerActorArg = Annotated[
    float | None,
    typer.Option(
        help="GPUs per actor: 1 (default), a fraction (0.5: two actors share a card), or whole "
        "GPUs.",
        show_default=False,
    ),
]
MaxPixelsArg = Annotated[
    int,
    typer.Option(
        help="Refuse images with more pixels than this, from their header (a per-sample error)."
    ),
]
StorageOptionArg = Annotated[
    list[str],
    typer.Option(
        "--storage-option",
        help="fsspec storage option KEY=VALUE (repeatable); credentials are never printed.",
    ),
]
EndpointArg = Annotated[str | None, typer.Option(help="S3-compatible endpoint (MinIO, moto, …).")]
RunIdArg = Annotated[str | None, typer.Option(help="Run id (default: UTC time + random suffix).")]
PickleArg = Annotated[
    bool,
    typer.Option(
        "--allow-unsafe-pickle", help="Accept pickled .bin weights (they can run code when loaded)."
    ),
]
ProgressArg = Annotated[
    bool, typer.Option("--progress/--no-progress", help="Show Ray Data's progress bars.")
]
NumCpusArg = Annotated[
    int | None,
    typer.Option(help="Logical CPUs of a local Ray cluster (ignored on an existing cluster)."),
]

RayAddressArg = Annotated[
    str | None,
    typer.Option(
        help="Ray cluster to use: default attaches to a running one (RAY_ADDRESS, ray start) "
        "or starts a local one; 'local' always starts a new local one."
    ),
]


@app.command("run")
def run_command(
    manifest: ManifestArg,
    output: OutputArg,
    model: ModelArg = "reinhard",
    model_dir: ModelDirArg = None,
    resolution: ResolutionArg = 512,
    steps: StepsArg = 5,
    seed: SeedArg = 0,
    refine: RefineArg = True,
    output_size: OutputSizeArg = "input",
    output_resolution: OutputResolutionArg = 256,
    dtype: DTypeArg = "auto",
    device: DeviceArg = "auto",
    image_format: FormatArg = "png",
    batch_size: BatchArg = 4,
    concurrency: ConcurrencyArg = None,
    gpus_per_actor: GpusPerActorArg = None,
    max_pixels: MaxPixelsArg = DEFAULT_MAX_PIXELS,
    storage_option: StorageOptionArg = [],  # noqa: B006 (typer reads the default)
    endpoint_url: EndpointArg = None,
    run_id: RunIdArg = None,
    allow_unsafe_pickle: PickleArg = False,
    progress: ProgressArg = True,
    num_cpus: NumCpusArg = None,
    ray_address: RayAddressArg = None,
    results_rows_per_file: Annotated[
        int, typer.Option(help="Rows per results Parquet file (what a crash can cost to redo).")
    ] = 1000,
    verbose: Annotated[
        bool, typer.Option("--verbose", help="On a failed run, print the whole traceback too.")
    ] = False,
) -> None:
    """Harmonize every sample of a manifest and write images + results Parquet.

    Re-running with the same --output processes only the samples not yet done with the same
    model and parameters (incremental daily runs, resume after a crash).
    """
    from pipeline.placement import PlacementError
    from pipeline.preflight import PreflightError, storage_failure
    from pipeline.run import run
    from schemas.manifest import ManifestError

    _check_choice("--model", model, ("reinhard", "diffharmony", "identity"))
    _check_choice("--output-size", output_size, ("input", "model"))
    _check_choice("--dtype", dtype, ("auto", "fp32", "fp16", "bf16"))
    _check_choice("--device", device, ("auto", "cuda", "cpu"))
    _check_choice("--format", image_format, ("png", "jpg", "webp"))
    if resolution <= 0 or resolution % 8:
        raise typer.BadParameter("must be a positive multiple of 8", param_hint="--resolution")
    if model == "diffharmony" and not model_dir:
        raise typer.BadParameter("--model diffharmony needs --model-dir", param_hint="--model-dir")
    model_config = ModelConfig(
        name=model, model_dir=model_dir, resolution=resolution, steps=steps, seed=seed,  # type: ignore[arg-type]
        refine=refine, output_size=output_size, output_resolution=output_resolution,  # type: ignore[arg-type]
        dtype=dtype, device=device, allow_unsafe_pickle=allow_unsafe_pickle,  # type: ignore[arg-type]
    )  # fmt: skip
    extra: dict[str, Any] = {"run_id": run_id} if run_id else {}
    config = RunConfig(
        manifest=manifest, output=output, model=model_config, image_format=image_format,  # type: ignore[arg-type]
        batch_size=batch_size, concurrency=concurrency, gpus_per_actor=gpus_per_actor,
        max_pixels=max_pixels,
        storage_options=parse_storage_options(storage_option, endpoint_url),
        show_progress=progress, num_cpus=num_cpus, ray_address=ray_address,
        results_rows_per_file=results_rows_per_file, **extra,
    )  # fmt: skip
    try:
        with contextlib.nullcontext() if verbose else _quiet_ray_data_errors():
            summary = run(config)
    except (ManifestError, PreflightError, PlacementError) as exc:  # found before any work
        _fail(exc, 2)
    except Exception as exc:  # storage failing mid-run (disk full, access revoked): one line
        line = storage_failure(exc)
        if line is None:
            raise
        if verbose:
            traceback.print_exception(exc)
        _fail(line, 1)
    # Per-sample errors are results (status = error), not a failed run: the exit code stays 0.
    typer.echo(summary.text())


@contextlib.contextmanager
def _quiet_ray_data_errors() -> Iterator[None]:
    """Keep Ray Data's error records (a failed run's traceback, a plea to report a Ray bug) off
    the console: the run command says what failed in one line, and the records still go to
    Ray Data's log file in the session folder. `--verbose` keeps them."""
    from ray.data._internal.logging import SessionFileHandler  # Ray Data's own log file

    def below_error(record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR

    consoles = [h for h in logging.getLogger("ray.data").handlers
                if not isinstance(h, SessionFileHandler)]  # fmt: skip
    for handler in consoles:
        handler.addFilter(below_error)
    try:
        yield
    finally:
        for handler in consoles:
            handler.removeFilter(below_error)


@app.command("demo")
def demo_command(
    root: Annotated[Path, typer.Option(help="Where to build the demo dataset.")] = Path(
        "demo_data"
    ),
    output: Annotated[Path, typer.Option(help="Where to write the demo run's outputs.")] = Path(
        "demo_output"
    ),
    model: ModelArg = "reinhard",
    model_dir: ModelDirArg = None,
    build_only: Annotated[bool, typer.Option(help="Only build the dataset.")] = False,
) -> None:
    """Build the bundled demo dataset (scikit-image photos) and harmonize it on local Ray.

    The previous demo output, if any, is replaced.
    """
    from pipeline.datasets.demo import build_demo

    manifest = build_demo(str(root.resolve()))
    typer.echo(f"demo dataset: {manifest}")
    if build_only:
        return
    if output.exists():  # the demo starts afresh; a re-run would skip every done sample
        shutil.rmtree(output)
    run_command(manifest=manifest, output=str(output.resolve()), model=model, model_dir=model_dir)


@model_app.command("check")
def model_check_command(
    model_dir: Annotated[str, typer.Argument(help="Model directory (path or URI).")],
    allow_unsafe_pickle: PickleArg = False,
    storage_option: StorageOptionArg = [],  # noqa: B006 (typer reads the default)
    endpoint_url: EndpointArg = None,
) -> None:
    """Validate a DiffHarmony model directory: layout, configs, shapes, weight keys."""
    from pipeline.models.check import check_model_dir

    problems = check_model_dir(
        model_dir,
        allow_unsafe_pickle=allow_unsafe_pickle,
        storage_options=parse_storage_options(storage_option, endpoint_url),
    )
    if problems:
        for problem in problems:
            typer.secho(f"problem: {problem}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)
    typer.echo(f"{model_dir}: OK")


@model_app.command("assemble")
def model_assemble_command(
    inpainting: Annotated[
        str,
        typer.Option(
            help="Stable Diffusion inpainting folder (path or URI); its tokenizer/, "
            "text_encoder/ and scheduler/ are taken."
        ),
    ],
    vae: Annotated[str, typer.Option(help="The sd-vae-ft-mse folder (path or URI).")],
    out: Annotated[
        str, typer.Option(help="Where the model directory goes (path or URI; absent or empty).")
    ],
    diffharmony: Annotated[
        str | None,
        typer.Option(
            help="The extracted DiffHarmony release (path or URI), searched at any depth for the "
            "stage-1 UNet (UNet2DConditionModel, in_channels 9) and the refiner (UNet2DCustom)."
        ),
    ] = None,
    unet: Annotated[
        str | None, typer.Option(help="The stage-1 UNet folder, when the release holds several.")
    ] = None,
    refiner: Annotated[
        str | None, typer.Option(help="The refiner folder, when the release holds several.")
    ] = None,
    allow_unsafe_pickle: PickleArg = False,
    storage_option: StorageOptionArg = [],  # noqa: B006 (typer reads the default)
    endpoint_url: EndpointArg = None,
) -> None:
    """Build a DiffHarmony model directory from the downloads, check it, and say what came from
    where: safetensors only (pickles converted with --allow-unsafe-pickle), the empty prompt
    precomputed, MODEL_CARD.md with the sources and every file's sha256."""
    from pipeline.models.assemble import AssembleError, assemble

    try:
        report = assemble(
            inpainting=inpainting,
            vae=vae,
            out=out,
            diffharmony=diffharmony,
            unet=unet,
            refiner=refiner,
            allow_unsafe_pickle=allow_unsafe_pickle,
            storage_options=parse_storage_options(storage_option, endpoint_url),
        )
    except AssembleError as error:
        _fail(error, 1)
    for line in report.lines():
        typer.echo(line)
    typer.echo(f"{out}: OK (checked; MODEL_CARD.md lists the sources and every file's sha256)")


@app.command("runs")
def runs_command(
    output: OutputArg,
    storage_option: StorageOptionArg = [],  # noqa: B006 (typer reads the default)
    endpoint_url: EndpointArg = None,
) -> None:
    """List the runs under an output prefix: ok / error counts, model, parameters, times."""
    from pipeline.results import list_runs

    runs = list_runs(output, parse_storage_options(storage_option, endpoint_url)).to_pylist()
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
    """Print the manifest and results schemas with column descriptions."""
    from schemas import MANIFEST_SCHEMA, RESULTS_SCHEMA

    for title, schema in (("manifest", MANIFEST_SCHEMA), ("results", RESULTS_SCHEMA)):
        typer.echo(f"{title}:")
        for field in schema:
            description = (field.metadata or {}).get(b"description", b"").decode()
            typer.echo(f"  {field.name:<18} {field.type!s:<24} {description}")


ResultsArg = Annotated[
    str,
    typer.Option(
        help="A run's --output, its results/ folder or one results/{run_id} (path or URI)."
    ),
]
ParamsHashArg = Annotated[
    str | None, typer.Option(help="Which parameter set, when the results hold several.")
]


ManifestOutArg = Annotated[
    str, typer.Option("--out", help="Manifest Parquet file to write (path or URI).")
]


def _print_build(build: Any) -> None:
    """Run a manifest build; its report goes to stdout, a build that cannot be made exits 1."""
    from pipeline.datasets.build import ManifestBuildError
    from schemas.manifest import ManifestError

    try:
        report = build()
    except (ManifestBuildError, ManifestError) as exc:
        _fail(exc, 1)
    typer.echo(report.text())


@manifest_app.command("iharmony4")
def manifest_iharmony4_command(
    root: Annotated[str, typer.Argument(help="iHarmony4 root (path or URI).")],
    out: ManifestOutArg,
    split: Annotated[str, typer.Option(help="train or test (IHD_{split}.txt).")] = "test",
    subset: Annotated[
        list[str], typer.Option(help="Only this subset (repeatable), e.g. HAdobe5k.")
    ] = [],  # noqa: B006 (typer reads the default)
    storage_option: StorageOptionArg = [],  # noqa: B006 (typer reads the default)
    endpoint_url: EndpointArg = None,
) -> None:
    """Manifest of an iHarmony4 split: sample_id = composite stem, real_uri, subset.

    Samples with missing files are left out and listed; the build goes on.
    """
    from pipeline.datasets.iharmony4 import build_iharmony4

    options = parse_storage_options(storage_option, endpoint_url)
    _print_build(lambda: build_iharmony4(root, out, split, subset or None, options))


@manifest_app.command("folder")
def manifest_folder_command(
    root: Annotated[str, typer.Argument(help="Folder (path or URI).")],
    composites: Annotated[str, typer.Option(help="Glob of the composites, relative to ROOT.")],
    masks: Annotated[str, typer.Option(help="Mask of each composite, e.g. 'masks/{stem}.png'.")],
    out: ManifestOutArg,
    real: Annotated[
        str | None, typer.Option(help="Ground truth of each composite, e.g. 'real/{stem}.jpg'.")
    ] = None,
    match: Annotated[
        str | None,
        typer.Option(help="Regex on the composite's path under ROOT; named groups fill patterns."),
    ] = None,
    sample_id: Annotated[str, typer.Option(help="sample_id pattern.")] = "{stem}",
    subset: Annotated[str | None, typer.Option(help="Pattern of a 'subset' column.")] = None,
    storage_option: StorageOptionArg = [],  # noqa: B006 (typer reads the default)
    endpoint_url: EndpointArg = None,
) -> None:
    """Manifest of any folder. Patterns use {stem}, {filename}, {ext}, {dir} and --match groups.

    Samples with missing files are left out and listed; the build goes on.
    """
    from pipeline.datasets.folder import build_folder

    options = parse_storage_options(storage_option, endpoint_url)
    _print_build(
        lambda: build_folder(root, out, composites, masks, real, match, sample_id, subset, options)
    )


@app.command("evaluate")
def evaluate_command(
    results: ResultsArg,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
    use_gt_bg: Annotated[
        bool, typer.Option(help="Paste the ground-truth background first (official --use_gt_bg).")
    ] = False,
    composites: Annotated[
        bool, typer.Option(help="Score the composites instead (the unharmonized baseline).")
    ] = False,
    params_hash: ParamsHashArg = None,
    per_image: Annotated[
        str | None, typer.Option(help="Also write per-image metrics to this Parquet URI.")
    ] = None,
    workers: Annotated[int, typer.Option(help="Threads fetching and decoding images.")] = 16,
    max_pixels: MaxPixelsArg = DEFAULT_MAX_PIXELS,
    storage_option: StorageOptionArg = [],  # noqa: B006 (typer reads the default)
    endpoint_url: EndpointArg = None,
) -> None:
    """The official iHarmony4 table, recomputed from the images of a run.

    MSE, PSNR, fMSE and bMSE at 256x256 on the uint8 scale, per subset and All (mean over
    images), and by foreground ratio (0-5 %, 5-15 %, 15-100 %).
    """
    from pipeline.results import ResultsError
    from pipeline.tools.evaluate import evaluate

    options = parse_storage_options(storage_option, endpoint_url)
    try:
        evaluation = evaluate(
            results, options, use_gt_bg=use_gt_bg, params_hash=params_hash,
            score="composite" if composites else "output", workers=workers,
            max_pixels=max_pixels,
        )  # fmt: skip
    except ResultsError as exc:
        _fail(exc, 2)
    if per_image:
        written = evaluation.write_per_image(per_image, options)
        typer.echo(f"per-image metrics: {written}", err=True)
    typer.echo(evaluation.to_json() if as_json else evaluation.text())
    if evaluation.per_image.num_rows == 0:
        typer.secho("error: no sample could be scored", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)


@app.command("select")
def select_command(
    results: ResultsArg,
    where: Annotated[
        str,
        typer.Option(
            help="SQL condition over the results columns (DuckDB), e.g. "
            '"bg_psnr > 35 AND lab_gap_after < lab_gap_before".'
        ),
    ],
    out: Annotated[str, typer.Option("--out", help="Training manifest Parquet to write.")],
    metric: Annotated[
        list[str], typer.Option(help="Metric to copy as metric_NAME (repeatable; default all).")
    ] = [],  # noqa: B006 (typer reads the default)
    params_hash: ParamsHashArg = None,
    storage_option: StorageOptionArg = [],  # noqa: B006 (typer reads the default)
    endpoint_url: EndpointArg = None,
) -> None:
    """Keep the samples whose latest ok result satisfies --where: a training manifest.

    It holds sample_id, image_uri (harmonized) and the same URI as composite_uri (so that
    `harmonize run` reads it back), mask_uri, real_uri, provenance, metric_* columns and the
    original manifest's extra columns.
    """
    from pipeline.results import ResultsError
    from pipeline.tools.selection import select_samples

    options = parse_storage_options(storage_option, endpoint_url)
    try:
        selection = select_samples(results, where, out, options, metrics=metric or None,
                                   params_hash=params_hash)  # fmt: skip
    except ResultsError as exc:
        _fail(exc, 2)
    typer.echo(selection.text())
    if selection.selected == 0:
        typer.secho("warning: no sample matched; the manifest is empty", err=True)


@app.command("stats")
def stats_command(
    results: ResultsArg,
    where: Annotated[str | None, typer.Option(help="Only the samples matching this.")] = None,
    params_hash: ParamsHashArg = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
    storage_option: StorageOptionArg = [],  # noqa: B006 (typer reads the default)
    endpoint_url: EndpointArg = None,
) -> None:
    """Ok / error counts, per-metric quantiles and, with a subset column, means per subset."""
    from pipeline.results import ResultsError
    from pipeline.tools.stats import stats

    options = parse_storage_options(storage_option, endpoint_url)
    try:
        summary = stats(results, options, params_hash=params_hash, where=where)
    except ResultsError as exc:
        _fail(exc, 2)
    typer.echo(summary.to_json() if as_json else summary.text())


@app.command("report")
def report_command(
    results: ResultsArg,
    out: Annotated[str, typer.Option("--out", help="HTML file to write (path or URI).")],
    metric: Annotated[
        str | None,
        typer.Option(help="Rank samples by this metric (default psnr, else lab_gap_after)."),
    ] = None,
    count: Annotated[int, typer.Option(help="Samples in each of best / worst / random.")] = 6,
    seed: Annotated[int, typer.Option(help="Seed of the random pick.")] = 0,
    where: Annotated[str | None, typer.Option(help="Only the samples matching this.")] = None,
    params_hash: ParamsHashArg = None,
    thumbnail_size: Annotated[int, typer.Option(help="Longest thumbnail side in px.")] = 192,
    max_pixels: MaxPixelsArg = DEFAULT_MAX_PIXELS,
    storage_option: StorageOptionArg = [],  # noqa: B006 (typer reads the default)
    endpoint_url: EndpointArg = None,
) -> None:
    """One self-contained HTML page: metric histograms, best / worst / random thumbnails."""
    from pipeline.results import ResultsError
    from pipeline.tools.report import build_report

    options = parse_storage_options(storage_option, endpoint_url)
    try:
        summary = build_report(
            results, out, options, metric=metric, count=count, seed=seed, where=where,
            params_hash=params_hash, thumbnail_size=thumbnail_size, max_pixels=max_pixels,
        )  # fmt: skip
    except ResultsError as exc:
        _fail(exc, 2)
    typer.echo(summary.text())
    if summary.failed:  # the page is written, but it is missing pictures: say so, exit 1
        typer.secho(
            f"error: {len(summary.failed)} of {summary.images} images could not be shown in "
            f"{summary.out} (listed above as 'thumbnail failed')",
            fg=typer.colors.RED,
            err=True,
        )
        raise typer.Exit(1)


def _check_choice(option: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(choices)}", param_hint=option)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":
    sys.exit(main())
