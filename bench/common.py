"""Shared pieces of the benchmarks: machine facts, model sizes, inputs, Ray, process sampling.

Nothing here is timed by itself. The model sizes:

- `tiny`: the test suite's tiny checkpoint (tests/tiny_checkpoint.py), milliseconds per image;
- `cpu`: the CPU benchmark's model, small enough for a 2-core machine but heavy enough that the
  model costs next to the I/O what it costs in a GPU deployment (see bench/RESULTS.md);
- `sd15`: the real architectures: SD-1.5 inpainting UNet (9 input channels), sd-vae-ft-mse
  VAE, the official "base" refiner preset; random weights.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

REPO = Path(__file__).resolve().parent.parent

# Read by Ray when it is imported, so set before anything imports it (as tests/conftest.py):
# one footer-reading actor, so that small clusters cannot starve; token auth as Ray 2.60 wants.
os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "token")

# stable-diffusion-inpainting's scheduler_config.json (turned into Euler-ancestral at load time).
SD_INPAINTING_SCHEDULER: dict[str, Any] = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}

# --- model sizes -------------------------------------------------------------------------------

SIZES = ("tiny", "cpu", "sd15")
TEXT_DIM = {"tiny": 32, "cpu": 64, "sd15": 768}


def unet_config(size: str) -> dict[str, Any]:
    """UNet2DConditionModel arguments; `sd15` is stable-diffusion-inpainting's unet/config.json."""
    if size == "sd15":
        return {
            "sample_size": 64,
            "in_channels": 9,
            "out_channels": 4,
            "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
            "block_out_channels": [320, 640, 1280, 1280],
            "layers_per_block": 2,
            "cross_attention_dim": 768,
            "attention_head_dim": 8,
            "norm_num_groups": 32,
            "norm_eps": 1e-5,
            "act_fn": "silu",
            "center_input_sample": False,
            "downsample_padding": 1,
            "flip_sin_to_cos": True,
            "freq_shift": 0,
            "mid_block_scale_factor": 1,
        }
    if size == "cpu":
        return {
            "sample_size": 32,
            "in_channels": 9,
            "out_channels": 4,
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            "block_out_channels": [64, 128, 192],
            "layers_per_block": 1,
            "cross_attention_dim": TEXT_DIM["cpu"],
            "attention_head_dim": 8,
            "norm_num_groups": 32,
        }
    return {  # tiny: tests/tiny_checkpoint.py
        "sample_size": 8,
        "in_channels": 9,
        "out_channels": 4,
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "block_out_channels": [16, 32],
        "layers_per_block": 1,
        "cross_attention_dim": TEXT_DIM["tiny"],
        "attention_head_dim": 8,
        "norm_num_groups": 8,
    }


def vae_config(size: str) -> dict[str, Any]:
    """AutoencoderKL arguments; `sd15` is sd-vae-ft-mse's config.json. Always 4 blocks (1/8)."""
    channels, layers, groups = {
        "sd15": ([128, 256, 512, 512], 2, 32),
        "cpu": ([16, 32, 32, 64], 1, 16),
        "tiny": ([8, 8, 16, 16], 1, 4),
    }[size]
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": channels,
        "layers_per_block": layers,
        "latent_channels": 4,
        "norm_num_groups": groups,
        "sample_size": 512 if size == "sd15" else 64,
        "scaling_factor": 0.18215,
        "act_fn": "silu",
    }


def refiner_config(size: str) -> dict[str, Any]:
    """The stage-2 RefinerUNet arguments; `sd15` uses the official "base" preset (in_channels 7)."""
    from pipeline.models.refiner import refiner_preset

    if size == "sd15":
        return refiner_preset("base", in_channels=7)
    channels = (16, 32, 32, 64) if size == "cpu" else (8, 16)
    return {
        "sample_size": 256 if size == "cpu" else 32,
        "in_channels": 7,
        "out_channels": 3,
        "down_block_types": ("DownBlock2D",) * len(channels),
        "up_block_types": ("UpBlock2D",) * len(channels),
        "block_out_channels": channels,
        "layers_per_block": 1,
        "downsample_padding": 0,
        "attention_head_dim": None,
        "norm_num_groups": 8 if size == "cpu" else 4,
        "norm_eps": 1e-6,
        "input_residual": True,
    }


