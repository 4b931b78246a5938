"""Tiny random-weight DiffHarmony model directories, in the formats real downloads come in.

Enters: a folder to write into.
Leaves:
- `write_tiny_model_dir`: ROOT/{tokenizer,text_encoder,scheduler,vae,unet,refiner} with the same
  file names, config keys and module structure as the real components (stable-diffusion-
  inpainting's tokenizer, text encoder and scheduler, sd-vae-ft-mse, the DiffHarmony UNet and
  refiner), only far smaller, written by today's libraries (transformers 5, diffusers): the
  `tiny` model of `bench.random_model`, which the benchmarks build too.
- `FORMATS`: rewrites of such a folder, in place, into the formats real downloads have: a text
  encoder saved by transformers 4.x (`text_model.` prefix), the VAE with pre-diffusers-0.14
  attention names, pickled `.bin` weights, fp16 variant files, sharded safetensors, tokenizers
  with only `tokenizer.json` or with `vocab.json` + `merges.txt`. Each holds the same tensors as
  the modern folder (for fp16: as `round_to_fp16` of it), so no old library is needed.
- `write_official_download`: the three downloads `harmonize model assemble` takes, laid out as
  users get them (nested release folders, `.bin` files, decoy components that must not be taken).
- `write_harmony_classifier`: the release's harmony classifier (`model_state_dict.pth`, a
  pickled state dict), random weights from `bench.random_model`.
Weights are drawn from a fixed seed, so two calls write identical files. Works offline.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from bench.random_model import (
    TINY_VOCAB,
    harmony_classifier_state,
    random_modules,
    write_model_dir,
)

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
TRANSFORMERS_WEIGHTS = "model.safetensors"
_BOS, _EOS = TINY_VOCAB[-2:]


def write_tiny_model_dir(
    root: Path,
    *,
    safetensors: bool = True,
    seed: int = 0,
    harmony_vae: bool = False,
    direction: str = "forward",
) -> Path:
    """Write the tiny model directory (`bench.random_model`, text encoder and tokenizer
    included) under `root` and return `root`.

    safetensors=False stores every weight file as a pickled `.bin` instead (for the refusal test).
    harmony_vae=True puts DiffHarmony++'s Harmony-VAE (a `ConditionVAE`) in vae/;
    direction="inverse" the inverse model (diffharmony-gen's UNet, cvae-gen's Harmony-VAE).
    """
    write_model_dir(root, "tiny", seed, text="clip", harmony_vae=harmony_vae, direction=direction)
    if not safetensors:
        for name in ("text_encoder", "vae", "unet", "refiner"):
            pickled(Path(root) / name)
    return Path(root)


# --- the formats of real downloads, made from a modern folder ----------------------------------


def _weights_file(folder: Path) -> Path:
    for name in (DIFFUSERS_WEIGHTS, TRANSFORMERS_WEIGHTS):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{folder}: no single safetensors file to rewrite")


def _rewrite(folder: Path, change: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]):
    from safetensors.torch import load_file, save_file

    path = _weights_file(folder)
    tensors = change(load_file(str(path)))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), {"format": "pt"})


def text_model_prefix(folder: Path) -> None:
    """text_encoder/ as transformers 4.x saved CLIPTextModel (and as SD inpainting publishes it):
    every weight under `text_model.`, the `position_ids` buffer stored, a 4.x config.json."""

    def prefixed(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        renamed = {f"text_model.{k}": v for k, v in tensors.items()}
        renamed["text_model.embeddings.position_ids"] = torch.arange(77)[None]
        return renamed

    _rewrite(folder, prefixed)
    config = json.loads((folder / "config.json").read_text())
    config["torch_dtype"] = config.pop("dtype", "float32")
    config["transformers_version"] = "4.22.0.dev0"
    config["_name_or_path"] = "openai/clip-vit-large-patch14"
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))


# diffusers 0.14 renamed the attention block's projections; older checkpoints (sd-vae-ft-mse's
# among them) keep the old names. Only the fixture spells them out: the loader leaves the mapping
# to diffusers.
_PRE_014_ATTENTION = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def pre_014_attention_names(folder: Path) -> None:
    """vae/ as sd-vae-ft-mse ships it: attention weights named query/key/value/proj_attn, and a
    diffusers-0.4 config.json (no scaling_factor and the other keys added since)."""

    def renamed(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        result = {}
        for key, value in tensors.items():
            for new, old in _PRE_014_ATTENTION.items():
                key = key.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
            result[key] = value
        return result

    _rewrite(folder, renamed)
    config = json.loads((folder / "config.json").read_text())
    kept = (
        "act_fn block_out_channels down_block_types in_channels latent_channels "
        "layers_per_block norm_num_groups out_channels sample_size up_block_types"
    ).split()
    old = {"_class_name": "AutoencoderKL", "_diffusers_version": "0.4.2"}
    (folder / "config.json").write_text(
        json.dumps({**old, **{k: config[k] for k in kept}}, indent=2)
    )


def pickled(folder: Path) -> None:
    """The weights as a pickled `.bin` (diffusers' or transformers' name), tensor for tensor."""
    from safetensors.torch import load_file

    path = _weights_file(folder)
    names = {
        TRANSFORMERS_WEIGHTS: "pytorch_model.bin",
        DIFFUSERS_WEIGHTS: "diffusion_pytorch_model.bin",
    }
    torch.save(load_file(str(path)), folder / names[path.name])
    path.unlink()


def fp16_variant(folder: Path) -> None:
    """Only the fp16 variant file (`*.fp16.safetensors`), as a download of the fp16 files has."""
    from safetensors.torch import load_file, save_file

    path = _weights_file(folder)
    tensors = {k: v.half() if v.is_floating_point() else v for k, v in load_file(str(path)).items()}
    stem, extension = path.name.rsplit(".", 1)
    save_file(tensors, str(folder / f"{stem}.fp16.{extension}"), {"format": "pt"})
    path.unlink()


def round_to_fp16(folder: Path) -> None:
    """The same file with every float tensor rounded to fp16 and stored as fp32: the modern
    copy of what `fp16_variant` holds."""
    _rewrite(
        folder,
        lambda tensors: {
            k: v.half().float() if v.is_floating_point() else v for k, v in tensors.items()
        },
    )


def sharded(folder: Path) -> None:
    """Safetensors shards and the `.index.json` naming them, split by huggingface_hub as the
    libraries' save_pretrained does (here in about three shards)."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import load_file, save_file

    path = _weights_file(folder)
    tensors = load_file(str(path))
    total = sum(v.numel() * v.element_size() for v in tensors.values())
    stem = path.name.removesuffix(".safetensors")
    split = split_torch_state_dict_into_shards(
        tensors, filename_pattern=stem + "{suffix}.safetensors", max_shard_size=total // 3 + 1
    )
    assert split.is_sharded
    for filename, keys in split.filename_to_tensors.items():
        save_file({k: tensors[k] for k in keys}, str(folder / filename), {"format": "pt"})
    index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
    (folder / f"{path.name}.index.json").write_text(json.dumps(index, indent=2))
    path.unlink()


