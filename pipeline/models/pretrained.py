"""Each DiffHarmony component through its own library's `from_pretrained`, problems one line each.

Enters: a local model directory (`pipeline.models.cache` makes remote ones local), the dtype,
whether pickles are allowed.
Leaves: per component, the loaded module (on the CPU) or None, and the list of `ModelDirError`s
that say why: what the libraries report (missing or surplus tensors, wrong shapes, unreadable
files) plus the checks they do not make (a UNet of the wrong kind, a tokenizer folder without
its files, a refiner config that is another model's). The run and `check_model_dir` load
through the very same functions.

Each component is loaded by its own library (transformers for the text encoder and tokenizer,
diffusers for the rest, the refiner being a diffusers model), so the files real downloads hold
are read as those libraries read them: weight names of their older versions (CLIP's
`text_model.` prefix, the VAE's pre-0.14 attention names), shards with an `.index.json`,
variants (`*.fp16.safetensors`). Both libraries read allowed pickles with
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from pipeline.models.layout import (
    CONDITION_VAE_CLASS_NAME,
    EMPTY_PROMPT_EMBEDS,
    EMPTY_PROMPT_KEY,
    REFINER,
    SCHEDULER,
    TEXT_ENCODER,
    TOKENIZER,
    UNET,
    UNET_IN_CHANNELS,
    VAE,
    ModelDirError,
    describe_error,
)
from pipeline.models.refiner import OFFICIAL_CLASS_NAME, RefinerUNet
from pipeline.models.weights import DIFFUSERS, TRANSFORMERS, choose_weights, unreadable_weights

Loaded = tuple[Any | None, list[ModelDirError]]


def _names(keys: list[str]) -> str:
    shown = ", ".join(keys[:5])
    return shown + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")


@contextlib.contextmanager
def _quiet_libraries() -> Iterator[None]:
    """The libraries' own load reports and progress bars off while loading: every problem they
    report is reported here instead, one line each."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    saved = [
        (module, module.get_verbosity(), module.is_progress_bar_enabled())
        for module in (diffusers_logging, transformers_logging)
    ]
    for module, _, _ in saved:
        module.set_verbosity_error()
        module.disable_progress_bar()
    try:
        yield
    finally:
        for module, verbosity, bars in saved:
            module.set_verbosity(verbosity)
            if bars:
                module.enable_progress_bar()


def _read_config(path: Path, label: str) -> tuple[dict[str, Any] | None, list[ModelDirError]]:
    if not path.is_file():
        return None, [ModelDirError(f"{label}/: missing {path.name}")]
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        return None, [ModelDirError(f"{label}/{path.name}: unreadable ({error})")]
    if not isinstance(config, dict):
        return None, [ModelDirError(f"{label}/{path.name}: not a JSON object")]
    return config, []


def _loading_problems(label: str, info: dict[str, Any]) -> list[ModelDirError]:
    """What `from_pretrained(output_loading_info=True)` reports, after the library's renaming."""
    missing = sorted(info.get("missing_keys") or ())
    unexpected = sorted(info.get("unexpected_keys") or ())
    mismatched = sorted(info.get("mismatched_keys") or ())
    problems = []
    if missing:
        problems.append(
            ModelDirError(f"{label}/: {len(missing)} missing weights: {_names(missing)}")
        )
    if unexpected:
        problems.append(
            ModelDirError(f"{label}/: {len(unexpected)} unexpected weights: {_names(unexpected)}")
        )
    for key, found, expected in mismatched[:5]:
        problems.append(
            ModelDirError(
                f"{label}/: {key} has shape {tuple(found)} in the checkpoint, the config "
                f"expects {tuple(expected)}"
            )
        )
    if len(mismatched) > 5:
        problems.append(ModelDirError(f"{label}/: {len(mismatched) - 5} more shape mismatches"))
    for message in info.get("error_msgs") or ():
        problems.append(ModelDirError(f"{label}/: {describe_error(RuntimeError(message))}"))
    return problems