def text_encoder_config(size: str) -> Any:
    """CLIPTextConfig of SD-1.5's text encoder (ViT-L/14 text tower) or a small stand-in."""
    from transformers import CLIPTextConfig

    if size == "sd15":
        return CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
            projection_dim=768, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
        )  # fmt: skip
    dim = TEXT_DIM[size]
    return CLIPTextConfig(
        vocab_size=64, hidden_size=dim, intermediate_size=2 * dim, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
        projection_dim=dim, bos_token_id=62, eos_token_id=63, pad_token_id=63,
    )  # fmt: skip


def _modules(size: str, seed: int) -> tuple[Any, Any, Any, torch.Tensor]:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from pipeline.models.refiner import RefinerUNet

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**unet_config(size))
        vae = AutoencoderKL(**vae_config(size))
        refiner = RefinerUNet(**refiner_config(size))
        embeds = torch.randn(1, 77, TEXT_DIM[size])
    return unet, vae, refiner, embeds


def write_model_dir(root: Path, size: str, seed: int = 0) -> Path:
    """A random-weight model directory in the official layout, with a precomputed empty prompt
    (so neither tokenizer nor text encoder is needed). Written once; reused when present."""
    from safetensors.torch import save_file

    root = Path(root)
    done = root / ".complete"
    if done.is_file() and done.read_text() == f"{size}:{seed}":
        return root
    unet, vae, refiner, embeds = _modules(size, seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "scheduler").mkdir(exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD_INPAINTING_SCHEDULER))
    unet.save_pretrained(root / "unet")
    vae.save_pretrained(root / "vae")
    refiner.save_pretrained(root / "refiner")
    save_file({"prompt_embeds": embeds.contiguous()}, str(root / "empty_prompt_embeds.safetensors"))
    done.write_text(f"{size}:{seed}")
    return root


def build_components(size: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Any:
    """`DiffHarmonyComponents` in memory (random weights), as `load_components` would return.

    At `sd15` size the modules are created directly on `device` (no multi-GB host copy).
    """
    from diffusers import AutoencoderKL, EulerAncestralDiscreteScheduler, UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0

    from pipeline.models.components import DiffHarmonyComponents
    from pipeline.models.refiner import RefinerUNet

    generator_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=generator_devices), torch.device(device):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**unet_config(size))
        vae = AutoencoderKL(**vae_config(size))
        refiner = RefinerUNet(**refiner_config(size))
        embeds = torch.randn(1, 77, TEXT_DIM[size])
    for model in (unet, vae):
        model.set_attn_processor(AttnProcessor2_0())
    unet, vae, refiner = (
        m.to(device, dtype).eval().requires_grad_(False) for m in (unet, vae, refiner)
    )
    scheduler = EulerAncestralDiscreteScheduler.from_config(SD_INPAINTING_SCHEDULER)

    def public(config: Any) -> dict[str, Any]:
        return {k: v for k, v in dict(config).items() if not k.startswith("_")}

    return DiffHarmonyComponents(
        root=Path("/nonexistent"),
        unet=unet,
        vae=vae,
        scheduler=scheduler,
        refiner=refiner,
        empty_prompt_embeds=embeds.to(device, dtype),
        checksums={"random": f"{size}:{seed}"},
        configs={"unet": public(unet.config), "vae": public(vae.config)},
    )


@contextmanager
def in_memory_components(components: Any) -> Iterator[None]:
    """Make `DiffHarmonyHarmonizer` (and so `HarmonizeActor`) use `components` instead of
    loading a model directory: the rest of the harmonizer's code path is unchanged."""
    import pipeline.models.diffharmony as diffharmony

    original = diffharmony.load_components
    diffharmony.load_components = lambda *args, **kwargs: components
    try:
        yield
    finally:
        diffharmony.load_components = original


