"""GPU: DiffHarmony stage 1 + stage 2 images/s, ours against the official loop, and optimisations.

What it measures, with random weights at the real sizes (SD-1.5 inpainting UNet, in_channels 9;
sd-vae-ft-mse VAE; the official "base" refiner preset; `--tiny` swaps in the test-suite sizes):

- `ours`: `DiffHarmonyHarmonizer.harmonize` (the pipeline's code; components built in memory
  instead of read from a folder) on inputs already on the device, plus the uint8 copy back to
  the host that the actor makes: for each resolution, dtype and batch size, with
  torch.cuda.max_memory_allocated per batch size;
- `official`: a re-creation of the official `scripts/inference/main.py` +
  `StableDiffusionHarmonyPipeline.__call__` on the same GPU: fp16, batch 4, one process, one
  generator per batch, the CLIP text encoder run on the (empty) captions of every batch,
  `scheduler.scale_model_input` / `scheduler.step` of diffusers' EulerAncestral scheduler, the
  VAE output copied to the host, the stage-2 input built and resized on the host and copied
  back (as `make_stage2_input` does). Its inputs are given ready on the device (its data
  loader's time is not counted, nor its PNG writing): a comparison in its favour;
- `actor`: `HarmonizeActor.__call__` on pyarrow batches as the fetch stage makes them (host
  bytes -> device, model, metrics, pixels back): what a pipeline actor spends per batch;
- FLOPs: `torch.utils.flop_counter.FlopCounterMode` over one UNet call and one whole
  `harmonize` (batch 1); achieved TFLOP/s = FLOPs per image x images/s, against the measured
  bf16 matmul peak of the card (an 8192^3 matmul timed);
- where the time goes: each component (one UNet call, VAE encode, VAE decode, refiner) timed
  on its own with its FLOPs, against the whole `harmonize`; `--profile-dir` adds a
  torch.profiler table of one call;
- optimisations (`--variants`), each against the plain `ours` row of the same shape, with the
  output's relative error against the plain output: math attention instead of SDPA (what SDPA
  buys), channels_last, torch.compile of UNet, VAE and refiner (`--compile`, opt-in: it
  compiles for minutes), inputs on the host copied on a side stream with the next batch
  prefetched vs copied synchronously, and the batch size that free GPU memory allows (a linear
  fit of peak memory against batch size).

`bench/gpu_check.sh` runs the whole GPU check (CUDA tests, 512 and 1024 px, compile) in one
command. Or run on a GPU machine (each well under 10 minutes on an H100; JSON for RESULTS.md):

    .venv/bin/python -m bench.gpu --resolutions 512 --json gpu-512.json
    .venv/bin/python -m bench.gpu --resolutions 1024 --batch-sizes 1,2,4,8 --json gpu-1024.json
    .venv/bin/python -m bench.gpu --resolutions 512 --only-optimisations --compile

Smoke check on a CPU (tiny sizes, nothing here is a measurement of a GPU):

    .venv/bin/python -m bench.gpu --device cpu --tiny
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from bench.common import dump_json, print_header
from bench.random_model import SD_INPAINTING_SCHEDULER, build_components, text_encoder_config
from pipeline.config import ModelConfig, RunConfig
from pipeline.models.base import HarmonizeBatch
from pipeline.models.diffharmony import DiffHarmonyHarmonizer

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class Row:
    impl: str  # ours | official | actor
    variant: str  # baseline or the optimisation tried
    resolution: int
    dtype: str
    batch_size: int
    images_per_second: float | None = None
    seconds_per_batch: float | None = None
    peak_memory_bytes: int | None = None
    tflops: float | None = None  # achieved, whole model
    unet_tflops: float | None = None  # achieved, UNet part only
    note: str = ""


# --- timing helpers ----------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, warmup: int, iters: int) -> float:
    """Seconds per call of `fn`, after `warmup` calls, the device synchronized around."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / iters


def reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error)


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, iters: int) -> float:
    """Measured TFLOP/s of an n x n x n matmul in `dtype` (the card's practical peak)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = timed(lambda: a @ b, device, warmup=3, iters=iters)
    return 2 * n**3 / seconds / 1e12


# --- inputs ------------------------------------------------------------------------------------


def make_inputs(
    batch_size: int, side: int, device: torch.device, seed: int = 0
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Composites (3, side, side) in [0, 1] (smooth random colours) and masks with a centred
    rectangle (1, side, side) in {0, 1}."""
    generator = torch.Generator().manual_seed(seed)
    composites, masks = [], []
    for _ in range(batch_size):
        low = torch.rand(1, 3, 16, 16, generator=generator)
        composites.append(F.interpolate(low, size=(side, side), mode="bilinear")[0].to(device))
        mask = torch.zeros(1, side, side)
        mask[:, side // 4 : 3 * side // 4, side // 3 : 2 * side // 3] = 1.0
        masks.append(mask.to(device))
    return composites, masks


def to_host_pixels(images: list[torch.Tensor]) -> list[np.ndarray]:
    """What HarmonizeActor does with the model's output: uint8 HWC on the host."""
    return [
        (image.clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        for image in images
    ]


# --- the official loop, re-created ---------------------------------------------------------------


@dataclass
class Official:
    """The official script's modules: the same UNet/VAE/refiner weights, its own scheduler
    instance (diffusers' stateful EulerAncestral) and the CLIP text encoder."""

    unet: Any
    vae: Any
    refiner: Any
    scheduler: Any
    text_encoder: Any
    device: torch.device
    dtype: torch.dtype
    empty_ids: torch.Tensor  # (1, 77) the tokenizer's ids of "": BOS then EOS padding


def make_official(components: Any, size: str, device: torch.device, dtype: torch.dtype) -> Official:
    from diffusers import EulerAncestralDiscreteScheduler
    from transformers import CLIPTextModel

    config = text_encoder_config(size)
    with torch.device(device):
        text_encoder = CLIPTextModel(config)
    text_encoder = text_encoder.to(device, dtype).eval().requires_grad_(False)
    ids = torch.full((1, 77), config.pad_token_id, dtype=torch.long)
    ids[0, 0] = config.bos_token_id
    return Official(
        unet=components.unet,
        vae=components.vae,
        refiner=components.refiner,
        scheduler=EulerAncestralDiscreteScheduler.from_config(SD_INPAINTING_SCHEDULER),
        text_encoder=text_encoder,
        device=device,
        dtype=dtype,
        empty_ids=ids,
    )


@torch.inference_mode()
def official_batch(
    m: Official,
    comp: torch.Tensor,
    mask: torch.Tensor,
    comp_out: torch.Tensor,
    mask_out: torch.Tensor,
    seed: int,
    steps: int = 5,
) -> torch.Tensor:
    """One batch of the official inference: comp (B, 3, R, R) in [-1, 1] and mask (B, 1, R, R)
    at the working resolution, comp_out/mask_out at 256, all on the device as its data loader
    hands them over. Returns (B, 3, 256, 256) in [0, 1] on the host, as the script has it."""
    from diffusers.utils.torch_utils import randn_tensor

    device, batch_size = m.device, comp.shape[0]
    height, width = comp.shape[-2:]
    generator = torch.Generator(device=device).manual_seed(seed)  # one per batch
    # _encode_prompt: the captions ("" each) through the tokenizer (host) and CLIP, every batch.
    ids = m.empty_ids.expand(batch_size, -1)
    prompt_embeds = m.text_encoder(ids.to(device))[0].to(dtype=m.dtype, device=device)
    # prepare_mask_and_masked_image: range checks (host syncs), binarization, float32.
    if comp.min() < -1 or comp.max() > 1 or mask.min() < 0 or mask.max() > 1:
        raise ValueError("inputs out of range")
    mask = mask.clone()
    mask[mask < 0.5] = 0
    mask[mask >= 0.5] = 1
    image = comp.to(torch.float32)
    m.scheduler.set_timesteps(steps, device=device)
    timesteps = m.scheduler.timesteps
    latent_hw = (height // 8, width // 8)
    latents = randn_tensor(
        (batch_size, m.vae.config.latent_channels, *latent_hw),
        generator=generator,
        device=device,
        dtype=prompt_embeds.dtype,
    )
    latents = latents * m.scheduler.init_noise_sigma
    # prepare_mask_latents
    mask = mask.to(device=device, dtype=m.dtype)
    masked_image = image.to(device=device, dtype=m.dtype)
    scaling = m.vae.config.scaling_factor
    masked_latents = m.vae.encode(masked_image).latent_dist.sample(generator=generator) * scaling
    mask = F.interpolate(mask, size=latent_hw)
    for t in timesteps:
        model_input = m.scheduler.scale_model_input(latents, t)
        model_input = torch.cat([model_input, mask, masked_latents], dim=1)
        noise_pred = m.unet(model_input, t, encoder_hidden_states=prompt_embeds).sample
        latents = m.scheduler.step(noise_pred, t, latents, generator=generator).prev_sample
    decoded = m.vae.decode(latents / scaling, return_dict=False)[0]
    samples = (decoded / 2 + 0.5).clamp(0, 1).cpu()  # output_type "pt": on the host
    # Stage 2 as main.py: resize on the host (torchvision's tensor resize: float32, antialias),
    # make_stage2_input on the host, to the device, refiner, back to the host.
    samples = 2 * samples - 1
    size = tuple(comp_out.shape[-2:])
    if tuple(samples.shape[-2:]) != size:
        resized = F.interpolate(
            samples.float(), size=size, mode="bilinear", antialias=True, align_corners=False
        )
        samples = resized.to(samples.dtype).clamp(-1, 1)
    stage2_input = torch.cat([samples, mask_out.to(samples), comp_out.to(samples)], dim=1)
    refined = m.refiner(stage2_input.to(device=device, dtype=m.dtype)).cpu().clamp(-1, 1)
    return ((refined + 1) / 2).clamp(0, 1)


# --- FLOPs ---------------------------------------------------------------------------------------


def count_flops(harmonizer: Any, resolution: int, device: torch.device) -> tuple[int, int]:
    """(UNet FLOPs of one call, FLOPs of one whole harmonize), both at batch size 1."""
    from torch.utils.flop_counter import FlopCounterMode

    composites, masks = make_inputs(1, resolution, device)
    batch = HarmonizeBatch(["flops"], composites, masks, [0])
    with FlopCounterMode(display=False) as counter:
        harmonizer.harmonize(batch)
    total = counter.get_total_flops()
    latent = resolution // harmonizer.vae_scale_factor
    dim = harmonizer.empty_prompt_embeds.shape[-1]
    sample = torch.randn(1, 9, latent, latent, device=device, dtype=harmonizer.dtype)
    embeds = torch.randn(1, 77, dim, device=device, dtype=harmonizer.dtype)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        harmonizer.unet(sample, torch.tensor(999, device=device), encoder_hidden_states=embeds)
    return counter.get_total_flops(), total


def component_flops(resolution: int, output_resolution: int = 256) -> dict[str, int]:
    """FLOPs per image of each SD-size component, counted on the meta device (no GPU, no
    weights): one UNet call at `resolution`, VAE encode and decode, the refiner at 256."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0
    from torch.utils.flop_counter import FlopCounterMode

    from bench.random_model import refiner_config, unet_config, vae_config
    from pipeline.models.refiner import RefinerUNet

    latent = resolution // 8
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config("sd15"))
        vae = AutoencoderKL(**vae_config("sd15"))
        refiner = RefinerUNet(**refiner_config("sd15"))
    for model in (unet, vae):
        model.set_attn_processor(AttnProcessor2_0())
    calls: dict[str, Callable[[], Any]] = {
        "unet_per_step": lambda: unet(
            torch.randn(1, 9, latent, latent), torch.tensor(999),
            encoder_hidden_states=torch.randn(1, 77, 768),
        ),
        "vae_encode": lambda: vae.encode(torch.randn(1, 3, resolution, resolution)),
        "vae_decode": lambda: vae.decode(torch.randn(1, 4, latent, latent)),
        "refiner": lambda: refiner(torch.randn(1, 7, output_resolution, output_resolution)),
    }  # fmt: skip
    counts = {}
    with torch.device("meta"), torch.inference_mode():
        for name, call in calls.items():
            with FlopCounterMode(display=False) as counter:
                call()
            counts[name] = counter.get_total_flops()
    counts["total_5_steps"] = 5 * counts["unet_per_step"] + sum(
        counts[k] for k in ("vae_encode", "vae_decode", "refiner")
    )
    return counts


# --- the measurements ----------------------------------------------------------------------------


def bench_ours(
    harmonizer: Any, resolution: int, batch_size: int, device: torch.device, args: Any
) -> tuple[float, int | None]:
    composites, masks = make_inputs(batch_size, args.input_size or resolution, device)
    batch = HarmonizeBatch([f"s{i}" for i in range(batch_size)], composites, masks,
                           list(range(batch_size)))  # fmt: skip

    def step() -> None:
        with torch.inference_mode():
            to_host_pixels(harmonizer.harmonize(batch))

    step()  # first call: cuDNN autotuning, allocator growth
    reset_memory(device)
    seconds = timed(step, device, warmup=args.warmup, iters=args.iters)
    return seconds, peak_memory(device)


def outputs_of(
    harmonizer: Any, resolution: int, batch_size: int, device: torch.device, args: Any
) -> torch.Tensor:
    """The harmonized images of the benchmark's inputs (same seeds each call), stacked."""
    composites, masks = make_inputs(batch_size, args.input_size or resolution, device)
    batch = HarmonizeBatch([f"s{i}" for i in range(batch_size)], composites, masks,
                           list(range(batch_size)))  # fmt: skip
    with torch.inference_mode():
        return torch.stack(harmonizer.harmonize(batch)).double().cpu()


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||; NaN anywhere gives NaN."""
    return float((out - ref).norm() / ref.norm())


def component_breakdown(
    harmonizer: Any, resolution: int, batch_size: int, device: torch.device, args: Any
) -> dict[str, dict[str, float]]:
    """Seconds per call and achieved TFLOP/s of each component on its own, at `batch_size`:
    one UNet call (stage 1 runs `steps` of them), VAE encode, VAE decode, refiner at 256, and
    the whole `harmonize`; "other" is what the whole spends outside the components (resizes,
    random draws, the ancestral step, carry-back). Says which part bounds the throughput."""
    from torch.utils.flop_counter import FlopCounterMode

    h, b, r = harmonizer, batch_size, resolution
    latent = r // h.vae_scale_factor
    out = h.config.output_resolution
    gen = torch.Generator(device).manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device).to(h.dtype)

    image = randn(b, 3, r, r).clamp(-1, 1)
    sample, latents = randn(b, 9, latent, latent), randn(b, 4, latent, latent)
    embeds = h.empty_prompt_embeds.expand(b, -1, -1)
    t = h.scheduler.timesteps[0] if len(h.scheduler.timesteps) else torch.tensor(999)
    calls: dict[str, Callable[[], Any]] = {
        "unet_call": lambda: h.unet(sample, t, encoder_hidden_states=embeds, return_dict=False),
        "vae_encode": lambda: h.vae.encode(image).latent_dist.mean,
        "vae_decode": lambda: h.vae.decode(latents, return_dict=False),
    }
    if h.refiner is not None:
        channels = h.refiner.config.in_channels
        refiner_input = randn(b, channels, out, out).clamp(-1, 1)
        calls["refiner"] = lambda: h.refiner(refiner_input)
    composites, masks = make_inputs(b, args.input_size or r, device)
    batch = HarmonizeBatch([f"s{i}" for i in range(b)], composites, masks, list(range(b)))
    calls["harmonize"] = lambda: h.harmonize(batch)

    result: dict[str, dict[str, float]] = {}
    with torch.inference_mode():
        for name, call in calls.items():
            with FlopCounterMode(display=False) as counter:
                call()
            seconds = timed(call, device, warmup=args.warmup, iters=args.iters)
            flops = counter.get_total_flops()
            result[name] = {"seconds": seconds, "tflops": flops / seconds / 1e12}
    parts = h.config.steps * result["unet_call"]["seconds"] + sum(
        result[k]["seconds"] for k in ("vae_encode", "vae_decode", "refiner") if k in result
    )
    result["other"] = {"seconds": result["harmonize"]["seconds"] - parts, "tflops": 0.0}
    return result


def profile_table(
    harmonizer: Any, resolution: int, batch_size: int, device: torch.device, args: Any
) -> str:
    """torch.profiler over one `harmonize` call: the top operators by device (or CPU) time."""
    from torch.profiler import ProfilerActivity, profile

    composites, masks = make_inputs(batch_size, args.input_size or resolution, device)
    batch = HarmonizeBatch([f"s{i}" for i in range(batch_size)], composites, masks,
                           list(range(batch_size)))  # fmt: skip
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with torch.inference_mode():
        harmonizer.harmonize(batch)
        synchronize(device)
        with profile(activities=activities) as prof:
            harmonizer.harmonize(batch)
            synchronize(device)
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=30)


def bench_official(
    official: Official, resolution: int, batch_size: int, device: torch.device, args: Any
) -> tuple[float, int | None]:
    composites, masks = make_inputs(batch_size, resolution, device)
    comp = torch.stack(composites) * 2 - 1
    mask = torch.stack(masks)
    out = 256  # --output_resolution, the official default and ours
    comp_out = F.interpolate(comp, size=(out, out), mode="bilinear", antialias=True)
    mask_out = F.interpolate(mask, size=(out, out), mode="nearest")
    official_batch(official, comp, mask, comp_out, mask_out, seed=42)
    reset_memory(device)
    seconds = timed(
        lambda: official_batch(official, comp, mask, comp_out, mask_out, seed=42),
        device,
        warmup=args.warmup,
        iters=args.iters,
    )
    return seconds, peak_memory(device)


def actor_batch(batch_size: int, side: int) -> pa.Table:
    """A pyarrow batch as `fetch_and_decode` emits it (raw pixels, status ok, with real)."""
    composites, masks = make_inputs(batch_size, side, torch.device("cpu"))
    pixels = [to_host_pixels([c])[0].tobytes() for c in composites]
    mask_bytes = [m[0].to(torch.uint8).numpy().tobytes() for m in masks]
    n = batch_size
    return pa.table({
        "sample_id": pa.array([f"s{i}" for i in range(n)]),
        "composite_pixels": pa.array(pixels, pa.large_binary()),
        "mask_pixels": pa.array(mask_bytes, pa.large_binary()),
        "real_pixels": pa.array(pixels, pa.large_binary()),
        "width": pa.array([side] * n, pa.int32()),
        "height": pa.array([side] * n, pa.int32()),
        "status": pa.array(["ok"] * n),
        "error": pa.array([None] * n, pa.string()),
    })  # fmt: skip


def bench_actor(
    components: Any, model: ModelConfig, resolution: int, batch_size: int, args: Any
) -> tuple[float, float]:
    """Seconds per `HarmonizeActor.__call__`, and the share of it spent in harmonize+score."""
    from pipeline.harmonize import HarmonizeActor

    device = components.unet.device
    harmonizer = DiffHarmonyHarmonizer(components, model)
    actor = HarmonizeActor(RunConfig(manifest="-", output="-", model=model), harmonizer)
    table = actor_batch(batch_size, args.input_size or resolution)
    actor(table)
    out: list[pa.Table] = []
    seconds = timed(lambda: out.append(actor(table)), device, args.warmup, args.iters)
    timed_calls = out[-args.iters :]
    inside = sum(sum(t["harmonize_s"].to_pylist()) + sum(t["score_s"].to_pylist())
                 for t in timed_calls)  # fmt: skip
    return seconds, inside / (seconds * len(timed_calls))


def prefetch_compare(
    harmonizer: Any, resolution: int, batch_size: int, device: torch.device, args: Any
) -> tuple[float, float]:
    """Seconds per batch with uint8 inputs on the host: copied synchronously before each batch,
    against copied on a side stream while the previous batch computes (next batch prefetched)."""
    side = args.input_size or resolution
    batches = []
    for k in range(args.iters + 1):
        composites, masks = make_inputs(batch_size, side, torch.device("cpu"), seed=k)
        batches.append((
            [(c * 255).round().to(torch.uint8).pin_memory() for c in composites],
            [m.to(torch.uint8).pin_memory() for m in masks],
        ))  # fmt: skip
    ids, seeds = [f"s{i}" for i in range(batch_size)], list(range(batch_size))

    def run(composites: list[torch.Tensor], masks: list[torch.Tensor]) -> None:
        batch = HarmonizeBatch(ids, [c.float() / 255 for c in composites],
                               [m.float() for m in masks], seeds)  # fmt: skip
        with torch.inference_mode():
            to_host_pixels(harmonizer.harmonize(batch))

    def synchronous() -> None:
        for composites, masks in batches[1:]:
            run([c.to(device) for c in composites], [m.to(device) for m in masks])

    copy_stream = torch.cuda.Stream(device)

    def upload(host: tuple[list[torch.Tensor], list[torch.Tensor]]) -> tuple[Any, Any, Any]:
        with torch.cuda.stream(copy_stream):
            composites = [c.to(device, non_blocking=True) for c in host[0]]
            masks = [m.to(device, non_blocking=True) for m in host[1]]
            ready = torch.cuda.Event()
            ready.record(copy_stream)
        return composites, masks, ready

    def overlapped() -> None:
        pending = upload(batches[1])
        for k in range(1, len(batches)):
            composites, masks, ready = pending
            torch.cuda.current_stream(device).wait_event(ready)
            for tensor in (*composites, *masks):
                tensor.record_stream(torch.cuda.current_stream(device))
            if k + 1 < len(batches):
                pending = upload(batches[k + 1])
            run(composites, masks)

    run([c.to(device) for c in batches[0][0]], [m.to(device) for m in batches[0][1]])
    sync_s = timed(synchronous, device, warmup=0, iters=1) / args.iters
    overlap_s = timed(overlapped, device, warmup=0, iters=1) / args.iters
    return sync_s, overlap_s


@dataclass
class Variant:
    name: str
    apply: Callable[[Any], Callable[[], None]]  # applies it, returns the undo


def _attention(processor: str) -> Callable[[Any], Callable[[], None]]:
    def apply(h: Any) -> Callable[[], None]:
        from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

        for model in (h.unet, h.vae):
            model.set_attn_processor(AttnProcessor() if processor == "math" else AttnProcessor2_0())

        def undo() -> None:
            for model in (h.unet, h.vae):
                model.set_attn_processor(AttnProcessor2_0())

        return undo

    return apply


def _channels_last(h: Any) -> Callable[[], None]:
    for model in (h.unet, h.vae, h.refiner):
        model.to(memory_format=torch.channels_last)

    def undo() -> None:
        for model in (h.unet, h.vae, h.refiner):
            model.to(memory_format=torch.contiguous_format)

    return undo


def _compile(h: Any) -> Callable[[], None]:
    """torch.compile (Inductor, default mode) of the UNet, both VAE halves and the refiner:
    fuses the group-norm + SiLU + residual chains that leave the convolutions memory-bound."""
    eager = (h.unet, h.vae.encoder, h.vae.decoder, h.refiner)
    h.unet = torch.compile(h.unet)
    h.vae.encoder = torch.compile(h.vae.encoder)
    h.vae.decoder = torch.compile(h.vae.decoder)
    if h.refiner is not None:
        h.refiner = torch.compile(h.refiner)

    def undo() -> None:
        h.unet, h.vae.encoder, h.vae.decoder, h.refiner = eager

    return undo


def suggest_batch_size(memory: dict[int, int], free_bytes: int, held_bytes: int) -> int | None:
    """The largest batch whose predicted peak (a line through the measured peaks, which include
    the weights) stays within 90 % of free memory + what this process holds now (the weights)."""
    points = sorted(memory.items())
    if len(points) < 2:
        return None
    (b0, m0), (b1, m1) = points[0], points[-1]
    per_image = (m1 - m0) / (b1 - b0)
    if per_image <= 0:
        return None
    fixed = m0 - per_image * b0
    budget = 0.9 * (free_bytes + held_bytes)
    return max(1, int((budget - fixed) // per_image))


# --- main ----------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="test-suite sizes (smoke check)")
    parser.add_argument("--resolutions", default=None, help="default 512,1024 (--tiny: 64)")
    parser.add_argument("--dtypes", default=None, help="default fp16,bf16 (CPU: fp32)")
    parser.add_argument("--batch-sizes", default=None, help="default 1,2,4,8,16 (--tiny: 1,2)")
    parser.add_argument("--official-batch-size", type=int, default=4)
    parser.add_argument("--input-size", type=int, default=None,
                        help="side of the square inputs (default: the resolution)")  # fmt: skip
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=None, help="default 5 (--tiny: 2)")
    parser.add_argument("--variants", default="math,channels_last",
                        help="optimisations to try: math, channels_last, compile")  # fmt: skip
    parser.add_argument("--compile", action="store_true", help="also try torch.compile (slow)")
    parser.add_argument("--only-optimisations", action="store_true")
    parser.add_argument("--optimisation-batch-size", type=int, default=8)
    parser.add_argument(
        "--flops-only",
        action="store_true",
        help="count SD-size FLOPs on the meta device (no GPU needed), then stop",
    )
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--no-breakdown", action="store_true", help="skip the per-component times")
    parser.add_argument(
        "--profile-dir", type=Path, default=None, help="torch.profiler table of one harmonize"
    )
    args = parser.parse_args()
    logging.getLogger("diffusers").setLevel(logging.ERROR)

    if args.flops_only:
        counts = {}
        for resolution in [int(r) for r in (args.resolutions or "512,1024").split(",")]:
            counts[resolution] = component_flops(resolution)
            print(
                f"{resolution} px, FLOPs per image: "
                + ", ".join(
                    f"{name} {value / 1e12:.3f} T" for name, value in counts[resolution].items()
                )
            )
        dump_json(args.json, {"flops": counts})
        return

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run with --device cpu --tiny for a smoke check")
    size = "tiny" if args.tiny else "sd15"
    on_gpu = device.type == "cuda"
    resolutions = [
        int(r) for r in (args.resolutions or ("64" if args.tiny else "512,1024")).split(",")
    ]
    dtype_names = (args.dtypes or ("fp16,bf16" if on_gpu else "fp32")).split(",")
    batch_sizes = [
        int(b) for b in (args.batch_sizes or ("1,2" if args.tiny else "1,2,4,8,16")).split(",")
    ]
    args.iters = args.iters or (2 if args.tiny else 5)
    if on_gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True

    extra = {"device": torch.cuda.get_device_name(device) if on_gpu else "cpu",
             "sizes": size, "resolutions": resolutions, "dtypes": dtype_names,
             "batch_sizes": batch_sizes, "iters": args.iters}  # fmt: skip
    print_header("bench.gpu: DiffHarmony stage 1 + 2, ours vs the official loop", extra)

    n = 8192 if on_gpu and not args.tiny else 256
    peak = matmul_peak(device, torch.bfloat16, n, iters=50 if on_gpu else 3)
    print(f"measured bf16 matmul peak ({n}^3): {peak:.1f} TFLOP/s")

    rows: list[Row] = []
    flops: dict[int, tuple[int, int]] = {}
    suggestions: dict[str, int | None] = {}

    breakdown: dict[str, dict[str, dict[str, float]]] = {}

    def save() -> None:
        """Written after every row, so that a run stopped at its time limit keeps what it did."""
        dump_json(args.json, {
            "args": {k: str(v) for k, v in vars(args).items()}, "device": extra["device"],
            "torch": torch.__version__, "matmul_bf16_peak_tflops": peak,
            "flops": {str(k): {"unet_per_step": u, "harmonize": t} for k, (u, t) in flops.items()},
            "batch_size_suggestions": suggestions, "components": breakdown,
            "rows": [dataclasses.asdict(r) for r in rows],
        })  # fmt: skip

    def add(row: Row) -> None:
        if row.seconds_per_batch:
            row.images_per_second = row.batch_size / row.seconds_per_batch
            unet, total = flops.get(row.resolution, (0, 0))
            row.tflops = total * row.images_per_second / 1e12
            row.unet_tflops = 5 * unet * row.images_per_second / 1e12
        rows.append(row)
        ips = f"{row.images_per_second:8.2f}" if row.images_per_second else "     n/a"
        mem = f"{row.peak_memory_bytes / 2**30:6.2f} GiB" if row.peak_memory_bytes else "   n/a"
        print(
            f"{row.impl:8s} {row.variant:18s} {row.resolution:5d} px {row.dtype:5s} "
            f"batch {row.batch_size:3d}: {ips} images/s, peak {mem}, "
            f"{(row.tflops or 0):7.1f} TFLOP/s ({100 * (row.tflops or 0) / peak:5.1f} % of peak), "
            f"UNet {(row.unet_tflops or 0):7.1f} TFLOP/s {row.note}"
        )
        save()

    for dtype_name in dtype_names:
        dtype = DTYPES[dtype_name]
        if on_gpu:
            torch.cuda.empty_cache()
        components = build_components(size, device, dtype)
        for resolution in resolutions:
            # model_dir only names where the components came from: nothing is read from it.
            model = ModelConfig(name="diffharmony", model_dir="in-memory", resolution=resolution,
                                dtype=dtype_name, device=str(device))  # fmt: skip
            harmonizer = DiffHarmonyHarmonizer(components, model)
            if resolution not in flops:
                flops[resolution] = count_flops(harmonizer, resolution, device)
                unet, total = flops[resolution]
                print(
                    f"FLOPs at {resolution} px, per image: UNet {unet / 1e9:.1f} G per step "
                    f"(x5 steps), whole harmonize {total / 1e9:.1f} G"
                )
            memory: dict[int, int] = {}
            if not args.only_optimisations:
                for batch_size in batch_sizes:
                    try:
                        seconds, mem = bench_ours(harmonizer, resolution, batch_size, device, args)
                    except RuntimeError as error:
                        if not is_oom(error):
                            raise
                        add(Row("ours", "baseline", resolution, dtype_name, batch_size, note="OOM"))
                        break
                    if mem:
                        memory[batch_size] = mem
                    add(Row("ours", "baseline", resolution, dtype_name, batch_size,
                            seconds_per_batch=seconds, peak_memory_bytes=mem))  # fmt: skip
                if on_gpu and memory:
                    torch.cuda.empty_cache()
                    free, _ = torch.cuda.mem_get_info(device)
                    key = f"{resolution}/{dtype_name}"
                    held = torch.cuda.memory_allocated(device)
                    suggestions[key] = suggest_batch_size(memory, free, held)
                    print(f"batch size that free memory allows at {key}: {suggestions[key]}")
                if dtype_name in ("fp16", "fp32"):
                    official = make_official(components, size, device, dtype)
                    b = args.official_batch_size
                    seconds, mem = bench_official(official, resolution, b, device, args)
                    add(Row("official", "official loop", resolution, dtype_name, b,
                            seconds_per_batch=seconds, peak_memory_bytes=mem))  # fmt: skip
                    del official
                b = args.official_batch_size
                seconds, inside = bench_actor(components, model, resolution, b, args)
                add(Row("actor", "HarmonizeActor", resolution, dtype_name, b,
                        seconds_per_batch=seconds,
                        note=f"({100 * inside:.0f} % of it in harmonize+score)"))  # fmt: skip
            if dtype_name != dtype_names[0]:
                continue  # optimisations: once, in the first dtype
            b = args.optimisation_batch_size if not args.tiny else batch_sizes[-1]
            seconds, mem = bench_ours(harmonizer, resolution, b, device, args)
            add(Row("ours", "baseline", resolution, dtype_name, b, seconds_per_batch=seconds,
                    peak_memory_bytes=mem, note="(reference for the rows below)"))  # fmt: skip
            parts = (
                {}
                if args.no_breakdown
                else component_breakdown(harmonizer, resolution, b, device, args)
            )
            for name, part in parts.items():
                share = 100 * part["seconds"] / parts["harmonize"]["seconds"]
                if name == "unet_call":
                    share *= model.steps
                print(f"  {name:10s} {1000 * part['seconds']:9.2f} ms per call "
                      f"({share:5.1f} % of harmonize), {part['tflops']:7.1f} TFLOP/s "
                      f"({100 * part['tflops'] / peak:5.1f} % of peak)")  # fmt: skip
            if parts:
                breakdown[f"{resolution}/{dtype_name}/batch{b}"] = parts
                save()
            if args.profile_dir:
                args.profile_dir.mkdir(parents=True, exist_ok=True)
                table = profile_table(harmonizer, resolution, b, device, args)
                (args.profile_dir / f"profile-{resolution}-{dtype_name}.txt").write_text(table)
            known = {"math": Variant("math attention", _attention("math")),
                     "channels_last": Variant("channels_last", _channels_last),
                     "compile": Variant("torch.compile", _compile)}  # fmt: skip
            names = args.variants.split(",") if args.variants else []
            variants = [known[name] for name in names + (["compile"] if args.compile else [])]
            reference = outputs_of(harmonizer, resolution, b, device, args)
            for variant in variants:
                undo = variant.apply(harmonizer)
                try:
                    start = time.perf_counter()
                    seconds, mem = bench_ours(harmonizer, resolution, b, device, args)
                    error = relative_error(outputs_of(harmonizer, resolution, b, device, args),
                                           reference)  # fmt: skip
                    note = f"(output vs plain: relative error {error:.1e})"
                    if variant.name == "torch.compile":
                        note += f" (first calls + timing took {time.perf_counter() - start:.0f} s)"
                    add(Row("ours", variant.name, resolution, dtype_name, b,
                            seconds_per_batch=seconds, peak_memory_bytes=mem,
                            note=note))  # fmt: skip
                finally:
                    undo()
            if on_gpu:
                sync_s, overlap_s = prefetch_compare(harmonizer, resolution, b, device, args)
                add(Row("ours", "host inputs, sync", resolution, dtype_name, b,
                        seconds_per_batch=sync_s))  # fmt: skip
                add(Row("ours", "host, prefetched", resolution, dtype_name, b,
                        seconds_per_batch=overlap_s))  # fmt: skip
        del components

    print("\nsummary: best 'ours' baseline against the official loop, same resolution")
    for resolution in resolutions:
        ours = [r for r in rows if r.impl == "ours" and r.variant == "baseline"
                and r.resolution == resolution and r.images_per_second]  # fmt: skip
        official = [r for r in rows if r.impl == "official" and r.resolution == resolution
                    and r.images_per_second]  # fmt: skip
        if not ours or not official:
            continue
        best = max(ours, key=lambda r: r.images_per_second or 0)
        ref = official[0]
        assert best.images_per_second and ref.images_per_second
        print(
            f"  {resolution} px: ours {best.images_per_second:.2f} images/s ({best.dtype}, batch "
            f"{best.batch_size}) vs official {ref.images_per_second:.2f} images/s: "
            f"x{best.images_per_second / ref.images_per_second:.2f} (target >= 2)"
        )
    save()


if __name__ == "__main__":
    main()
