"""The Harmony-VAE module: the official parameter names, the official order of operations,
diffusers' own AutoencoderKL where the two must agree, strict round trips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from official_cvae import official_decode_with_cond, randomize

from pipeline.models.condition_vae import ConditionVAE
from pipeline.models.layout import CONDITION_VAE_CLASS_NAME

CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (8, 8, 16, 16),
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 4,
    "sample_size": 64,
    "additional_in_channels": 1,
}


def _random_vae(seed: int = 0, **overrides: object) -> ConditionVAE:
    vae = ConditionVAE(**{**CONFIG, **overrides}).eval()
    randomize(vae, seed)
    return vae


def _inputs(batch: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, 4, 8, 8, generator=generator)
    image = torch.rand(batch, 3, 64, 64, generator=generator) * 2 - 1
    mask = (torch.rand(batch, 1, 64, 64, generator=generator) > 0.5).float()
    return z, torch.cat([image, mask], dim=1)


def test_parameter_names_are_the_official_ones() -> None:
    """AutoencoderKL's names for what the two share (diffusers' own model as the reference),
    plus the official additions with the shapes the official constructor gives them."""
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in ConditionVAE(**CONFIG).state_dict().items()}
        plain_args = {k: v for k, v in CONFIG.items() if k != "additional_in_channels"}
        plain = {k: tuple(v.shape) for k, v in AutoencoderKL(**plain_args).state_dict().items()}
    shared = {k: v for k, v in ours.items() if not k.startswith("conditional_encoder.")}
    shared.pop("latent_skip_conv.weight")
    shared.pop("latent_skip_conv.bias")
    assert shared == plain
    # The conditional encoder is the encoder, plus add_conv_in and the skip convolutions.
    encoder = {
        k.removeprefix("conditional_encoder."): v
        for k, v in ours.items()
        if k.startswith("conditional_encoder.")
    }
    added = {k: v for k, v in encoder.items() if f"encoder.{k}" not in plain}
    assert {k: v for k, v in encoder.items() if k not in added} == {
        k.removeprefix("encoder."): v for k, v in plain.items() if k.startswith("encoder.")
    }
    # EncoderSkip: one skip for conv_in's output, layers_per_block per block, and one per
    # downsampler mapping block i's width to block i + 1's.
    skips = [(8, 8), (8, 8), (8, 8), (8, 8), (16, 8), (16, 16), (16, 16), (16, 16)]
    expected = {"add_conv_in.weight": (8, 1, 3, 3), "add_conv_in.bias": (8,)}
    for i, (out, inp) in enumerate(skips):
        expected[f"down_block_skip_convs.{i}.weight"] = (out, inp, 1, 1)
        expected[f"down_block_skip_convs.{i}.bias"] = (out,)
    expected |= {"mid_block_skip_conv.weight": (16, 16, 1, 1), "mid_block_skip_conv.bias": (16,)}
    assert added == expected
    assert ours["latent_skip_conv.weight"] == (4, 4, 1, 1)


def test_skip_convolutions_start_at_zero_and_then_decode_as_autoencoder_kl() -> None:
    """Freshly built (as the official class initialises them) the skips are zero: decoding with
    any condition is then diffusers' AutoencoderKL decode with the same weights."""
    from diffusers import AutoencoderKL

    vae = ConditionVAE(**CONFIG).eval()
    zero = [
        name
        for name, p in vae.named_parameters()
        if "skip_conv" in name and torch.count_nonzero(p) == 0
    ]
    assert len(zero) == 2 * (8 + 1 + 1)  # down, mid and latent skips: weights and biases
    plain = AutoencoderKL(**{k: v for k, v in CONFIG.items() if k != "additional_in_channels"})
    randomize(plain, 3)
    names = set(plain.state_dict())
    result = vae.load_state_dict(plain.state_dict(), strict=False)
    assert not result.unexpected_keys and all(k not in names for k in result.missing_keys)
    z, cond = _inputs(2)
    with torch.inference_mode():
        posterior, features = vae.encode_condition(cond)
        ours = vae.decode_with_condition(z, posterior.mode(), features)
        reference = plain.eval().decode(z).sample
        torch.testing.assert_close(ours, reference, atol=1e-6, rtol=0)
        torch.testing.assert_close(
            vae.encode(cond[:, :3]).latent_dist.mean, plain.encode(cond[:, :3]).latent_dist.mean
        )


@pytest.mark.parametrize("layers_per_block", [1, 2])
def test_decode_follows_the_official_order_of_operations(layers_per_block: int) -> None:
    vae = _random_vae(layers_per_block=layers_per_block)
    z, cond = _inputs(1)
    with torch.inference_mode():
        reference = official_decode_with_cond(vae, z, cond, torch.Generator().manual_seed(7))
        posterior, features = vae.encode_condition(cond)
        z_cond = posterior.sample(generator=torch.Generator().manual_seed(7))
        ours = vae.decode_with_condition(z, z_cond, features)
    assert torch.equal(ours, reference)
    assert reference.std() > 0.05  # a real image-like signal, not a constant


def test_every_skip_reaches_the_output() -> None:
    """Zeroing any one group of skips moves the output: none of them is left unwired."""
    z, cond = _inputs(1)
    vae = _random_vae()
    with torch.inference_mode():
        posterior, features = vae.encode_condition(cond)
        base = vae.decode_with_condition(z, posterior.mode(), features)
        for name, module in vae.named_modules():
            if not (name.startswith("conditional_encoder.down_block_skip_convs.") or
                    name in ("conditional_encoder.mid_block_skip_conv", "latent_skip_conv",
                             "conditional_encoder.add_conv_in")):  # fmt: skip
                continue
            saved = [p.clone() for p in module.parameters()]
            for p in module.parameters():
                p.zero_()
            posterior, features = vae.encode_condition(cond)
            changed = vae.decode_with_condition(z, posterior.mode(), features)
            for p, value in zip(module.parameters(), saved):
                p.copy_(value)
            assert (changed - base).abs().max() > 1e-3, name


def test_a_sample_does_not_depend_on_its_batch() -> None:
    vae = _random_vae()
    z, cond = _inputs(3)
    with torch.inference_mode():
        posterior, features = vae.encode_condition(cond)
        batched = vae.decode_with_condition(z, posterior.mean, features)
        for i in range(3):
            posterior, features = vae.encode_condition(cond[i : i + 1])
            alone = vae.decode_with_condition(z[i : i + 1], posterior.mean, features)
            torch.testing.assert_close(batched[i : i + 1], alone, atol=1e-5, rtol=0)


def test_round_trips_strictly_through_the_release_layout(tmp_path: Path) -> None:
    vae = _random_vae()
    vae.save_pretrained(tmp_path / "vae")
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert config["_class_name"] == CONDITION_VAE_CLASS_NAME == "ConditionVAE"
    assert config["additional_in_channels"] == 1
    loaded, info = ConditionVAE.from_pretrained(
        tmp_path / "vae", output_loading_info=True, low_cpu_mem_usage=False
    )
    assert not any(info.values()), info
    for (name, value), (other, loaded_value) in zip(
        vae.state_dict().items(), loaded.state_dict().items()
    ):
        assert name == other and torch.equal(value, loaded_value)
