"""DiffHarmony++'s Harmony-VAE (the official `ConditionVAE`), as a diffusers model.

Enters: images (B, 3, H, W) in [-1, 1] to `encode`, as `AutoencoderKL.encode`; to decode, the
stage-1 latents (B, 4, H/8, W/8) already divided by `scaling_factor`, and the condition
cat([image in [-1, 1], mask in {0, 1}]) (B, 3 + additional_in_channels, H, W) at the same
working resolution.
Leaves: `encode` -> `AutoencoderKLOutput` (the ordinary encoder's posterior); `encode_condition`
-> the condition's posterior and the skip features of the conditional encoder;
`decode_with_condition` -> images (B, 3, H, W), roughly in [-1, 1].

The Harmony-VAE decodes with the help of the unharmonized input, so that what the latent
autoencoder loses (textures, edges, small text) comes back from the input instead of being
regenerated: a second, conditional encoder reads the condition (an extra `add_conv_in` for the
mask, added to `conv_in`'s output), and 1x1 skip convolutions, zero-initialised as in
ControlNet, carry its features into the decoder (after every decoder resnet, and after the mid
block); its latent reaches the decoder's input through `latent_skip_conv`, also 1x1 and
zero-initialised:

    z_cond ~ posterior(condition)                       (sampled by the caller: its generator)
    z      = post_quant_conv(z) + latent_skip_conv(post_quant_conv(z_cond))
    image  = decoder(z, skip features, mid-block skip)

Module tree, parameter names and config keys are the official ones (`encoder`, `quant_conv`,
`post_quant_conv`, `conditional_encoder.{conv_in, add_conv_in, down_blocks,
down_block_skip_convs, mid_block, mid_block_skip_conv, conv_norm_out, conv_out}`, `decoder`,
`latent_skip_conv`), built from diffusers' own `Encoder` / `Decoder` and their blocks, so the
release's `vae/` folder (config.json saying "ConditionVAE" + weights) loads through
`from_pretrained` with no missing or unexpected weight. Slicing, tiling and training hooks of
the official class are left out: the pipeline decodes whole batches at the working resolution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import AttentionMixin
from diffusers.models.autoencoders.vae import Decoder, DiagonalGaussianDistribution, Encoder
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

# diffusers writes the class's own name as config.json's `_class_name`: "ConditionVAE", as the
# release's (`layout.CONDITION_VAE_CLASS_NAME`), which is how the loader picks this class.


def _zero_conv(in_channels: int, out_channels: int) -> nn.Conv2d:
    """A 1x1 convolution that starts as zero (the trained weights replace it)."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size=1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


@dataclass
class ConditionFeatures:
    """What the conditional encoder gives the decoder: one skip per decoder resnet (in encoder
    order: conv_in's output, then each down block's resnets and its downsampler), and the
    mid block's."""

    skips: list[torch.Tensor]
    mid_skip: torch.Tensor


