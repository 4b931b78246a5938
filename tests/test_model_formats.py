"""Model directories in the formats real downloads have: accepted, and the same pixels.

Each format of `tiny_checkpoint.FORMATS` rewrites a copy of the tiny modern directory. The
libraries' own readers confirm that the rewrite is the format it claims and holds the same model;
`harmonize model check` accepts it; the harmonizer's output is bit-identical to the modern copy's.
Real problems (a missing or mis-shaped tensor, a wrong in_channels, a truncated file, a pickle
that would run code) are still refused, one line each naming the file or tensor.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_checkpoint import (
    FORMATS,
    NEEDS_PICKLES,
    ROUNDED_TO_FP16,
    round_to_fp16,
    write_tiny_model_dir,
)
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import ModelConfig
from pipeline.models import load_harmonizer
from pipeline.models.base import HarmonizeBatch
from pipeline.models.check import check_model_dir

runner = CliRunner()


@pytest.fixture(scope="module")
def modern(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model_dir(tmp_path_factory.mktemp("modern") / "model")


@pytest.fixture(scope="module")
def reference_outputs() -> dict[bool, list[torch.Tensor]]:
    """The modern copies' outputs, keyed by "weights rounded to fp16"."""
    return {}


def _reference(modern: Path, name: str, folder: Path) -> Path:
    """The modern-format copy holding the same tensors as format `name`."""
    shutil.copytree(modern, folder)
    for component in ROUNDED_TO_FP16.get(name, ()):
        round_to_fp16(folder / component)
    return folder


def _in_format(reference: Path, name: str, folder: Path) -> Path:
    shutil.copytree(reference, folder)
    FORMATS[name](folder)
    return folder


def _batch() -> HarmonizeBatch:
    generator = torch.Generator().manual_seed(5)
    composites = [
        torch.rand(3, 50, 70, generator=generator),
        torch.rand(3, 40, 40, generator=generator),
    ]
    masks = [torch.zeros(1, 50, 70), torch.zeros(1, 40, 40)]
    masks[0][:, 10:40, 20:50] = 1.0
    masks[1][:, 5:25, 5:35] = 1.0
    return HarmonizeBatch(sample_ids=["a", "b"], composites=composites, masks=masks, seeds=[7, 8])


def _harmonize(model_dir: Path, **overrides: Any) -> list[torch.Tensor]:
    config = ModelConfig(
        name="diffharmony",
        model_dir=str(model_dir),
        resolution=64,
        output_resolution=32,
        device="cpu",
    )
    return load_harmonizer(replace(config, **overrides)).harmonize(_batch())


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_download_format_is_accepted_and_gives_bit_identical_pixels(
    name: str, modern: Path, reference_outputs: dict[bool, list[torch.Tensor]], tmp_path: Path
) -> None:
    reference = _reference(modern, name, tmp_path / "reference")
    folder = _in_format(reference, name, tmp_path / name)
    pickles = name in NEEDS_PICKLES
    flags = ["--allow-unsafe-pickle"] if pickles else []

    result = runner.invoke(app, ["model", "check", str(folder), *flags])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"{folder}: OK"
    if pickles:
        refused = runner.invoke(app, ["model", "check", str(folder)])
        assert refused.exit_code == 1
        assert "unet/diffusion_pytorch_model.bin: pickled checkpoint" in refused.output
        assert "refiner/diffusion_pytorch_model.bin: pickled checkpoint" in refused.output

    outputs = _harmonize(folder, allow_unsafe_pickle=pickles)
    rounded = name in ROUNDED_TO_FP16
    if rounded not in reference_outputs:  # one modern-copy run per kind of reference
        reference_outputs[rounded] = _harmonize(reference)
    expected = reference_outputs[rounded]
    for output, want in zip(outputs, expected):
        assert torch.equal(output, want)


# --- the fixtures are the formats they claim, by the libraries' own readers ---------------------


