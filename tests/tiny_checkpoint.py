"""A tiny random-weight DiffHarmony model directory in exactly the official layout, for tests.

Enters: a folder to write into.
Leaves: ROOT/{tokenizer,text_encoder,scheduler,vae,unet,refiner} with the same file names,
config keys and module structure as the real components (stable-diffusion-inpainting's tokenizer,
text encoder and scheduler, sd-vae-ft-mse, the DiffHarmony UNet and refiner), only far smaller.
Weights are drawn from a fixed seed, so two calls write identical files. Works offline.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TEXT_HIDDEN = 32
_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"

# stable-diffusion-inpainting's scheduler/scheduler_config.json, which the official script turns
# into an EulerAncestralDiscreteScheduler with `from_config`.
SD_INPAINTING_SCHEDULER = {
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


def _write_tokenizer(folder: Path) -> int:
    """A byte-level-BPE CLIP tokenizer with a lowercase-letter vocabulary; returns vocab size."""
    folder.mkdir(parents=True)
    letters = "abcdefghijklmnopqrstuvwxyz"
    tokens = list(letters) + [c + "</w>" for c in letters] + [_BOS, _EOS]
    vocab = {token: i for i, token in enumerate(tokens)}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    specials = {"bos_token": _BOS, "eos_token": _EOS, "unk_token": _EOS, "pad_token": _EOS}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials))
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, **specials}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return len(vocab)


def _save_torch_bin(model: torch.nn.Module, path: Path) -> None:
    """A pickled state dict, as older diffusers/transformers releases wrote them."""
    (path.parent / "model.safetensors").unlink(missing_ok=True)
    (path.parent / "diffusion_pytorch_model.safetensors").unlink(missing_ok=True)
    torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, path)


def write_tiny_model_dir(root: Path, *, safetensors: bool = True) -> Path:
    """Write the tiny model directory under `root` and return `root`.

    safetensors=False stores every weight file as a pickled `.bin` instead (for the refusal test).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from pipeline.models.refiner import RefinerConfig, RefinerUNet

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    vocab_size = _write_tokenizer(root / "tokenizer")
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(SD_INPAINTING_SCHEDULER, indent=2)
    )

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=vocab_size,
                hidden_size=TEXT_HIDDEN,
                intermediate_size=37,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=77,
                bos_token_id=vocab_size - 2,
                eos_token_id=vocab_size - 1,
                pad_token_id=vocab_size - 1,
                hidden_act="quick_gelu",
                projection_dim=TEXT_HIDDEN,
            )
        )
        # Four blocks, as sd-vae-ft-mse: the latent is 1/8 of the image side.
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 16, 16),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=4,
            sample_size=64,
            scaling_factor=0.18215,
        )
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=9,  # 4 latent + 1 mask + 4 composite latent
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(16, 32),
            layers_per_block=1,
            cross_attention_dim=TEXT_HIDDEN,
            attention_head_dim=8,
            norm_num_groups=8,
        )
        refiner = RefinerUNet(
            RefinerConfig(
                sample_size=32,
                in_channels=7,
                out_channels=3,
                down_block_types=("DownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "UpBlock2D"),
                block_out_channels=(8, 16),
                layers_per_block=1,
                downsample_padding=0,
                attention_head_dim=None,
                norm_num_groups=4,
                norm_eps=1e-6,
                input_residual=True,
            )
        )
        # Random init leaves the refiner's output tiny next to its residual; scale it up so the
        # tests can see stage 2 at work.
        refiner.conv_out.weight.data.mul_(20.0)

    text_encoder.save_pretrained(root / "text_encoder")
    vae.save_pretrained(root / "vae")
    unet.save_pretrained(root / "unet")
    refiner.save_pretrained(root / "refiner")
    if not safetensors:
        _save_torch_bin(text_encoder, root / "text_encoder" / "pytorch_model.bin")
        for name, model in (("vae", vae), ("unet", unet), ("refiner", refiner)):
            _save_torch_bin(model, root / name / "diffusion_pytorch_model.bin")
    return root
