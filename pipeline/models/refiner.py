"""DiffHarmony stage 2: the refinement UNet (the official `UNet2DCustom`), as a diffusers model.

Enters: (B, in_channels, H, W) with in_channels 3, 4 or 7; the released model takes 7 =
cat([stage-1 output in [-1, 1], mask in {0, 1}, composite in [-1, 1]]) at 256 x 256.
Leaves: (B, out_channels, H, W); with `input_residual` the first `out_channels` input channels are
added back, so the network predicts a correction of the stage-1 image.

A diffusers-style UNet2D without any time embedding: every block is built by the same diffusers
factories the official class calls (`get_down_block`, `UNetMidBlock2D`, `get_up_block`) with
`temb_channels=None`, so the module tree, and therefore every state-dict key, is the official one
(`conv_in`, `down_blocks.*`, `mid_block.*`, `up_blocks.*`, `conv_norm_out`, `conv_out`). Its
config keys are the official class's arguments, so the released folder (config.json + weights)
loads through diffusers' `from_pretrained` with no missing or unexpected weight.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2D, get_down_block, get_up_block
from torch import nn

# The class name the official checkpoints carry in their config.json.
OFFICIAL_CLASS_NAME = "UNet2DCustom"
SUPPORTED_IN_CHANNELS = (3, 4, 7)


def _preset(block_out_channels: tuple[int, ...]) -> dict[str, Any]:
    # configs/stage2_configs/{small,base,large}.json of the official repository.
    return {
        "sample_size": 256,
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownBlock2D",) * 4,
        "up_block_types": ("UpBlock2D",) * 4,
        "block_out_channels": block_out_channels,
        "layers_per_block": 2,
        "mid_block_scale_factor": 1.0,
        "downsample_padding": 0,
        "downsample_type": "conv",
        "upsample_type": "conv",
        "act_fn": "silu",
        "attention_head_dim": None,
        "norm_num_groups": 32,
        "norm_eps": 1e-6,
        "add_attention": True,
        "input_residual": True,
    }


PRESETS: dict[str, dict[str, Any]] = {
    "small": _preset((64, 128, 256, 256)),
    "base": _preset((128, 256, 512, 512)),
    "large": _preset((256, 512, 1024, 1024)),
}


def refiner_preset(name: str, in_channels: int = 7) -> dict[str, Any]:
    """An official preset's arguments; the official training script sets in_channels (7 in the
    release). `RefinerUNet(**refiner_preset("base"))`."""
    return {**PRESETS[name], "in_channels": in_channels}


def _head_dim(attention_head_dim: int | None, channels: int) -> int:
    # Official: a null attention_head_dim means one head spanning all channels.
    return attention_head_dim if attention_head_dim is not None else channels


class RefinerUNet(ModelMixin, ConfigMixin):
    """The stage-2 UNet; parameter names and config keys are those of the official `UNet2DCustom`.

    A diffusers model like the official class, so `from_pretrained` / `save_pretrained` are
    diffusers' own: safetensors or (when allowed) pickles read with `weights_only=True`, variants,
    shards, and diffusers' renaming of pre-0.14 attention weight names.
    """

    @register_to_config
    def __init__(
        self,
        sample_size: int | None = None,
        in_channels: int = 3,
        out_channels: int = 3,
        down_block_types: tuple[str, ...] = (
            "DownBlock2D",
            "AttnDownBlock2D",
            "AttnDownBlock2D",
            "AttnDownBlock2D",
        ),
        up_block_types: tuple[str, ...] = (
            "AttnUpBlock2D",
            "AttnUpBlock2D",
            "AttnUpBlock2D",
            "UpBlock2D",
        ),
        block_out_channels: tuple[int, ...] = (224, 448, 672, 896),
        layers_per_block: int = 2,
        mid_block_scale_factor: float = 1.0,
        downsample_padding: int = 1,
        downsample_type: str = "conv",
        upsample_type: str = "conv",
        act_fn: str = "silu",
        attention_head_dim: int | None = 8,
        norm_num_groups: int = 32,
        norm_eps: float = 1e-5,
        resnet_time_scale_shift: str = "default",
        add_attention: bool = True,
        input_residual: bool = False,
    ) -> None:
        """The official `UNet2DCustom` arguments and defaults."""
        super().__init__()
        if in_channels not in SUPPORTED_IN_CHANNELS:
            raise ValueError(
                f"refiner in_channels must be one of {SUPPORTED_IN_CHANNELS}, got {in_channels}"
            )
        if input_residual and out_channels > in_channels:
            raise ValueError("input_residual needs out_channels <= in_channels")
        if len({len(down_block_types), len(up_block_types), len(block_out_channels)}) != 1:
            raise ValueError(
                "down_block_types, up_block_types and block_out_channels differ in length"
            )
        channels = tuple(block_out_channels)

        self.conv_in = nn.Conv2d(in_channels, channels[0], kernel_size=3, padding=(1, 1))
        self.down_blocks = nn.ModuleList()
        self.up_blocks = nn.ModuleList()

        output_channel = channels[0]
        for i, block_type in enumerate(down_block_types):
            input_channel, output_channel = output_channel, channels[i]
            self.down_blocks.append(
                get_down_block(
                    block_type,
                    num_layers=layers_per_block,
                    in_channels=input_channel,
                    out_channels=output_channel,
                    temb_channels=None,  # no time embedding at all
                    add_downsample=i < len(channels) - 1,
                    resnet_eps=norm_eps,
                    resnet_act_fn=act_fn,
                    resnet_groups=norm_num_groups,
                    attention_head_dim=_head_dim(attention_head_dim, output_channel),
                    downsample_padding=downsample_padding,
                    resnet_time_scale_shift=resnet_time_scale_shift,
                    downsample_type=downsample_type,
                )
            )

        self.mid_block = UNetMidBlock2D(
            in_channels=channels[-1],
            temb_channels=None,
            resnet_eps=norm_eps,
            resnet_act_fn=act_fn,
            output_scale_factor=mid_block_scale_factor,
            resnet_time_scale_shift=resnet_time_scale_shift,
            attention_head_dim=_head_dim(attention_head_dim, channels[-1]),
            resnet_groups=norm_num_groups,
            add_attention=add_attention,
        )

        reversed_channels = list(reversed(channels))
        output_channel = reversed_channels[0]
        for i, block_type in enumerate(up_block_types):
            prev_output_channel, output_channel = output_channel, reversed_channels[i]
            input_channel = reversed_channels[min(i + 1, len(channels) - 1)]
            self.up_blocks.append(
                get_up_block(
                    block_type,
                    num_layers=layers_per_block + 1,
                    in_channels=input_channel,
                    out_channels=output_channel,
                    prev_output_channel=prev_output_channel,
                    temb_channels=None,
                    add_upsample=i < len(channels) - 1,
                    resnet_eps=norm_eps,
                    resnet_act_fn=act_fn,
                    resnet_groups=norm_num_groups,
                    attention_head_dim=_head_dim(attention_head_dim, output_channel),
                    resnet_time_scale_shift=resnet_time_scale_shift,
                    upsample_type=upsample_type,
                )
            )

        self.conv_norm_out = nn.GroupNorm(
            num_channels=channels[0], num_groups=norm_num_groups, eps=norm_eps
        )
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(channels[0], out_channels, kernel_size=3, padding=1)

    def to_json_string(self) -> str:
        """config.json under the official class name, so the release's tools (and `harmonize
        model assemble`) recognise a refiner saved here."""
        config = json.loads(super().to_json_string())
        config["_class_name"] = OFFICIAL_CLASS_NAME
        return json.dumps(config, indent=2, sort_keys=True) + "\n"

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