def _same_tensors(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    left, right = a.state_dict(), b.state_dict()
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


def test_text_encoder_is_what_transformers_4_wrote(modern: Path, tmp_path: Path) -> None:
    from transformers import CLIPTextModel

    folder = _in_format(modern, "text-encoder-text-model-prefix", tmp_path / "m") / "text_encoder"
    keys = load_file(str(folder / "model.safetensors")).keys()
    assert all(k.startswith("text_model.") for k in keys)
    assert "text_model.embeddings.position_ids" in keys
    assert json.loads((folder / "config.json").read_text())["transformers_version"].startswith("4.")
    legacy = CLIPTextModel.from_pretrained(folder)
    assert _same_tensors(legacy, CLIPTextModel.from_pretrained(modern / "text_encoder"))


def test_vae_has_the_pre_0_14_attention_names(modern: Path, tmp_path: Path) -> None:
    from diffusers import AutoencoderKL

    folder = _in_format(modern, "vae-pre-0.14-attention-names", tmp_path / "m") / "vae"
    keys = load_file(str(folder / "diffusion_pytorch_model.safetensors")).keys()
    for old in ("query", "key", "value", "proj_attn"):
        assert f"decoder.mid_block.attentions.0.{old}.weight" in keys
    assert not any(".to_q." in k or ".to_out." in k for k in keys)
    assert "scaling_factor" not in json.loads((folder / "config.json").read_text())
    legacy = AutoencoderKL.from_pretrained(folder)
    assert _same_tensors(legacy, AutoencoderKL.from_pretrained(modern / "vae"))
    assert legacy.config.scaling_factor == 0.18215  # diffusers' default, as the modern config's


def test_pickles_variants_and_shards_load_through_diffusers_and_transformers(
    modern: Path, tmp_path: Path
) -> None:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from pipeline.models.refiner import RefinerUNet

    pickled = _in_format(modern, "pickled-unet-and-refiner", tmp_path / "p")
    for name, cls in (("unet", UNet2DConditionModel), ("refiner", RefinerUNet)):
        assert sorted(os.listdir(pickled / name)) == ["config.json", "diffusion_pytorch_model.bin"]
        loaded = cls.from_pretrained(pickled / name, use_safetensors=False)
        assert _same_tensors(loaded, cls.from_pretrained(modern / name))

    rounded = _reference(modern, "fp16-variants", tmp_path / "r")
    variants = _in_format(rounded, "fp16-variants", tmp_path / "v")
    tensors = load_file(str(variants / "text_encoder" / "model.fp16.safetensors"))
    assert {v.dtype for v in tensors.values()} == {torch.float16}
    assert not (variants / "unet" / "diffusion_pytorch_model.safetensors").exists()
    loaded = UNet2DConditionModel.from_pretrained(variants / "unet", variant="fp16")
    assert _same_tensors(loaded.float(), UNet2DConditionModel.from_pretrained(rounded / "unet"))

    shards = _in_format(modern, "sharded-safetensors", tmp_path / "s")
    index = json.loads((shards / "text_encoder" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert _same_tensors(
        CLIPTextModel.from_pretrained(shards / "text_encoder"),
        CLIPTextModel.from_pretrained(modern / "text_encoder"),
    )


@pytest.mark.parametrize(
    ("name", "files"),
    [
        ("tokenizer-json-only", ["tokenizer.json"]),
        (
            "tokenizer-vocab-merges",
            ["merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"],
        ),
    ],
)
def test_tokenizers_encode_as_the_modern_one(
    name: str, files: list[str], modern: Path, tmp_path: Path
) -> None:
    from transformers import CLIPTokenizer

    folder = _in_format(modern, name, tmp_path / "m") / "tokenizer"
    assert sorted(os.listdir(folder)) == files

    def ids(path: Path, text: str) -> list[int]:
        tokenizer = CLIPTokenizer.from_pretrained(path)
        return tokenizer(text, padding="max_length", max_length=77).input_ids

    for text in ("", "the cat sat"):
        assert ids(folder, text) == ids(modern / "tokenizer", text)
    assert ids(folder, "the")[:3] == [54, 53, 55]  # <|startoftext|> the</w> <|endoftext|>


# --- real problems are still refused, one line each ---------------------------------------------


def _broken(modern: Path, tmp_path: Path, name: str | None = None) -> Path:
    folder = tmp_path / "broken"
    if name is None:
        shutil.copytree(modern, folder)
        return folder
    return _in_format(modern, name, folder)


def _edit(path: Path, change: Any) -> None:
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))


def test_a_missing_tensor_in_a_transformers_4_text_encoder(modern: Path, tmp_path: Path) -> None:
    folder = _broken(modern, tmp_path, "text-encoder-text-model-prefix")
    _edit(
        folder / "text_encoder" / "model.safetensors",
        lambda t: t.pop("text_model.final_layer_norm.bias"),
    )
    assert check_model_dir(folder) == ["text_encoder/: 1 missing weights: final_layer_norm.bias"]
    result = runner.invoke(app, ["model", "check", str(folder)])
    assert result.exit_code == 1
    assert result.output.splitlines() == [
        "problem: text_encoder/: 1 missing weights: final_layer_norm.bias"
    ]


def test_a_mis_shaped_tensor_in_an_old_vae(modern: Path, tmp_path: Path) -> None:
    folder = _broken(modern, tmp_path, "vae-pre-0.14-attention-names")
    _edit(
        folder / "vae" / "diffusion_pytorch_model.safetensors",
        lambda t: t.update({"decoder.mid_block.attentions.0.query.weight": torch.zeros(16, 15)}),
    )
    # Named as diffusers renamed it: query -> to_q.
    assert check_model_dir(folder) == [
        "vae/: decoder.mid_block.attentions.0.to_q.weight has shape (16, 15) in the checkpoint, "
        "the config expects (16, 16)"
    ]


def test_a_truncated_file_or_a_missing_shard_is_named(modern: Path, tmp_path: Path) -> None:
    folder = _broken(modern, tmp_path)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    (problem,) = check_model_dir(folder)
    assert problem.startswith("unet/diffusion_pytorch_model.safetensors: unreadable (")
    assert problem.endswith("truncated, or not a safetensors file")

    shards = _broken(modern, tmp_path / "s", "sharded-safetensors")
    (shards / "text_encoder" / "model-00002-of-00004.safetensors").unlink()
    assert check_model_dir(shards) == [
        "text_encoder/model-00002-of-00004.safetensors: missing (listed in "
        "model.safetensors.index.json)"
    ]

    pickles = _broken(modern, tmp_path / "p", "pickled-unet-and-refiner")
    weights = pickles / "refiner" / "diffusion_pytorch_model.bin"
    weights.write_bytes(weights.read_bytes()[:-1000])
    (problem,) = check_model_dir(pickles, allow_unsafe_pickle=True)
    assert problem.startswith("refiner/: cannot load diffusion_pytorch_model.bin (")
    assert "\n" not in problem


def test_wrong_in_channels_and_an_empty_tokenizer(modern: Path, tmp_path: Path) -> None:
    folder = _broken(modern, tmp_path, "fp16-variants")
    config = json.loads((folder / "unet" / "config.json").read_text())
    (folder / "unet" / "config.json").write_text(json.dumps({**config, "in_channels": 4}))
    for path in (folder / "tokenizer").iterdir():
        path.unlink()
    assert check_model_dir(folder) == [
        "tokenizer/: needs tokenizer.json, or vocab.json + merges.txt",
        "unet/: in_channels is 4, the DiffHarmony UNet has 9 (4 latent + 1 mask + 4 composite "
        "latent); is this a text-to-image UNet?",
    ]


class _RunsCode:
    """A pickle payload that would run a command when unpickled without weights_only."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def test_an_allowed_pickle_is_still_read_with_weights_only(modern: Path, tmp_path: Path) -> None:
    folder = _broken(modern, tmp_path, "pickled-unet-and-refiner")
    weights = folder / "refiner" / "diffusion_pytorch_model.bin"
    marker = tmp_path / "code-ran"
    tensors = torch.load(weights, weights_only=True)
    torch.save({**tensors, "payload": _RunsCode(marker)}, weights)
    (problem,) = check_model_dir(folder, allow_unsafe_pickle=True)
    assert problem.startswith("refiner/: cannot load diffusion_pytorch_model.bin (")
    assert "GLOBAL" in problem  # torch's weights_only unpickler refused the global
    assert not marker.exists()


def test_several_variants_and_no_plain_file_is_ambiguous(modern: Path, tmp_path: Path) -> None:
    folder = _broken(modern, tmp_path, "fp16-variants")
    unet = folder / "unet"
    shutil.copy(
        unet / "diffusion_pytorch_model.fp16.safetensors",
        unet / "diffusion_pytorch_model.non_ema.safetensors",
    )
    assert check_model_dir(folder) == [
        "unet/: weights in several variants (fp16, non_ema) and no "
        "diffusion_pytorch_model.safetensors; keep one"
    ]