# --- inputs ------------------------------------------------------------------------------------


def grown_manifest(demo_manifest: str, path: Path, samples: int) -> str:
    """The demo rows repeated under new sample ids (same image files) up to `samples` rows."""
    table = pq.read_table(demo_manifest)
    base = Path(demo_manifest).parent
    parts = []
    for copy in range(-(-samples // table.num_rows)):
        ids = pa.array([f"{sid}-{copy}" for sid in table["sample_id"].to_pylist()])
        part = table.set_column(0, "sample_id", ids)
        for column in ("composite_uri", "mask_uri", "real_uri"):
            absolute = [str(base / uri) for uri in part[column].to_pylist()]
            part = part.set_column(part.schema.get_field_index(column), column, pa.array(absolute))
        parts.append(part)
    pq.write_table(pa.concat_tables(parts).slice(0, samples), path)
    return str(path)


def demo_inputs(work: Path, samples: int) -> str:
    """The demo dataset under `work/demo` (built once) and a manifest of `samples` rows."""
    from pipeline.datasets.demo import build_demo

    demo = work / "demo" / "manifest.parquet"
    if not demo.is_file():
        build_demo(str(work / "demo"))
    return grown_manifest(str(demo), work / f"manifest-{samples}.parquet", samples)


def decode_manifest(manifest: str) -> list[dict[str, Any]]:
    """Every row decoded exactly as the pipeline's fetch stage does (not timed by callers)."""
    from pipeline.config import DEFAULT_MAX_PIXELS
    from pipeline.decode import decode_sample

    rows = []
    for row in pq.read_table(manifest).to_pylist():
        files = [Path(row[c]).read_bytes() for c in ("composite_uri", "mask_uri", "real_uri")]
        composite, mask, real = decode_sample(*files, max_pixels=DEFAULT_MAX_PIXELS)
        rows.append({"sample_id": row["sample_id"], "composite": composite, "mask": mask,
                     "real": real})  # fmt: skip
    return rows


# --- Ray ---------------------------------------------------------------------------------------


def start_ray(num_cpus: int | None = None) -> None:
    """A local cluster sized as `pipeline.run.init_ray` sizes one (2 logical CPUs per core)."""
    import ray

    ray.init(
        address="local",
        num_cpus=num_cpus or max(4, 2 * (os.cpu_count() or 1)),
        include_dashboard=False,
        log_to_driver=False,
    )


@dataclass
class StageTimes:
    """Per-sample seconds summed over a run's results (each stage's own clock)."""

    ok: int
    created_at: list[datetime]  # one per row: when its write task finished
    sums: dict[str, float]

    def steady_images_per_second(self) -> float | None:
        """Images/s between the end of the first and of the last write task: excludes Ray's
        start, the model-load probe, actor start-up and the first batch's fill."""
        if not self.created_at:
            return None
        times = sorted(self.created_at)
        first, last = times[0], times[-1]
        after_first = sum(1 for t in times if t > first)
        seconds = (last - first).total_seconds()
        return after_first / seconds if seconds > 0 else None


STAGES = ("fetch_s", "decode_s", "harmonize_s", "score_s", "write_s")


def stage_times(results_dir: str) -> StageTimes:
    import pyarrow.dataset as pads

    table = pads.dataset(results_dir, format="parquet").to_table(
        columns=["status", "created_at", *STAGES]
    )
    ok = table.filter(pa.compute.equal(table["status"], "ok"))
    sums = {name: float(pa.compute.sum(ok[name]).as_py() or 0.0) for name in STAGES}
    return StageTimes(ok=ok.num_rows, created_at=ok["created_at"].to_pylist(), sums=sums)


# --- process sampling (RSS, CPU time) ----------------------------------------------------------


@dataclass
class ProcessStats:
    """What `ProcessSampler` saw: peaks in bytes, CPU seconds used while it ran."""

    driver_peak_rss: int = 0
    worker_peak_rss: int = 0  # the largest single worker process
    workers_total_peak_rss: int = 0  # the peak of the sum over all worker processes
    system_total_peak_rss: int = 0  # raylet, GCS, agents: Ray's own processes
    # RSS counts the object store's shared-memory pages a worker has touched (and shared
    # libraries); "private" = RSS - shared (Linux) is the memory the process itself holds.
    driver_peak_private: int = 0
    worker_peak_private: int = 0
    workers_total_peak_private: int = 0
    cpu_seconds: dict[str, float] = field(default_factory=dict)  # category -> CPU s
    samples: int = 0


def _category(proc: Any) -> str:
    try:
        cmdline = " ".join(proc.cmdline())
    except Exception:
        return "system"
    if cmdline.startswith("ray::") or "default_worker.py" in cmdline:
        return "workers"
    return "system"


class ProcessSampler:
    """Samples the driver and every descendant (Ray's processes, its workers) with psutil.

    A local cluster started by `ray.init` runs GCS and raylet as children of the driver, and the
    workers as children of the raylet, so the driver's descendants are the whole cluster.
    """

    def __init__(self, interval: float = 0.1) -> None:
        import psutil

        self._psutil = psutil
        self.interval = interval
        self.me = psutil.Process()
        self.stats = ProcessStats()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._cpu_first: dict[int, tuple[str, float]] = {}
        self._cpu_last: dict[int, float] = {}

    @staticmethod
    def _cpu(proc: Any) -> float:
        times = proc.cpu_times()
        return times.user + times.system

    def _sample(self) -> None:
        psutil = self._psutil
        stats = self.stats
        try:
            children = self.me.children(recursive=True)
        except psutil.Error:
            return
        worker_total = system_total = worker_private_total = 0
        for proc in [self.me, *children]:
            try:
                memory = proc.memory_info()
                rss = memory.rss
                private = rss - getattr(memory, "shared", 0)
                cpu = self._cpu(proc)
                category = "driver" if proc.pid == self.me.pid else _category(proc)
            except psutil.Error:
                continue
            if proc.pid not in self._cpu_first:
                # Processes already there at the first sample count from then; later ones from 0.
                self._cpu_first[proc.pid] = (category, cpu if stats.samples == 0 else 0.0)
            self._cpu_last[proc.pid] = cpu
            if category == "driver":
                stats.driver_peak_rss = max(stats.driver_peak_rss, rss)
                stats.driver_peak_private = max(stats.driver_peak_private, private)
            elif category == "workers":
                stats.worker_peak_rss = max(stats.worker_peak_rss, rss)
                worker_total += rss
                stats.worker_peak_private = max(stats.worker_peak_private, private)
                worker_private_total += private
            else:
                system_total += rss
        stats.workers_total_peak_rss = max(stats.workers_total_peak_rss, worker_total)
        stats.system_total_peak_rss = max(stats.system_total_peak_rss, system_total)
        stats.workers_total_peak_private = max(
            stats.workers_total_peak_private, worker_private_total
        )
        stats.samples += 1

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> ProcessSampler:
        self._sample()  # the CPU time already spent before the window is not counted
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        cpu: dict[str, float] = {}
        for pid, (category, first) in self._cpu_first.items():
            cpu[category] = cpu.get(category, 0.0) + self._cpu_last.get(pid, first) - first
        self.stats.cpu_seconds = cpu


# --- reporting ---------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    cpu_model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import psutil

        ram_gib = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        ram_gib = None
    import ray

    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "cpu": cpu_model,
        "ram_gib": ram_gib,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "ray": ray.__version__,
    }


def mib(value: float) -> str:
    return f"{value / 2**20:.0f} MiB"


def print_header(title: str, extra: dict[str, Any] | None = None) -> None:
    info = machine_info()
    print(f"== {title}")
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    for key, value in (extra or {}).items():
        print(f"{key}: {value}")


def dump_json(path: Path | None, payload: dict[str, Any]) -> None:
    if path is None:
        return

    def default(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return dataclasses.asdict(value)
        if isinstance(value, datetime):
            return value.isoformat()
        return str(value)

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": machine_info(), **payload}, indent=1, default=default))


def wall() -> float:
    return time.perf_counter()
