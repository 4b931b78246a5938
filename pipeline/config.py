"""Run configuration: one typed dataclass, built by the CLI and passed down to every stage.

Enters: values from the command line (or a test, or a scheduler's Python).
Leaves: `RunConfig` (with its `ModelConfig`), a frozen, picklable object that Ray ships to
tasks and actors, checked when it is made: a value no stage can use raises `ConfigError`
naming the field, so every caller (the CLI, jobs/, Python) gets the same check. Nothing below
the CLI reads environment variables.
"""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal, NamedTuple, get_args


class ModelEntry(NamedTuple):
    location: str  # "module:Class"
    description: str
    needs_model_dir: bool = False  # weights read from `--model-dir`
    slow_on_cpu: bool = False  # a run on CPU only is worth a warning


# The harmonizers `--model` names, the one list of them (`pipeline.models.load_harmonizer`
# imports the class only when it is asked for).
MODELS: dict[str, ModelEntry] = {
    "reinhard": ModelEntry("pipeline.models.reinhard:ReinhardHarmonizer", "classical baseline"),
    "diffharmony": ModelEntry(
        "pipeline.models.diffharmony:DiffHarmonyHarmonizer",
        "two-stage diffusion model",
        needs_model_dir=True,
        slow_on_cpu=True,
    ),
    "identity": ModelEntry(
        "pipeline.models.reinhard:IdentityHarmonizer", "no change; I/O benchmark"
    ),
}


ImageFormat = Literal["png", "jpg", "webp"]
OutputSize = Literal["input", "model"]
DType = Literal["auto", "fp32", "fp16", "bf16"]
# forward: harmonize a composite; inverse: make a composite from a real image (DiffHarmony++).
Direction = Literal["forward", "inverse"]
# auto: GPUs when the Ray cluster has them (pipeline/placement.py), else the CPU.
Device = Literal["auto", "cuda", "cpu"]
# Images with more pixels are refused from their header (a run's samples, the offline tools'
# images alike): a decompression bomb never gets decoded.
DEFAULT_MAX_PIXELS = 64_000_000


