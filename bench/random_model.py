"""Random-weight DiffHarmony models at three sizes: one builder for the benchmarks and the tests.

Enters: a size, a seed, and where the model goes: a device and dtype (`build_components`, in
memory) or a folder (`write_model_dir`); for DiffHarmony++, whether vae/ is the Harmony-VAE
(`harmony_vae`) and whose model it is (`direction`: the forward one, or the inverse one that
makes composites).
Leaves: `DiffHarmonyComponents` as `load_components` returns them, or a model directory in the
official layout that `harmonize model check` accepts; `harmony_classifier_state`, a random
harmony classifier (ResNet-50, 2 classes: its one real size) as a state dict.

Sizes:
- `tiny`: milliseconds per image; the test suite's checkpoint (tests/tiny_checkpoint.py writes
  the formats of real downloads from it);
- `cpu`: the CPU benchmark's model, small enough for a 2-core machine but heavy enough that the
  model costs next to the I/O what it costs in a GPU deployment (bench/RESULTS.md);
- `sd15`: the real architectures: SD-1.5 inpainting UNet (9 input channels), sd-vae-ft-mse
  VAE, the official "base" refiner preset, SD-1.5's CLIP text encoder.
The same (size, seed) gives the same weights, in memory and on disk. DiffHarmony++'s modules
(the Harmony-VAE, the inverse model's UNet and Harmony-VAE: the release's cvae, diffharmony-gen,
cvae-gen) come from a random stream of their own, so asking for them changes no other weight.
Works offline.
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


# DiffHarmony++'s modules draw from seed + this, apart from the base model's stream.
_HARMONY_SEED_OFFSET = 1_000_003


def condition_vae_from(vae: Any) -> Any:
    """A Harmony-VAE made from `vae` as the official `ConditionVAE.from_vae` makes it (encoder,
    decoder, quant convs; the conditional encoder from the encoder), then "trained": every
    weight perturbed, and the zero-initialised skips and `add_conv_in` random and non-zero, so
    that tests can see each of them. Draws from the caller's RNG state, on `vae`'s device."""
    from pipeline.models.condition_vae import ConditionVAE

    shared = (
        "in_channels out_channels down_block_types up_block_types block_out_channels "
        "layers_per_block act_fn latent_channels norm_num_groups sample_size scaling_factor"
    ).split()
    condition_vae = ConditionVAE(**{k: vae.config[k] for k in shared}, additional_in_channels=1)
    condition_vae.to(vae.device)
    condition_vae.load_state_dict(vae.state_dict(), strict=False)
    condition_vae.conditional_encoder.load_state_dict(vae.encoder.state_dict(), strict=False)
    with torch.no_grad():
        for name, parameter in condition_vae.named_parameters():
            noise = torch.randn(parameter.shape, device=parameter.device)
            if "skip_conv" in name or "add_conv_in" in name:
                parameter.copy_(noise * 0.1)
                parameter.add_(parameter.sign() * 0.02)  # no weight exactly 0
            else:
                parameter.mul_(1 + 0.05 * noise)
    return condition_vae


def random_modules(
    size: str,
    seed: int = 0,
    device: torch.device | str = "cpu",
    *,
    text_encoder: bool = True,
    harmony: bool = False,
) -> dict[str, torch.nn.Module | torch.Tensor]:
    """The random modules of a model: vae, unet, refiner, a random empty-prompt embedding
    `prompt_embeds` (1, 77, D) and (drawn last, so that the others do not depend on it) the
    text_encoder; created directly on `device` (no multi-GB host copy). `harmony` adds
    DiffHarmony++'s `condition_vae` (from vae), `inverse_unet` and `inverse_condition_vae`
    (same architectures, other weights), from their own random stream."""
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
    if harmony:
        with torch.random.fork_rng(devices=devices), torch.device(device):
            torch.manual_seed(seed + _HARMONY_SEED_OFFSET)
            modules["condition_vae"] = condition_vae_from(modules["vae"])
            modules["inverse_unet"] = UNet2DConditionModel(**unet_config(size))
            modules["inverse_condition_vae"] = condition_vae_from(modules["vae"])
    return modules


def _chosen(
    modules: dict[str, Any], harmony_vae: bool, direction: str
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(vae, unet) of the model asked for: the plain VAE or the Harmony-VAE, the forward or the
    inverse model's."""
    prefix = "inverse_" if direction == "inverse" else ""
    vae = modules[f"{prefix}condition_vae"] if harmony_vae else modules["vae"]
    return vae, modules[f"{prefix}unet"]


