"""DiffHarmony stage 2: the refinement UNet (the official `UNet2DCustom`), as a plain nn.Module.

Enters: (B, in_channels, H, W) with in_channels 3, 4 or 7; the released model takes 7 =
cat([stage-1 output in [-1, 1], mask in {0, 1}, composite in [-1, 1]]) at 256 x 256.
Leaves: (B, out_channels, H, W); with `input_residual` the first `out_channels` input channels are
added back, so the network predicts a correction of the stage-1 image.

A diffusers-style UNet2D without any time embedding: every block is built by the same diffusers
factories the official class calls (`get_down_block`, `UNetMidBlock2D`, `get_up_block`) with
`temb_channels=None`, so the module tree, and therefore every state-dict key, is the official one
(`conv_in`, `down_blocks.*`, `mid_block.*`, `up_blocks.*`, `conv_norm_out`, `conv_out`). The
official checkpoint loads with `strict=True`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2D, get_down_block, get_up_block
from torch import nn

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "diffusion_pytorch_model.safetensors"
PICKLE_NAME = "diffusion_pytorch_model.bin"
# The class name the official checkpoints carry in their config.json.
OFFICIAL_CLASS_NAME = "UNet2DCustom"
SUPPORTED_IN_CHANNELS = (3, 4, 7)


@dataclass(frozen=True)
class RefinerConfig:
    """The official `UNet2DCustom` arguments; defaults are that class's own defaults."""

    sample_size: int | None = None
    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = (
        "DownBlock2D",
        "AttnDownBlock2D",
        "AttnDownBlock2D",
        "AttnDownBlock2D",
    )
    up_block_types: tuple[str, ...] = (
        "AttnUpBlock2D",
        "AttnUpBlock2D",
        "AttnUpBlock2D",
        "UpBlock2D",
    )
    block_out_channels: tuple[int, ...] = (224, 448, 672, 896)
    layers_per_block: int = 2
    mid_block_scale_factor: float = 1.0
    downsample_padding: int = 1
    downsample_type: str = "conv"
    upsample_type: str = "conv"
    act_fn: str = "silu"
    attention_head_dim: int | None = 8
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    resnet_time_scale_shift: str = "default"
    add_attention: bool = True
    input_residual: bool = False

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> RefinerConfig:
        """From a config.json dict; `_class_name`, `_diffusers_version` and the like are skipped."""
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in config.items() if not k.startswith("_")}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ValueError(f"unknown refiner config keys: {', '.join(unknown)}")
        for key in ("down_block_types", "up_block_types", "block_out_channels"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The config.json the official loader (and ours) reads back."""
        config: dict[str, Any] = {"_class_name": OFFICIAL_CLASS_NAME}
        for key, value in dataclasses.asdict(self).items():
            config[key] = list(value) if isinstance(value, tuple) else value
        return config

    def validate(self) -> None:
        if self.in_channels not in SUPPORTED_IN_CHANNELS:
            raise ValueError(
                f"refiner in_channels must be one of {SUPPORTED_IN_CHANNELS}, "
                f"got {self.in_channels}"
            )
        if self.input_residual and self.out_channels > self.in_channels:
            raise ValueError("input_residual needs out_channels <= in_channels")
        lengths = {
            len(self.down_block_types),
            len(self.up_block_types),
            len(self.block_out_channels),
        }
        if len(lengths) != 1:
            raise ValueError(
                "down_block_types, up_block_types and block_out_channels differ in length"
            )


def _preset(block_out_channels: tuple[int, ...]) -> RefinerConfig:
    # configs/stage2_configs/{small,base,large}.json of the official repository.
    return RefinerConfig(
        sample_size=256,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownBlock2D",) * 4,
        up_block_types=("UpBlock2D",) * 4,
        block_out_channels=block_out_channels,
        layers_per_block=2,
        mid_block_scale_factor=1.0,
        downsample_padding=0,
        downsample_type="conv",
        upsample_type="conv",
        act_fn="silu",
        attention_head_dim=None,
        norm_num_groups=32,
        norm_eps=1e-6,
        add_attention=True,
        input_residual=True,
    )


PRESETS: dict[str, RefinerConfig] = {
    "small": _preset((64, 128, 256, 256)),
    "base": _preset((128, 256, 512, 512)),
    "large": _preset((256, 512, 1024, 1024)),
}


def refiner_preset(name: str, in_channels: int = 7) -> RefinerConfig:
    """An official preset; the official training script sets in_channels (the release uses 7)."""
    return dataclasses.replace(PRESETS[name], in_channels=in_channels)


def rename_legacy_attention_keys(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Map pre-diffusers-0.14 attention names (query/key/value/proj_attn) to the current ones.

    Checkpoints saved by the official code (diffusers 0.26) already use the current names; older
    diffusers checkpoints (the sd-vae-ft-mse VAE among them) may not. Other keys pass unchanged.
    """
    renames = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
    renamed: dict[str, Any] = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if len(parts) >= 3 and "attentions" in parts and parts[-2] in renames:
            key = ".".join([*parts[:-2], renames[parts[-2]], parts[-1]])
        renamed[key] = value
    return renamed


def _head_dim(config: RefinerConfig, channels: int) -> int:
    # Official: a null attention_head_dim means one head spanning all channels.
    return config.attention_head_dim if config.attention_head_dim is not None else channels


class RefinerUNet(nn.Module):
    """The stage-2 UNet; parameter names are those of the official `UNet2DCustom`."""

    def __init__(self, config: RefinerConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        channels = config.block_out_channels

        self.conv_in = nn.Conv2d(config.in_channels, channels[0], kernel_size=3, padding=(1, 1))
        self.down_blocks = nn.ModuleList()
        self.up_blocks = nn.ModuleList()

        output_channel = channels[0]
        for i, block_type in enumerate(config.down_block_types):
            input_channel, output_channel = output_channel, channels[i]
            self.down_blocks.append(
                get_down_block(
                    block_type,
                    num_layers=config.layers_per_block,
                    in_channels=input_channel,
                    out_channels=output_channel,
                    temb_channels=None,  # no time embedding at all
                    add_downsample=i < len(channels) - 1,
                    resnet_eps=config.norm_eps,
                    resnet_act_fn=config.act_fn,
                    resnet_groups=config.norm_num_groups,
                    attention_head_dim=_head_dim(config, output_channel),
                    downsample_padding=config.downsample_padding,
                    resnet_time_scale_shift=config.resnet_time_scale_shift,
                    downsample_type=config.downsample_type,
                )
            )

        self.mid_block = UNetMidBlock2D(
            in_channels=channels[-1],
            temb_channels=None,
            resnet_eps=config.norm_eps,
            resnet_act_fn=config.act_fn,
            output_scale_factor=config.mid_block_scale_factor,
            resnet_time_scale_shift=config.resnet_time_scale_shift,
            attention_head_dim=_head_dim(config, channels[-1]),
            resnet_groups=config.norm_num_groups,
            add_attention=config.add_attention,
        )

        reversed_channels = list(reversed(channels))
        output_channel = reversed_channels[0]
        for i, block_type in enumerate(config.up_block_types):
            prev_output_channel, output_channel = output_channel, reversed_channels[i]
            input_channel = reversed_channels[min(i + 1, len(channels) - 1)]
            self.up_blocks.append(
                get_up_block(
                    block_type,
                    num_layers=config.layers_per_block + 1,
                    in_channels=input_channel,
                    out_channels=output_channel,
                    prev_output_channel=prev_output_channel,
                    temb_channels=None,
                    add_upsample=i < len(channels) - 1,
                    resnet_eps=config.norm_eps,
                    resnet_act_fn=config.act_fn,
                    resnet_groups=config.norm_num_groups,
                    attention_head_dim=_head_dim(config, output_channel),
                    resnet_time_scale_shift=config.resnet_time_scale_shift,
                    upsample_type=config.upsample_type,
                )
            )

        self.conv_norm_out = nn.GroupNorm(
            num_channels=channels[0], num_groups=config.norm_num_groups, eps=config.norm_eps
        )
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(channels[0], config.out_channels, kernel_size=3, padding=1)

    @classmethod
    def from_config(cls, config: RefinerConfig | dict[str, Any]) -> RefinerUNet:
        if isinstance(config, dict):
            config = RefinerConfig.from_dict(config)
        return cls(config)

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        *,
        allow_unsafe_pickle: bool = False,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> RefinerUNet:
        """Load `folder/config.json` + `diffusion_pytorch_model.safetensors` (or `.bin`), strictly.

        A pickled `.bin` is refused unless `allow_unsafe_pickle`; see `loading.read_weights`.
        """
        # Imported here: loading.py imports this module to check refiner folders.
        from pipeline.models.loading import read_weights, weight_files

        folder = Path(folder)
        config = json.loads((folder / CONFIG_NAME).read_text())
        model = cls.from_config(config)
        state_dict: dict[str, torch.Tensor] = {}
        for path in weight_files(folder, allow_unsafe_pickle=allow_unsafe_pickle):
            state_dict.update(read_weights(path, allow_unsafe_pickle=allow_unsafe_pickle))
        model.load_state_dict(rename_legacy_attention_keys(state_dict), strict=True)
        return model.to(device=device, dtype=dtype).eval().requires_grad_(False)

    def save_pretrained(self, folder: str | Path) -> None:
        """Write config.json + diffusion_pytorch_model.safetensors in the official layout."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFIG_NAME).write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(tensors, str(folder / SAFETENSORS_NAME), metadata={"format": "pt"})

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, H, W) -> (B, out_channels, H, W)."""
        skip = sample[:, : self.config.out_channels] if self.config.input_residual else None

        hidden = self.conv_in(sample)  # (B, C0, H, W)
        skips: tuple[torch.Tensor, ...] = (hidden,)
        for block in self.down_blocks:
            hidden, block_skips = block(hidden_states=hidden, temb=None)
            skips += block_skips
        hidden = self.mid_block(hidden, None)  # (B, C_last, H / 2^(n-1), W / 2^(n-1))

        for i, block in enumerate(self.up_blocks):
            block_skips = skips[-len(block.resnets) :]
            skips = skips[: -len(block.resnets)]
            # Upsample to the skip's exact size so sides that are not multiples of 2^(n-1) work too
            # (for the official 256 x 256 this is the plain 2x upsampling).
            is_final = i == len(self.up_blocks) - 1
            upsample_size = None if is_final else tuple(skips[-1].shape[2:])
            hidden = block(hidden, block_skips, None, upsample_size)

        hidden = self.conv_out(self.conv_act(self.conv_norm_out(hidden)))  # (B, out, H, W)
        if skip is not None:
            hidden = hidden + skip
        return hidden
