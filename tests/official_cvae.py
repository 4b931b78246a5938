"""The official Harmony-VAE decode, step by step, in the official code's order of operations.

Written from the official repository's `src/models/vae.py` (`EncoderSkip.forward`,
`DecoderSkip.forward`), `src/models/unet_2d_blocks.py` (`DownEncoderSkipBlock2D`,
`UpDecoderSkipBlock2D`) and `src/models/condition_vae.py` (`encode_cond`, `decode_with_cond`),
as loops over a loaded model's submodules, tuples sliced as the official code slices them. It
shares no code with `pipeline.models.condition_vae`, so a test comparing the two compares our
module with the official order of operations, not with itself.
"""

from __future__ import annotations

import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution


def official_encode_cond(
    vae: torch.nn.Module, cond: torch.Tensor
) -> tuple[DiagonalGaussianDistribution, tuple[torch.Tensor, ...], torch.Tensor]:
    """`ConditionVAE.encode_cond`: posterior, down-block residuals, mid-block residual."""
    encoder = vae.conditional_encoder
    in_channels = vae.config.in_channels
    # EncoderSkip.forward: add_conv_in on the extra channels, added to conv_in's output
    res_sample = encoder.add_conv_in(cond[:, in_channels:, :, :])
    sample = res_sample + encoder.conv_in(cond[:, :in_channels, :, :])
    down_block_res_samples: tuple[torch.Tensor, ...] = (sample,)
    for down_block in encoder.down_blocks:
        # DownEncoderSkipBlock2D.forward: every resnet's output, then the downsampler's
        output_states: tuple[torch.Tensor, ...] = ()
        for resnet in down_block.resnets:
            sample = resnet(sample, temb=None)
            output_states = (*output_states, sample)
        if down_block.downsamplers is not None:
            for downsampler in down_block.downsamplers:
                sample = downsampler(sample)
                output_states = (*output_states, sample)
        down_block_res_samples += output_states
    sample = encoder.mid_block(sample)
    mid_block_res_samples = sample.clone()
    sample = encoder.conv_norm_out(sample)
    sample = encoder.conv_act(sample)
    sample = encoder.conv_out(sample)
    skip_down_block_res_samples: tuple[torch.Tensor, ...] = ()
    for down_block_res_sample, skip_conv in zip(
        down_block_res_samples, encoder.down_block_skip_convs
    ):
        skipped = skip_conv(down_block_res_sample)
        skip_down_block_res_samples = (*skip_down_block_res_samples, skipped)
    mid_block_res_samples = encoder.mid_block_skip_conv(mid_block_res_samples)
    # encode_cond: the shared quant_conv
    posterior = DiagonalGaussianDistribution(vae.quant_conv(sample))
    return posterior, skip_down_block_res_samples, mid_block_res_samples


def official_decoder(
    vae: torch.nn.Module,
    sample: torch.Tensor,
    down_block_res_samples: tuple[torch.Tensor, ...],
    mid_block_res_samples: torch.Tensor,
) -> torch.Tensor:
    """`DecoderSkip.forward` (no latent_embeds, not training)."""
    decoder = vae.decoder
    sample = decoder.conv_in(sample)
    sample = decoder.mid_block(sample, None)
    sample = sample + mid_block_res_samples
    for up_block in decoder.up_blocks:
        res_samples = down_block_res_samples[-len(up_block.resnets) :]
        down_block_res_samples = down_block_res_samples[: -len(up_block.resnets)]
        # UpDecoderSkipBlock2D.forward: after each resnet, add the last remaining residual
        res_hidden_states_tuple = res_samples
        for resnet in up_block.resnets:
            sample = resnet(sample, temb=None)
            res_hidden_states = res_hidden_states_tuple[-1]
            res_hidden_states_tuple = res_hidden_states_tuple[:-1]
            sample = sample + res_hidden_states
        if up_block.upsamplers is not None:
            for upsampler in up_block.upsamplers:
                sample = upsampler(sample)
    sample = decoder.conv_norm_out(sample)
    sample = decoder.conv_act(sample)
    return decoder.conv_out(sample)


def official_decode_with_cond(
    vae: torch.nn.Module, z: torch.Tensor, cond: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """`ConditionVAE.decode_with_cond(z, cond, generator=generator, sample_posterior=True)`."""
    posterior_cond, down_block_res_samples, mid_block_res_samples = official_encode_cond(vae, cond)
    z_cond = posterior_cond.sample(generator=generator)
    z = vae.post_quant_conv(z)
    z_cond = vae.post_quant_conv(z_cond)
    z = z + vae.latent_skip_conv(z_cond)
    return official_decoder(vae, z, down_block_res_samples, mid_block_res_samples)


def randomize(module: torch.nn.Module, seed: int, scale: float = 0.3) -> None:
    """Every parameter random and non-zero (the zero-initialised skips too: with them at zero
    a test could not tell a wired skip from a missing one); norm weights near 1."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            values = torch.rand(parameter.shape, generator=generator) * 2 - 1
            values = values.sign() * (0.2 + values.abs()) * scale  # |value| >= 0.06
            if "norm" in name and name.endswith("weight"):
                values = values + 1.0
            parameter.copy_(values)