def _tokenizer_model(folder: Path) -> dict[str, object]:
    return json.loads((folder / "tokenizer.json").read_text())["model"]


def tokenizer_json_only(folder: Path) -> None:
    """tokenizer/ holding nothing but `tokenizer.json`."""
    for path in folder.iterdir():
        if path.name != "tokenizer.json":
            path.unlink()


def _added_token(content: str) -> dict[str, object]:
    return {
        "__type": "AddedToken",
        "content": content,
        "lstrip": False,
        "normalized": True,
        "rstrip": False,
        "single_word": False,
    }


def vocab_and_merges(folder: Path) -> None:
    """tokenizer/ as stable-diffusion-inpainting publishes it (written by transformers 4.x):
    vocab.json + merges.txt + a 4.x tokenizer_config.json and special_tokens_map.json, no
    tokenizer.json."""
    model = _tokenizer_model(folder)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]  # type: ignore[union-attr]
    (folder / "vocab.json").write_text(json.dumps(model["vocab"]))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges))
    special = {k: _added_token(v) for k, v in (("bos_token", _BOS), ("eos_token", _EOS))}
    config = {
        **special,
        "unk_token": _added_token(_EOS),
        "pad_token": _EOS,
        "add_prefix_space": False,
        "do_lower_case": True,
        "errors": "replace",
        "model_max_length": 77,
        "name_or_path": "openai/clip-vit-large-patch14",
        "special_tokens_map_file": "./special_tokens_map.json",
        "tokenizer_class": "CLIPTokenizer",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    specials_map = {
        k: {key: value for key, value in v.items() if key != "__type"} for k, v in special.items()
    }
    specials_map |= {"unk_token": specials_map["eos_token"], "pad_token": _EOS}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials_map, indent=2))
    (folder / "tokenizer.json").unlink()


def _each(names: tuple[str, ...], rewrite: Callable[[Path], None]) -> Callable[[Path], None]:
    def apply(root: Path) -> None:
        for name in names:
            rewrite(root / name)

    return apply


# Format name -> the rewrite of a modern model directory into it.
FORMATS: dict[str, Callable[[Path], None]] = {
    "text-encoder-text-model-prefix": _each(("text_encoder",), text_model_prefix),
    "vae-pre-0.14-attention-names": _each(("vae",), pre_014_attention_names),
    "pickled-unet-and-refiner": _each(("unet", "refiner"), pickled),
    "fp16-variants": _each(("text_encoder", "vae", "unet", "refiner"), fp16_variant),
    "sharded-safetensors": _each(("text_encoder", "unet", "refiner"), sharded),
    "tokenizer-json-only": _each(("tokenizer",), tokenizer_json_only),
    "tokenizer-vocab-merges": _each(("tokenizer",), vocab_and_merges),
}
# Formats whose modern copy holds fp16-rounded weights (`round_to_fp16`).
ROUNDED_TO_FP16 = {"fp16-variants": ("text_encoder", "vae", "unet", "refiner")}
NEEDS_PICKLES = {"pickled-unet-and-refiner"}


