"""Tiny random-weight DiffHarmony model directories, in the formats real downloads come in.

Enters: a folder to write into.
Leaves:
- `write_tiny_model_dir`: ROOT/{tokenizer,text_encoder,scheduler,vae,unet,refiner} with the same
  file names, config keys and module structure as the real components (stable-diffusion-
  inpainting's tokenizer, text encoder and scheduler, sd-vae-ft-mse, the DiffHarmony UNet and
  refiner), only far smaller, written by today's libraries (transformers 5, diffusers).
- `FORMATS`: rewrites of such a folder, in place, into the formats real downloads have: a text
  encoder saved by transformers 4.x (`text_model.` prefix), the VAE with pre-diffusers-0.14
  attention names, pickled `.bin` weights, fp16 variant files, sharded safetensors, tokenizers
  with only `tokenizer.json` or with `vocab.json` + `merges.txt`. Each holds the same tensors as
  the modern folder (for fp16: as `round_to_fp16` of it), so no old library is needed.
- `write_official_download`: the three downloads `harmonize model assemble` takes, laid out as
  users get them (nested release folders, `.bin` files, decoy components that must not be taken).
Weights are drawn from a fixed seed, so two calls write identical files. Works offline.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

TEXT_HIDDEN = 32
_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
TRANSFORMERS_WEIGHTS = "model.safetensors"

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


def _tokenizer() -> object:
    """A byte-level-BPE CLIP tokenizer over lowercase letters and two merges ("th", "the")."""
    from transformers import CLIPTokenizer

    letters = "abcdefghijklmnopqrstuvwxyz"
    tokens = [*letters, *(c + "</w>" for c in letters), "th", "the</w>", _BOS, _EOS]
    return CLIPTokenizer(
        vocab={token: i for i, token in enumerate(tokens)},
        merges=[("t", "h"), ("th", "e</w>")],
        model_max_length=77,
    )


def _save_torch_bin(model: torch.nn.Module, path: Path) -> None:
    """A pickled state dict, as older diffusers/transformers releases wrote them."""
    (path.parent / TRANSFORMERS_WEIGHTS).unlink(missing_ok=True)
    (path.parent / DIFFUSERS_WEIGHTS).unlink(missing_ok=True)
    torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, path)


def _modules(seed: int = 0) -> dict[str, torch.nn.Module]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from pipeline.models.refiner import RefinerUNet

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vocab_size = 56  # _tokenizer()'s
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
        # Random init leaves the refiner's output tiny next to its residual; scale it up so the
        # tests can see stage 2 at work.
        refiner.conv_out.weight.data.mul_(20.0)
        # DiffHarmony++: the Harmony-VAE, and the inverse model's own UNet and Harmony-VAE
        # (the release's diffharmony-gen and cvae-gen: same architectures, other weights).
        condition_vae = _condition_vae(vae)
        inverse_unet = UNet2DConditionModel.from_config(unet.config)
        inverse_condition_vae = _condition_vae(vae)
    return {
        "text_encoder": text_encoder,
        "vae": vae,
        "unet": unet,
        "refiner": refiner,
        "condition_vae": condition_vae,
        "inverse_unet": inverse_unet,
        "inverse_condition_vae": inverse_condition_vae,
    }


def _condition_vae(vae: torch.nn.Module) -> torch.nn.Module:
    """A Harmony-VAE made from the tiny VAE as the official `ConditionVAE.from_vae` makes it
    (encoder, decoder, quant convs; the conditional encoder from the encoder), then "trained":
    every weight perturbed, and the zero-initialised skips and `add_conv_in` random and
    non-zero, so that tests can see each of them (draws from the caller's RNG state)."""
    from pipeline.models.condition_vae import ConditionVAE

    shared = (
        "in_channels out_channels down_block_types up_block_types block_out_channels "
        "layers_per_block act_fn latent_channels norm_num_groups sample_size scaling_factor"
    ).split()
    condition_vae = ConditionVAE(**{k: vae.config[k] for k in shared}, additional_in_channels=1)
    condition_vae.load_state_dict(vae.state_dict(), strict=False)
    condition_vae.conditional_encoder.load_state_dict(vae.encoder.state_dict(), strict=False)
    with torch.no_grad():
        for name, parameter in condition_vae.named_parameters():
            if "skip_conv" in name or "add_conv_in" in name:
                parameter.copy_(torch.randn(parameter.shape) * 0.1)
                parameter.add_(parameter.sign() * 0.02)  # no weight exactly 0
            else:
                parameter.mul_(1 + 0.05 * torch.randn(parameter.shape))
    return condition_vae


def write_tiny_model_dir(
    root: Path,
    *,
    safetensors: bool = True,
    seed: int = 0,
    harmony_vae: bool = False,
    direction: str = "forward",
) -> Path:
    """Write the tiny model directory under `root` and return `root`.

    safetensors=False stores every weight file as a pickled `.bin` instead (for the refusal test).
    harmony_vae=True puts DiffHarmony++'s Harmony-VAE (a `ConditionVAE`) in vae/;
    direction="inverse" the inverse model (diffharmony-gen's UNet, cvae-gen's Harmony-VAE).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    _tokenizer().save_pretrained(root / "tokenizer")  # type: ignore[attr-defined]
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(SD_INPAINTING_SCHEDULER, indent=2)
    )
    made = _modules(seed)
    prefix = "inverse_" if direction == "inverse" else ""
    modules = {
        "text_encoder": made["text_encoder"],
        "vae": made[f"{prefix}condition_vae"] if harmony_vae else made["vae"],
        "unet": made[f"{prefix}unet"],
        "refiner": made["refiner"],
    }
    for name, module in modules.items():
        module.save_pretrained(root / name)  # type: ignore[operator]
    if not safetensors:
        _save_torch_bin(modules["text_encoder"], root / "text_encoder" / "pytorch_model.bin")
        for name in ("vae", "unet", "refiner"):
            _save_torch_bin(modules[name], root / name / "diffusion_pytorch_model.bin")
    return root


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
    modules = _modules(seed)
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


def harmony_classifier_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A ResNet-50 with a 2-class fc, random weights that give unsaturated probabilities.

    The architecture is fixed (the official script builds torchvision's resnet50), so unlike
    the other fixtures this one has the real size (~94 MB in fp32). Batch-norm statistics are
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


def write_harmony_classifier(folder: Path, seed: int = 0) -> Path:
    """The release's `harmony_classifier/model_state_dict.pth`: a pickled state dict, as the
    official training saved it (`torch.save(model.state_dict())`)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(harmony_classifier_state(seed), folder / "model_state_dict.pth")
    return folder