def load_pretrained(
    model_class: Any,
    folder: Path,
    label: str,
    library: str,
    *,
    dtype: torch.dtype,
    allow_unsafe_pickle: bool,
) -> Loaded:
    """One model through its library's `from_pretrained`, on the CPU; problems one line each.

    The library resolves the files and renames weights saved by its older versions (CLIP's
    `text_model.` prefix, diffusers' pre-0.14 attention names); whatever it then still cannot
    place (a missing or surplus tensor, a wrong shape) is a problem. Pickles are read with
    `torch.load(weights_only=True)` by both libraries.
    """
    if not folder.is_dir():
        return None, [ModelDirError(f"{label}/: folder missing from {folder.parent}")]
    config, problems = _read_config(folder / "config.json", label)
    if config is None:
        return None, problems
    try:
        choice = choose_weights(
            os.listdir(folder), library, label, allow_unsafe_pickle=allow_unsafe_pickle
        )
    except ModelDirError as error:
        return None, [error]
    problems = unreadable_weights(folder, label, choice)
    if problems:
        return None, problems
    options: dict[str, Any] = {
        "use_safetensors": choice.safetensors,
        "variant": choice.variant,
        # Mismatches come back in the loading info (and are refused below) instead of raising.
        "ignore_mismatched_sizes": True,
        "output_loading_info": True,
    }
    if library == DIFFUSERS:
        # With low_cpu_mem_usage diffusers raises at the first missing weight, without the list.
        options.update(torch_dtype=dtype, low_cpu_mem_usage=False)
    else:
        options.update(dtype=dtype, weights_only=True)
    try:
        with _quiet_libraries():
            model, info = model_class.from_pretrained(folder, **options)
    except Exception as error:
        return None, [
            ModelDirError(f"{label}/: cannot load {choice.entry} ({describe_error(error)})")
        ]
    problems = _loading_problems(label, info)
    return (None if problems else model), problems


def load_tokenizer(root: Path) -> Loaded:
    from transformers import CLIPTokenizer

    folder = root / TOKENIZER
    if not folder.is_dir():
        return None, [ModelDirError(f"{TOKENIZER}/: folder missing from {root}")]
    # The files CLIPTokenizer declares: tokenizer.json alone, or vocab.json + merges.txt. Checked
    # here because from_pretrained on a folder with neither quietly builds a 3-token vocabulary.
    files = dict(CLIPTokenizer.vocab_files_names)
    single = files.pop("tokenizer_file")
    if not (folder / single).is_file() and not all((folder / f).is_file() for f in files.values()):
        return None, [
            ModelDirError(f"{TOKENIZER}/: needs {single}, or {' + '.join(files.values())}")
        ]
    try:
        with _quiet_libraries():
            return CLIPTokenizer.from_pretrained(folder), []
    except Exception as error:
        return None, [ModelDirError(f"{TOKENIZER}/: cannot load ({describe_error(error)})")]


def encode_empty_prompt(tokenizer: Any, text_encoder: Any) -> torch.Tensor:
    """CLIP text embedding of "" padded to the prompt length: (1, 77, D), as the official
    pipeline computes it (no attention mask: the SD text encoder config has none)."""
    # The official pipeline pads to tokenizer.model_max_length (77 for SD); a tokenizer folder
    # with only tokenizer.json does not record it, so the text encoder's positions bound it.
    max_length = min(tokenizer.model_max_length, text_encoder.config.max_position_embeddings)
    tokens = tokenizer(
        "", padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    )
    with torch.inference_mode():
        return text_encoder(tokens.input_ids.to(text_encoder.device))[0]  # (1, 77, D)


def encode_with_clip(
    root: Path, *, device: torch.device, dtype: torch.dtype, allow_unsafe_pickle: bool
) -> Loaded:
    """The empty prompt's CLIP embedding (1, 77, D) from ROOT's tokenizer/ and text_encoder/."""
    from transformers import CLIPTextModel

    tokenizer, problems = load_tokenizer(root)
    text_encoder, more = load_pretrained(
        CLIPTextModel,
        root / TEXT_ENCODER,
        TEXT_ENCODER,
        TRANSFORMERS,
        dtype=dtype,
        allow_unsafe_pickle=allow_unsafe_pickle,
    )
    problems += more
    if problems:
        return None, problems
    try:
        embeds = encode_empty_prompt(tokenizer, text_encoder.to(device).eval())
    except Exception as error:
        return None, [
            ModelDirError(
                f"{TEXT_ENCODER}/: cannot encode the empty prompt ({describe_error(error)})"
            )
        ]
    return embeds.to(dtype), []


def load_text_side(
    root: Path, *, device: torch.device, dtype: torch.dtype, allow_unsafe_pickle: bool
) -> Loaded:
    """The empty-prompt embedding: from ROOT/empty_prompt_embeds.safetensors, else from CLIP."""
    path = root / EMPTY_PROMPT_EMBEDS
    if not path.is_file():
        return encode_with_clip(
            root, device=device, dtype=dtype, allow_unsafe_pickle=allow_unsafe_pickle
        )
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except Exception as error:
        return None, [ModelDirError(f"{EMPTY_PROMPT_EMBEDS}: unreadable ({describe_error(error)})")]
    embeds = tensors.get(EMPTY_PROMPT_KEY)
    if embeds is None:
        return None, [ModelDirError(f"{EMPTY_PROMPT_EMBEDS}: no {EMPTY_PROMPT_KEY!r} tensor")]
    if embeds.ndim != 3 or embeds.shape[0] != 1:
        return None, [
            ModelDirError(
                f"{EMPTY_PROMPT_EMBEDS}: shape {tuple(embeds.shape)}, expected (1, 77, D)"
            )
        ]
    return embeds.to(device=device, dtype=dtype), []


