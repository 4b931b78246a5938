"""Random-weight DiffHarmony models at three sizes: one builder for the benchmarks and the tests.

Enters: a size, a seed, and where the model goes: a device and dtype (`build_components`, in
memory) or a folder (`write_model_dir`).
Leaves: `DiffHarmonyComponents` as `load_components` returns them, or a model directory in the
official layout that `harmonize model check` accepts.

Sizes:
- `tiny`: milliseconds per image; the test suite's checkpoint (tests/tiny_checkpoint.py writes
  the formats of real downloads from it);
- `cpu`: the CPU benchmark's model, small enough for a 2-core machine but heavy enough that the
  model costs next to the I/O what it costs in a GPU deployment (bench/RESULTS.md);
- `sd15`: the real architectures: SD-1.5 inpainting UNet (9 input channels), sd-vae-ft-mse
  VAE, the official "base" refiner preset, SD-1.5's CLIP text encoder.
The same (size, seed) gives the same weights, in memory and on disk. Works offline.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

SIZES = ("tiny", "cpu", "sd15")
TEXT_DIM = {"tiny": 32, "cpu": 64, "sd15": 768}

# stable-diffusion-inpainting's scheduler/scheduler_config.json, which the official script turns
# into an EulerAncestralDiscreteScheduler with `from_config`.
SD_INPAINTING_SCHEDULER: dict[str, Any] = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
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

# The tiny tokenizer: byte-level BPE over lowercase letters and two merges ("th", "the").
_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"
_LETTERS = "abcdefghijklmnopqrstuvwxyz"
TINY_VOCAB = [*_LETTERS, *(c + "</w>" for c in _LETTERS), "th", "the</w>", _BOS, _EOS]


def unet_config(size: str) -> dict[str, Any]:
    """UNet2DConditionModel arguments; `sd15` is stable-diffusion-inpainting's unet/config.json."""
    if size == "sd15":
        return {
            "sample_size": 64, "in_channels": 9, "out_channels": 4,
            "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
            "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
            "cross_attention_dim": 768, "attention_head_dim": 8, "norm_num_groups": 32,
            "norm_eps": 1e-5, "act_fn": "silu", "center_input_sample": False,
            "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0,
            "mid_block_scale_factor": 1,
        }  # fmt: skip
    if size == "cpu":
        return {
            "sample_size": 32, "in_channels": 9, "out_channels": 4,
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            "block_out_channels": [64, 128, 192], "layers_per_block": 1,
            "cross_attention_dim": TEXT_DIM["cpu"], "attention_head_dim": 8,
            "norm_num_groups": 32,
        }  # fmt: skip
    return {
        "sample_size": 8, "in_channels": 9,  # 4 latent + 1 mask + 4 composite latent
        "out_channels": 4, "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "block_out_channels": [16, 32],
        "layers_per_block": 1, "cross_attention_dim": TEXT_DIM["tiny"], "attention_head_dim": 8,
        "norm_num_groups": 8,
    }  # fmt: skip


def vae_config(size: str) -> dict[str, Any]:
    """AutoencoderKL arguments; `sd15` is sd-vae-ft-mse's config.json. Always 4 blocks (1/8)."""
    channels, layers, groups = {
        "sd15": ([128, 256, 512, 512], 2, 32),
        "cpu": ([16, 32, 32, 64], 1, 16),
        "tiny": ([8, 8, 16, 16], 1, 4),
    }[size]
    return {
        "in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4, "block_out_channels": channels,
        "layers_per_block": layers, "latent_channels": 4, "norm_num_groups": groups,
        "sample_size": 512 if size == "sd15" else 64, "scaling_factor": 0.18215,
        "act_fn": "silu",
    }  # fmt: skip


def refiner_config(size: str) -> dict[str, Any]:
    """The stage-2 RefinerUNet arguments; `sd15` uses the official "base" preset (in_channels 7)."""
    from pipeline.models.refiner import refiner_preset

    if size == "sd15":
        return refiner_preset("base", in_channels=7)
    channels = (16, 32, 32, 64) if size == "cpu" else (8, 16)
    return {
        "sample_size": 256 if size == "cpu" else 32, "in_channels": 7, "out_channels": 3,
        "down_block_types": ("DownBlock2D",) * len(channels),
        "up_block_types": ("UpBlock2D",) * len(channels), "block_out_channels": channels,
        "layers_per_block": 1, "downsample_padding": 0, "attention_head_dim": None,
        "norm_num_groups": 8 if size == "cpu" else 4, "norm_eps": 1e-6, "input_residual": True,
    }  # fmt: skip


