"""The options the commands share, declared once: storage, the model, the run, the results.

Enters: nothing at import; at a command's call, the values Typer parsed.
Leaves: option types (`Annotated` Typer options) whose defaults and choices are the config's
own (`pipeline.config`, its `MODELS`); `with_storage_options`, which gives a command
`--storage-option` / `--endpoint-url` as one `storage_options` dict; `checked_config`, which
turns a `ConfigError` into a usage error naming the option.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
from collections.abc import Callable, Iterator
from typing import Annotated, Any, TypeVar, get_args

import typer

from pipeline.config import (
    MODELS,
    ConfigError,
    Device,
    Direction,
    DType,
    ImageFormat,
    ModelConfig,
    OutputSize,
    RunConfig,
)

R = TypeVar("R")

# Defaults are the config's: `harmonize run` and a RunConfig made in Python run the same.
MODEL = ModelConfig()
RUN = {f.name: f.default for f in dataclasses.fields(RunConfig)}
# Config fields whose option is not spelled as the field.
_OPTION_OF = {"name": "--model", "image_format": "--format"}


def _choices(literal: Any) -> str:
    return ", ".join(get_args(literal))


# --- storage ---------------------------------------------------------------------------------

StorageOptionArg = Annotated[
    list[str],
    typer.Option(
        "--storage-option",
        help="fsspec storage option KEY=VALUE (repeatable); credentials are never printed.",
    ),
]
EndpointArg = Annotated[str | None, typer.Option(help="S3-compatible endpoint (MinIO, moto, …).")]


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


def with_storage_options(command: Callable[..., R]) -> Callable[..., R]:
    """Give `command` the options `--storage-option KEY=VALUE` (repeatable) and
    `--endpoint-url`; it receives them parsed, as its keyword parameter `storage_options`."""
    signature = inspect.signature(command, eval_str=True)
    kept = [p for p in signature.parameters.values() if p.name != "storage_options"]
    keyword = inspect.Parameter.KEYWORD_ONLY
    added = [
        inspect.Parameter("storage_option", keyword, default=[], annotation=StorageOptionArg),
        inspect.Parameter("endpoint_url", keyword, default=None, annotation=EndpointArg),
    ]

    @functools.wraps(command)
    def with_options(
        *args: Any, storage_option: list[str], endpoint_url: str | None, **kwargs: Any
    ) -> R:
        options = parse_storage_options(storage_option, endpoint_url)
        return command(*args, storage_options=options, **kwargs)

    with_options.__signature__ = signature.replace(parameters=[*kept, *added])  # type: ignore[attr-defined]
    return with_options


# --- configuration ---------------------------------------------------------------------------


@contextlib.contextmanager
def checked_config() -> Iterator[None]:
    """A value the config refuses is a usage error naming its option (exit 2)."""
    try:
        yield
    except ConfigError as exc:
        option = _OPTION_OF.get(exc.field, "--" + exc.field.replace("_", "-"))
        raise typer.BadParameter(exc.message, param_hint=option) from None


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
        help="Harmonizer: "
        + ", ".join(f"{name} ({entry.description})" for name, entry in MODELS.items())
        + "."
    ),
]
ModelDirArg = Annotated[
    str | None,
    typer.Option(
        help="DiffHarmony model directory (path or URI: s3://…, hf://ORG/REPO[@REVISION]/FOLDER "
        "on the Hugging Face Hub) in the official layout; see docs/models.md."
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
    bool | None,
    typer.Option(
        "--refine/--no-refine",
        help="Apply the stage-2 refinement UNet (default: yes forward; inverse runs have none).",
        show_default=False,
    ),
]
DirectionArg = Annotated[
    str,
    typer.Option(
        help=f"One of {_choices(Direction)}. forward: harmonize each composite. inverse "
        "(DiffHarmony++): make new training composites from real images: the manifest needs "
        "real_uri and mask_uri, the model directory the inverse model (model assemble "
        "--direction inverse)."
    ),
]
VariantsArg = Annotated[
    int,
    typer.Option(
        help="Inverse runs: composites per real image; variant k is seeded from (--seed, "
        "sample_id, k) and written as images/{sample_id}__v{k}.png, one results row each."
    ),
]
ClassifierArg = Annotated[
    str | None,
    typer.Option(
        help="Harmony classifier (DiffHarmony++'s ResNet-50 state dict: a folder, path or URI, "
        "or a local file): adds unharmony_prob to every ok row, in either direction."
    ),
]


def refine_for(refine: bool | None, direction: str) -> bool:
    """--refine as given, else the config's default forward and off inverse (no stage 2)."""
    if refine is not None:
        return refine
    return MODEL.refine and direction != "inverse"


OutputSizeArg = Annotated[
    str,
    typer.Option(
        help="'input': outputs at each input's size; 'model': square --output-resolution "
        f"(official evaluation). One of {_choices(OutputSize)}."
    ),
]
OutputResolutionArg = Annotated[
    int, typer.Option(help="Side of the square output with --output-size model (official 256).")
]
DTypeArg = Annotated[
    str,
    typer.Option(
        help=f"Compute dtype, one of {_choices(DType)} (auto: fp16 on CUDA, fp32 on CPU)."
    ),
]
DeviceArg = Annotated[
    str,
    typer.Option(
        help=f"Where the model runs, one of {_choices(Device)}: auto (GPUs when the Ray cluster "
        "has GPU resources, else CPU), cuda (fails before any work on a cluster without GPUs) "
        "or cpu."
    ),
]
FormatArg = Annotated[
    str,
    typer.Option(
        "--format", help=f"Output image format, one of {_choices(ImageFormat)} (webp lossless)."
    ),
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
RunIdArg = Annotated[str | None, typer.Option(help="Run id (default: UTC time + random suffix).")]
PickleArg = Annotated[
    bool,
    typer.Option(
        "--allow-unsafe-pickle", help="Accept pickled .bin weights (they can run code when loaded)."
    ),
]
ProgressArg = Annotated[
    bool,
    typer.Option(
        "--progress/--no-progress",
        help="Show the progress bar (samples done, images/s, ETA; a line every few seconds "
        "where the output is not a terminal).",
    ),
]
VerboseArg = Annotated[
    bool,
    typer.Option(
        "--verbose",
        help="Ray's own INFO logs and its workers' output on the console too (they always go "
        "to the run's log, {output}/logs/{run_id}.log); a failed run's whole traceback.",
    ),
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
RowsPerFileArg = Annotated[
    int, typer.Option(help="Rows per results Parquet file (what a crash can cost to redo).")
]

# --- results ---------------------------------------------------------------------------------

ResultsArg = Annotated[
    str,
    typer.Option(
        help="A run's --output, its results/ folder or one results/{run_id} (path or URI)."
    ),
]
ParamsHashArg = Annotated[
    str | None, typer.Option(help="Which parameter set, when the results hold several.")
]
WhereArg = Annotated[str | None, typer.Option(help="Only the samples matching this.")]
ManifestOutArg = Annotated[
    str, typer.Option("--out", help="Manifest Parquet file to write (path or URI).")
]