def load_scheduler(root: Path) -> Loaded:
    from diffusers import EulerAncestralDiscreteScheduler

    if not (root / SCHEDULER).is_dir():
        return None, [ModelDirError(f"{SCHEDULER}/: folder missing from {root}")]
    config, problems = _read_config(root / SCHEDULER / "scheduler_config.json", SCHEDULER)
    if config is None:
        return None, problems
    try:
        # As the official script: the inpainting model's scheduler config, as Euler ancestral.
        scheduler = EulerAncestralDiscreteScheduler.from_config(config)
    except Exception as error:
        return None, [
            ModelDirError(f"{SCHEDULER}/scheduler_config.json: unusable ({describe_error(error)})")
        ]
    if scheduler.config.prediction_type != "epsilon":
        return None, [
            ModelDirError(
                f"{SCHEDULER}/: prediction_type {scheduler.config.prediction_type!r}, "
                "DiffHarmony's UNet predicts 'epsilon'"
            )
        ]
    return scheduler, []


def load_vae(root: Path, *, dtype: torch.dtype, allow_unsafe_pickle: bool) -> Loaded:
    """sd-vae-ft-mse's AutoencoderKL, or DiffHarmony++'s Harmony-VAE when vae/config.json names
    the class "ConditionVAE" (as the release's cvae folders do)."""
    from diffusers import AutoencoderKL

    vae_class: Any = AutoencoderKL
    if (root / VAE / "config.json").is_file():
        config, problems = _read_config(root / VAE / "config.json", VAE)
        if config is None:
            return None, problems
        if config.get("_class_name") == CONDITION_VAE_CLASS_NAME:
            from pipeline.models.condition_vae import ConditionVAE  # diffusers: load when used

            vae_class = ConditionVAE
            extra = config.get("additional_in_channels", 1)
            if extra != 1:
                return None, [
                    ModelDirError(
                        f"{VAE}/: a {CONDITION_VAE_CLASS_NAME} with additional_in_channels "
                        f"{extra}; DiffHarmony++'s Harmony-VAE takes 1 (the mask)"
                    )
                ]
    vae, problems = load_pretrained(
        vae_class,
        root / VAE,
        VAE,
        DIFFUSERS,
        dtype=dtype,
        allow_unsafe_pickle=allow_unsafe_pickle,
    )
    if vae is not None and vae.config.latent_channels != 4:
        return None, [
            ModelDirError(f"{VAE}/: latent_channels {vae.config.latent_channels}, expected 4")
        ]
    return vae, problems


def load_unet(
    root: Path, *, dtype: torch.dtype, text_dim: int | None, allow_unsafe_pickle: bool
) -> Loaded:
    from diffusers import UNet2DConditionModel

    if (root / UNET).is_dir():
        config, problems = _read_config(root / UNET / "config.json", UNET)
        if config is None:
            return None, problems
        if config.get("in_channels") != UNET_IN_CHANNELS:
            return None, [
                ModelDirError(
                    f"{UNET}/: in_channels is {config.get('in_channels')}, the DiffHarmony UNet "
                    f"has {UNET_IN_CHANNELS} (4 latent + 1 mask + 4 composite latent); is this a "
                    "text-to-image UNet?"
                )
            ]
        if text_dim is not None and config.get("cross_attention_dim") != text_dim:
            return None, [
                ModelDirError(
                    f"{UNET}/: cross_attention_dim {config.get('cross_attention_dim')} does not "
                    f"match the text embedding size {text_dim}"
                )
            ]
    return load_pretrained(
        UNet2DConditionModel,
        root / UNET,
        UNET,
        DIFFUSERS,
        dtype=dtype,
        allow_unsafe_pickle=allow_unsafe_pickle,
    )


def load_refiner(root: Path, *, dtype: torch.dtype, allow_unsafe_pickle: bool) -> Loaded:
    if (root / REFINER).is_dir():
        config, problems = _read_config(root / REFINER / "config.json", REFINER)
        if config is None:
            return None, problems
        # Keys the official class does not take mean another model (a UNet2DModel has
        # time-embedding keys, for one); diffusers would drop them with a warning.
        _, unused, _ = RefinerUNet.extract_init_dict(config)
        unknown = sorted(k for k in unused if not k.startswith("_"))
        if unknown:
            return None, [
                ModelDirError(
                    f"{REFINER}/config.json: {', '.join(unknown)}: not arguments of the official "
                    f"{OFFICIAL_CLASS_NAME}"
                )
            ]
        try:
            with torch.device("meta"), _quiet_libraries():
                RefinerUNet.from_config(config)
        except (TypeError, ValueError) as error:
            return None, [ModelDirError(f"{REFINER}/config.json: {error}")]
    return load_pretrained(
        RefinerUNet,
        root / REFINER,
        REFINER,
        DIFFUSERS,
        dtype=dtype,
        allow_unsafe_pickle=allow_unsafe_pickle,
    )