def text_encoder_config(size: str) -> Any:
    """CLIPTextConfig of SD-1.5's text encoder (ViT-L/14 text tower) or a small stand-in whose
    vocabulary holds the tiny tokenizer's."""
    from transformers import CLIPTextConfig

    if size == "sd15":
        return CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
            projection_dim=768, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
        )  # fmt: skip
    vocab, dim = len(TINY_VOCAB), TEXT_DIM[size]
    return CLIPTextConfig(
        vocab_size=vocab, hidden_size=dim, intermediate_size=37 if size == "tiny" else 2 * dim,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
        hidden_act="quick_gelu", projection_dim=dim, bos_token_id=vocab - 2,
        eos_token_id=vocab - 1, pad_token_id=vocab - 1,
    )  # fmt: skip


def tiny_tokenizer() -> Any:
    """A CLIPTokenizer over `TINY_VOCAB`, its ids below every stand-in text encoder's vocab."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer(
        vocab={token: i for i, token in enumerate(TINY_VOCAB)},
        merges=[("t", "h"), ("th", "e</w>")],
        model_max_length=77,
    )


def random_modules(
    size: str, seed: int = 0, device: torch.device | str = "cpu", *, text_encoder: bool = True
) -> dict[str, torch.nn.Module | torch.Tensor]:
    """The random modules of a model: vae, unet, refiner, a random empty-prompt embedding
    `prompt_embeds` (1, 77, D) and (drawn last, so that the others do not depend on it) the
    text_encoder; created directly on `device` (no multi-GB host copy)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from pipeline.models.refiner import RefinerUNet

    device = torch.device(device)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.device(device):
        torch.manual_seed(seed)
        modules: dict[str, Any] = {
            "vae": AutoencoderKL(**vae_config(size)),
            "unet": UNet2DConditionModel(**unet_config(size)),
            "refiner": RefinerUNet(**refiner_config(size)),
            "prompt_embeds": torch.randn(1, 77, TEXT_DIM[size]),
        }
        if text_encoder:
            modules["text_encoder"] = CLIPTextModel(text_encoder_config(size))
    if size == "tiny":
        # Random init leaves the refiner's output tiny next to its residual; scale it up so the
        # tests can see stage 2 at work.
        modules["refiner"].conv_out.weight.data.mul_(20.0)
    return modules


def write_model_dir(root: Path, size: str = "tiny", seed: int = 0, *, text: str = "clip") -> Path:
    """A random-weight model directory in the official layout under `root`; returns `root`.

    text "clip": tokenizer/ (the tiny tokenizer) and text_encoder/, as the downloads have them;
    "embeds": `empty_prompt_embeds.safetensors` instead (neither tokenizer nor text encoder is
    needed, as `harmonize model assemble` writes it).
    """
    from safetensors.torch import save_file

    from pipeline.models.layout import EMPTY_PROMPT_EMBEDS, EMPTY_PROMPT_KEY, SCHEDULER

    root = Path(root)
    modules = random_modules(size, seed, text_encoder=text == "clip")
    root.mkdir(parents=True, exist_ok=True)
    (root / SCHEDULER).mkdir(exist_ok=True)
    (root / SCHEDULER / "scheduler_config.json").write_text(
        json.dumps(SD_INPAINTING_SCHEDULER, indent=2)
    )
    names = ("vae", "unet", "refiner")
    if text == "clip":
        tiny_tokenizer().save_pretrained(root / "tokenizer")
        names = ("text_encoder", *names)
    else:
        embeds = modules["prompt_embeds"].contiguous()
        save_file({EMPTY_PROMPT_KEY: embeds}, str(root / EMPTY_PROMPT_EMBEDS))
    for name in names:
        modules[name].save_pretrained(root / name)  # type: ignore[union-attr]
    return root


def build_components(size: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Any:
    """`DiffHarmonyComponents` in memory (random weights, the random empty-prompt embedding), as
    `load_components` returns them: on `device` in `dtype`, SDPA attention, eval mode."""
    from diffusers import EulerAncestralDiscreteScheduler
    from diffusers.models.attention_processor import AttnProcessor2_0

    from pipeline.models.components import DiffHarmonyComponents, public_config

    modules = random_modules(size, seed, device, text_encoder=False)
    unet, vae, refiner = (modules[name] for name in ("unet", "vae", "refiner"))
    for model in (unet, vae):
        model.set_attn_processor(AttnProcessor2_0())  # type: ignore[operator]
    for model in (unet, vae, refiner):
        model.to(device, dtype).eval().requires_grad_(False)
    scheduler = EulerAncestralDiscreteScheduler.from_config(SD_INPAINTING_SCHEDULER)
    return DiffHarmonyComponents(
        root=Path("/nonexistent"),
        unet=unet,
        vae=vae,
        scheduler=scheduler,
        refiner=refiner,  # type: ignore[arg-type]
        empty_prompt_embeds=modules["prompt_embeds"].to(device, dtype),  # type: ignore[union-attr]
        checksums={"random": f"{size}:{seed}"},
        configs={"unet": public_config(unet.config), "vae": public_config(vae.config)},
    )