def write_model_dir(
    root: Path,
    size: str = "tiny",
    seed: int = 0,
    *,
    text: str = "clip",
    harmony_vae: bool = False,
    direction: str = "forward",
) -> Path:
    """A random-weight model directory in the official layout under `root`; returns `root`.

    text "clip": tokenizer/ (the tiny tokenizer) and text_encoder/, as the downloads have them;
    "embeds": `empty_prompt_embeds.safetensors` instead (neither tokenizer nor text encoder is
    needed, as `harmonize model assemble` writes it). `harmony_vae`: vae/ is DiffHarmony++'s
    Harmony-VAE (a ConditionVAE); `direction` "inverse": the inverse model's UNet (and
    Harmony-VAE), as `model assemble --direction inverse` takes them from the release.
    """
    from safetensors.torch import save_file

    from pipeline.models.layout import EMPTY_PROMPT_EMBEDS, EMPTY_PROMPT_KEY, SCHEDULER

    root = Path(root)
    modules = random_modules(
        size, seed, text_encoder=text == "clip", harmony=harmony_vae or direction == "inverse"
    )
    modules["vae"], modules["unet"] = _chosen(modules, harmony_vae, direction)
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


def build_components(
    size: str,
    device: torch.device,
    dtype: torch.dtype,
    seed: int = 0,
    *,
    harmony_vae: bool = False,
    direction: str = "forward",
) -> Any:
    """`DiffHarmonyComponents` in memory (random weights, the random empty-prompt embedding), as
    `load_components` returns them: on `device` in `dtype`, SDPA attention, eval mode; the
    Harmony-VAE and the inverse model's UNet as `write_model_dir` picks them."""
    from diffusers import EulerAncestralDiscreteScheduler
    from diffusers.models.attention_processor import AttnProcessor2_0

    from pipeline.models.components import DiffHarmonyComponents, public_config

    modules = random_modules(
        size, seed, device, text_encoder=False, harmony=harmony_vae or direction == "inverse"
    )
    vae, unet = _chosen(modules, harmony_vae, direction)
    refiner = modules["refiner"]
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
        checksums={"random": f"{size}:{seed}:{direction}:{'cvae' if harmony_vae else 'vae'}"},
        configs={"unet": public_config(unet.config), "vae": public_config(vae.config)},
    )


def harmony_classifier_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A random harmony classifier (`pipeline.models.classifier.ResNet50`, 2 classes) whose
    probabilities are not saturated.

    The architecture is fixed (the official script builds torchvision's resnet50), so unlike
    the models above this one has the real size (~94 MB in fp32). Batch-norm statistics are
    measured on random images, smooth and detailed (as training would have set them), so that
    activations stay in range, and the fc is centred on those images' mean feature and scaled
    so that the class-1 probability varies between images (about 0.1 to 0.9).
    """
    import torch.nn.functional as F

    from pipeline.models.classifier import IMAGENET_MEAN, IMAGENET_STD, ResNet50

    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ResNet50(num_classes=2)
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.momentum = None  # cumulative average over the calibration batches
        # Smooth and detailed images alike: photos and noisy test images stay in range.
        images = torch.cat(
            [F.interpolate(torch.rand(2, 3, n, n), size=256, mode="bilinear") for n in (8, 64)]
        )
        images = (images - mean) / std
        with torch.no_grad():
            model.train()(images)
            model.eval()
            features = model.avgpool(
                model.layer4(model.layer3(model.layer2(model.layer1(
                    model.maxpool(model.relu(model.bn1(model.conv1(images))))
                ))))
            ).flatten(1)  # fmt: skip
            model.fc.weight.mul_(8.0)
            model.fc.bias.copy_(-model.fc.weight @ features.mean(0))
    return {k: v.clone() for k, v in model.state_dict().items()}