class ConditionEncoder(Encoder):
    """The official `EncoderSkip`: diffusers' `Encoder` + `add_conv_in` + zero-initialised
    1x1 skip convolutions on every feature the decoder will take.

    The skip of a downsampler's output maps block i's channels to block i + 1's: the decoder
    block that receives it works at block i + 1's width.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        down_block_types: tuple[str, ...],
        block_out_channels: tuple[int, ...],
        layers_per_block: int,
        norm_num_groups: int,
        act_fn: str,
        additional_in_channels: int,
    ) -> None:
        super().__init__(
            in_channels=in_channels,
            out_channels=out_channels,
            down_block_types=down_block_types,
            block_out_channels=block_out_channels,
            layers_per_block=layers_per_block,
            norm_num_groups=norm_num_groups,
            act_fn=act_fn,
            double_z=True,
        )
        self.in_channels = in_channels
        self.add_conv_in = (
            nn.Conv2d(additional_in_channels, block_out_channels[0], kernel_size=3, padding=1)
            if additional_in_channels > 0
            else None
        )
        skips = [_zero_conv(block_out_channels[0], block_out_channels[0])]  # conv_in's output
        for i, channels in enumerate(block_out_channels):
            skips += [_zero_conv(channels, channels) for _ in range(layers_per_block)]
            if i < len(block_out_channels) - 1:  # the downsampler's output
                skips.append(_zero_conv(channels, block_out_channels[i + 1]))
        self.down_block_skip_convs = nn.ModuleList(skips)
        self.mid_block_skip_conv = _zero_conv(block_out_channels[-1], block_out_channels[-1])

    def forward(  # type: ignore[override]
        self, condition: torch.Tensor
    ) -> tuple[torch.Tensor, ConditionFeatures]:
        """condition (B, in + additional, H, W) -> moments (B, 2 * latent, h, w), features."""
        image, extra = condition[:, : self.in_channels], condition[:, self.in_channels :]
        sample = self.conv_in(image)  # (B, C0, H, W)
        if self.add_conv_in is not None:
            sample = self.add_conv_in(extra) + sample
        features = [sample]
        for down_block in self.down_blocks:
            for resnet in down_block.resnets:
                sample = resnet(sample, temb=None)
                features.append(sample)
            for downsampler in down_block.downsamplers or ():
                sample = downsampler(sample)  # (B, C_i, H_i / 2, W_i / 2)
                features.append(sample)
        sample = self.mid_block(sample)  # (B, C_last, h, w)
        mid = sample
        sample = self.conv_out(self.conv_act(self.conv_norm_out(sample)))  # (B, 2 * latent, h, w)
        skips = [conv(feature) for conv, feature in zip(self.down_block_skip_convs, features)]
        return sample, ConditionFeatures(skips, self.mid_block_skip_conv(mid))


class SkipDecoder(Decoder):
    """The official `DecoderSkip`: diffusers' `Decoder` whose resnets each add one skip feature
    of the conditional encoder (the deepest first), and whose mid block adds the mid skip."""

    def forward(  # type: ignore[override]
        self, sample: torch.Tensor, features: ConditionFeatures
    ) -> torch.Tensor:
        """sample (B, latent, h, w) after post_quant_conv -> image (B, out_channels, H, W)."""
        skips = list(features.skips)
        sample = self.conv_in(sample)  # (B, C_last, h, w)
        sample = self.mid_block(sample, None) + features.mid_skip
        for up_block in self.up_blocks:
            for resnet in up_block.resnets:
                sample = resnet(sample, temb=None) + skips.pop()
            for upsampler in up_block.upsamplers or ():
                sample = upsampler(sample)  # (B, C, 2 h_i, 2 w_i)
        if skips:
            raise ValueError(f"{len(skips)} skip features left over: encoder and decoder differ")
        return self.conv_out(self.conv_act(self.conv_norm_out(sample)))  # (B, 3, H, W)


class ConditionVAE(ModelMixin, AttentionMixin, ConfigMixin):
    """The Harmony-VAE; config keys and parameter names are those of the official class."""

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",),
        up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",),
        block_out_channels: tuple[int, ...] = (64,),
        layers_per_block: int = 1,
        act_fn: str = "silu",
        latent_channels: int = 4,
        norm_num_groups: int = 32,
        sample_size: int = 32,
        additional_in_channels: int = 1,
        scaling_factor: float = 0.18215,
        force_upcast: bool = True,
    ) -> None:
        """The official `ConditionVAE` arguments and defaults (`sample_size` and `force_upcast`
        only recorded: no tiling here, and the dtype is the run's)."""
        super().__init__()
        self.encoder = Encoder(
            in_channels=in_channels,
            out_channels=latent_channels,
            down_block_types=down_block_types,
            block_out_channels=block_out_channels,
            layers_per_block=layers_per_block,
            act_fn=act_fn,
            norm_num_groups=norm_num_groups,
            double_z=True,
        )
        self.conditional_encoder = ConditionEncoder(
            in_channels=in_channels,
            out_channels=latent_channels,
            down_block_types=down_block_types,
            block_out_channels=block_out_channels,
            layers_per_block=layers_per_block,
            norm_num_groups=norm_num_groups,
            act_fn=act_fn,
            additional_in_channels=additional_in_channels,
        )
        self.decoder = SkipDecoder(
            in_channels=latent_channels,
            out_channels=out_channels,
            up_block_types=up_block_types,
            block_out_channels=block_out_channels,
            layers_per_block=layers_per_block,
            norm_num_groups=norm_num_groups,
            act_fn=act_fn,
        )
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1)
        self.latent_skip_conv = _zero_conv(latent_channels, latent_channels)

    def encode(self, x: torch.Tensor, return_dict: bool = True) -> AutoencoderKLOutput | tuple:
        """The ordinary encoder, as `AutoencoderKL.encode`: (B, 3, H, W) -> posterior."""
        posterior = DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def encode_condition(
        self, condition: torch.Tensor
    ) -> tuple[DiagonalGaussianDistribution, ConditionFeatures]:
        """cat([image, mask]) (B, 3 + additional, H, W) -> its posterior (through the shared
        `quant_conv`, as the official class) and the decoder's skip features."""
        moments, features = self.conditional_encoder(condition)
        return DiagonalGaussianDistribution(self.quant_conv(moments)), features

    def decode_with_condition(
        self, z: torch.Tensor, z_condition: torch.Tensor, features: ConditionFeatures
    ) -> torch.Tensor:
        """z, z_condition (B, latent, h, w), unscaled -> image (B, 3, H, W)."""
        z = self.post_quant_conv(z) + self.latent_skip_conv(self.post_quant_conv(z_condition))
        return self.decoder(z, features)