class ConfigError(ValueError):
    """A configuration value no stage can use; `field` names it (the CLI's option)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def _one_of(field: str, value: Any, choices: tuple[Any, ...]) -> None:
    if value not in choices:
        raise ConfigError(field, f"{value!r} is not one of {', '.join(map(str, choices))}")


@dataclass(frozen=True)
class ModelConfig:
    """Everything that decides what the harmonizer computes (and so enters the fingerprint)."""

    # One of `MODELS`.
    name: str = "reinhard"
    # Model directory (local path or fsspec URI) in the official release's layout; diffharmony only.
    model_dir: str | None = None
    # Square working resolution of the model; any multiple of 8.
    resolution: int = 512
    # Stage-1 scheduler steps (official default 5).
    steps: int = 5
    # Run seed; each sample's seed is derived from (seed, sample_id).
    seed: int = 0
    # Stage-2 refinement on/off.
    refine: bool = True
    # "input": output at each input's own size; "model": square `output_resolution` (official).
    output_size: OutputSize = "input"
    output_resolution: int = 256
    # Compute dtype: auto = fp16 on CUDA, fp32 on CPU.
    dtype: DType = "auto"
    # The run resolves "auto" from the Ray cluster's GPUs (pipeline/placement.py) before the
    # actors start; a harmonizer built directly resolves it from torch.
    device: Device = "auto"
    allow_unsafe_pickle: bool = False
    # Local folder for models copied from remote URIs (one copy per node).
    cache_dir: str | None = None
    # "inverse": the input is the real image (`real_uri`) and the model an inverse one (the
    # release's diffharmony-gen): the output is a new composite whose foreground no longer
    # matches its background. Stage 1 only, as the official inverse script.
    direction: Direction = "forward"

    def __post_init__(self) -> None:
        _one_of("name", self.name, tuple(MODELS))
        _one_of("direction", self.direction, get_args(Direction))
        _one_of("output_size", self.output_size, get_args(OutputSize))
        _one_of("dtype", self.dtype, get_args(DType))
        _one_of("device", self.device, get_args(Device))
        if self.resolution <= 0 or self.resolution % 8:
            raise ConfigError("resolution", "must be a positive multiple of 8")
        if self.steps < 1:
            raise ConfigError("steps", "must be at least 1")
        if self.output_resolution < 8:
            raise ConfigError("output_resolution", "must be at least 8")
        if MODELS[self.name].needs_model_dir and not self.model_dir:
            raise ConfigError("model_dir", f"model {self.name} needs a model directory")
        if self.direction == "inverse" and self.name != "diffharmony":
            raise ConfigError(
                "direction", "inverse harmonization needs the inverse DiffHarmony model"
            )
        if self.direction == "inverse" and self.refine:
            raise ConfigError("refine", "inverse runs have no stage 2 (as the official inverse.py)")

    def output_params(self) -> dict[str, Any]:
        """The parameters that change the output pixels (recorded per result row)."""
        params = dataclasses.asdict(self)
        for key in ("model_dir", "device", "allow_unsafe_pickle", "cache_dir"):
            params.pop(key)
        if self.direction == "forward":
            # Absent as before the inverse direction existed: earlier runs' params_hash, and so
            # resume across the upgrade, stay valid.
            params.pop("direction")
        return params


@dataclass(frozen=True)
class RunConfig:
    manifest: str
    output: str
    model: ModelConfig = field(default_factory=ModelConfig)
    image_format: ImageFormat = "png"
    jpeg_quality: int = 95
    # Rows per model batch (per actor call).
    batch_size: int = 4
    # Harmonizer actors; None: one per GPU (per `gpus_per_actor`) of the cluster, 1 on CPU.
    concurrency: int | None = None
    # GPUs per actor: 1, or a fraction (0.5: two actors share a card), or whole GPUs.
    gpus_per_actor: float | None = None
    # Rows per results Parquet file: also how much finished work a crash can cost to redo.
    results_rows_per_file: int = 1000
    # Images above this many pixels are refused per sample (protects memory).
    max_pixels: int = DEFAULT_MAX_PIXELS
    # fsspec storage options (endpoint_url, key, secret, …); never printed.
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)
    run_id: str = field(default_factory=lambda: new_run_id())
    # Ray cluster: None attaches to a running one (RAY_ADDRESS, `ray start`) or starts a local
    # one; "local" always starts a new local cluster; else an address.
    ray_address: str | None = None
    # Local-cluster sizing, used only when no cluster is running.
    num_cpus: int | None = None
    object_store_memory: int | None = None
    show_progress: bool = True
    preserve_order: bool = False
    # Inverse runs: candidates per manifest row, variant k seeded from (seed, sample_id, k) and
    # written as its own row and image (`{sample_id}__v{k}`).
    variants: int = 1
    # The harmony classifier's weights (folder path or URI, or a local file): an
    # `unharmony_prob` on every ok row. Pickles follow `model.allow_unsafe_pickle`.
    classifier: str | None = None
    # Ray's `ray.init(log_to_driver=…)`: the workers' output on the driver's console too (the
    # command line turns it off unless --verbose; Ray's session folder keeps it either way).
    log_to_driver: bool = True

    def __post_init__(self) -> None:
        _one_of("image_format", self.image_format, get_args(ImageFormat))
        if self.variants < 1:
            raise ConfigError("variants", f"must be at least 1, got {self.variants}")
        if self.variants > 1 and self.model.direction != "inverse":
            raise ConfigError(
                "variants",
                "several variants per sample are made by inverse runs only (--direction inverse)",
            )


def new_run_id() -> str:
    now = datetime.now(timezone.utc)
    return now.strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]