# --- the three downloads `harmonize model assemble` takes ---------------------------------------


def _scale_weights(folder: Path, factor: float) -> None:
    """Another model of the same shape: a decoy that must not end up in the model directory."""
    _rewrite(folder, lambda tensors: {k: v * factor for k, v in tensors.items()})


def write_official_download(root: Path, seed: int = 0) -> dict[str, Path]:
    """The downloads as users get them, holding the tiny model's tensors.

    - stable-diffusion-inpainting/: a whole diffusers repository (model_index.json, its own
      9-channel unet/ and vae/ as decoys), tokenizer/ with vocab.json + merges.txt, the text
      encoder in transformers 4.x's names as model.safetensors and pytorch_model.bin;
    - sd-vae-ft-mse/: config.json of diffusers 0.4, pre-0.14 attention names, .bin + .safetensors;
    - DiffHarmony/: the extracted release, nested, every weight a pickled .bin: the stage-1
      UNet, the refiner, DiffHarmony++'s Harmony-VAE (cvae/) and the inverse model's UNet and
      Harmony-VAE (diffharmony-gen/, cvae-gen/).
    Assembled, they make the same model as `write_tiny_model_dir(seed=seed, ...)` with the
    same `harmony_vae` and `direction`.
    """
    root = Path(root)
    modern = write_tiny_model_dir(root / ".modern", seed=seed)

    inpainting = root / "stable-diffusion-inpainting"
    inpainting.mkdir(parents=True)
    index = {
        "_class_name": "StableDiffusionInpaintPipeline",
        "_diffusers_version": "0.6.0",
        **{
            name: [library, cls]
            for name, library, cls in (
                ("scheduler", "diffusers", "PNDMScheduler"),
                ("text_encoder", "transformers", "CLIPTextModel"),
                ("tokenizer", "transformers", "CLIPTokenizer"),
                ("unet", "diffusers", "UNet2DConditionModel"),
                ("vae", "diffusers", "AutoencoderKL"),
            )
        },
    }
    (inpainting / "model_index.json").write_text(json.dumps(index, indent=2))
    for name in ("tokenizer", "text_encoder", "scheduler", "unet", "vae"):
        shutil.copytree(modern / name, inpainting / name)
    vocab_and_merges(inpainting / "tokenizer")
    text_model_prefix(inpainting / "text_encoder")
    shutil.copy(inpainting / "text_encoder" / TRANSFORMERS_WEIGHTS, root / "te.safetensors")
    pickled(inpainting / "text_encoder")  # pytorch_model.bin ...
    shutil.move(root / "te.safetensors", inpainting / "text_encoder" / TRANSFORMERS_WEIGHTS)
    _scale_weights(inpainting / "unet", 0.5)  # the inpainting model's own UNet, not DiffHarmony's
    _scale_weights(inpainting / "vae", 0.5)

    vae = root / "sd-vae-ft-mse"
    shutil.copytree(modern / "vae", vae)
    pre_014_attention_names(vae)
    shutil.copy(vae / DIFFUSERS_WEIGHTS, root / "vae.safetensors")
    pickled(vae)
    shutil.move(root / "vae.safetensors", vae / DIFFUSERS_WEIGHTS)

    release = root / "DiffHarmony"
    stage1 = release / "pretrained" / "diffharmony" / "unet"
    refiner = release / "pretrained" / "refinement" / "base" / "unet"
    shutil.copytree(modern / "unet", stage1)
    shutil.copytree(modern / "refiner", refiner)
    # DiffHarmony++: the Harmony-VAE, and the inverse model ("gen" folders).
    modules = random_modules("tiny", seed, text_encoder=False, harmony=True)
    extra = {
        release / "pretrained" / "cvae" / "vae": modules["condition_vae"],
        release / "pretrained" / "diffharmony-gen" / "unet": modules["inverse_unet"],
        release / "pretrained" / "cvae-gen" / "vae": modules["inverse_condition_vae"],
    }
    for folder, module in extra.items():
        module.save_pretrained(folder)  # type: ignore[operator]
    for folder in (stage1, refiner, *extra):
        pickled(folder)
    shutil.rmtree(modern)
    return {"inpainting": inpainting, "vae": vae, "diffharmony": release}


# --- the harmony classifier (DiffHarmony++'s HumanHarmony selection) ----------------------------


def write_harmony_classifier(folder: Path, seed: int = 0) -> Path:
    """The release's `harmony_classifier/model_state_dict.pth`: a pickled state dict, as the
    official training saved it (`torch.save(model.state_dict())`)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(harmony_classifier_state(seed), folder / "model_state_dict.pth")
    return folder
