"""The loaded DiffHarmony components, from a model directory (local path or URI).

Enters: a model directory, as a local path or an fsspec URI; device, dtype; whether the refiner
is wanted and pickles allowed.
Leaves: `DiffHarmonyComponents` (UNet, VAE, scheduler, refiner, the constant empty-prompt
embedding, the files' checksums and the public configs that make the model's fingerprint), or
a `ModelDirError` listing every problem (the lines `check_model_dir` gives). Also the empty
prompt precomputed into a folder, so that actors need not load CLIP.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.models.cache import MANIFEST, file_checksums, read_manifest, resolve_model_dir
from pipeline.models.layout import (
    EMPTY_PROMPT_EMBEDS,
    EMPTY_PROMPT_KEY,
    REFINER,
    SCHEDULER,
    UNET,
    VAE,
    ModelDirError,
    UnsafePickleError,
)
from pipeline.models.pretrained import (
    Loaded,
    encode_with_clip,
    load_refiner,
    load_scheduler,
    load_text_side,
    load_unet,
    load_vae,
)
from pipeline.models.refiner import RefinerUNet


def load_all(
    root: Path,
    *,
    device: torch.device,
    dtype: torch.dtype,
    with_refiner: bool,
    allow_unsafe_pickle: bool,
    keep: bool,
) -> tuple[dict[str, Any], list[ModelDirError]]:
    """Every component the run needs, loaded one after the other, and every problem found.

    With keep=False each model is dropped as soon as it is judged (the check's memory is one
    component's, not the whole model's).
    """
    loaded: dict[str, Any] = {}
    problems: list[ModelDirError] = []

    def take(name: str, result: Loaded) -> Any | None:
        component, found = result
        problems.extend(found)
        if keep and component is not None:
            loaded[name] = component
        return component

    embeds = take(
        EMPTY_PROMPT_EMBEDS,
        load_text_side(root, device=device, dtype=dtype, allow_unsafe_pickle=allow_unsafe_pickle),
    )
    text_dim = int(embeds.shape[-1]) if embeds is not None else None
    take(SCHEDULER, load_scheduler(root))
    take(VAE, load_vae(root, dtype=dtype, allow_unsafe_pickle=allow_unsafe_pickle))
    take(
        UNET,
        load_unet(root, dtype=dtype, text_dim=text_dim, allow_unsafe_pickle=allow_unsafe_pickle),
    )
    if with_refiner:
        take(REFINER, load_refiner(root, dtype=dtype, allow_unsafe_pickle=allow_unsafe_pickle))
    return loaded, problems


def save_empty_prompt_embeds(
    root: Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    allow_unsafe_pickle: bool = False,
) -> Path:
    """Precompute the empty-prompt embedding into ROOT so actors need not load CLIP.

    The official script runs the text encoder in fp16; pass dtype=torch.float16 on a GPU to
    store exactly the embedding it uses.
    """
    from safetensors.torch import save_file

    embeds, problems = encode_with_clip(
        root, device=torch.device(device), dtype=dtype, allow_unsafe_pickle=allow_unsafe_pickle
    )
    if embeds is None:
        raise ModelDirError("; ".join(map(str, problems)))
    path = root / EMPTY_PROMPT_EMBEDS
    save_file({EMPTY_PROMPT_KEY: embeds.cpu().contiguous()}, str(path))
    return path


def public_config(config: Any) -> dict[str, Any]:
    """A component's config without `_name_or_path` and the like: they name the local folder,
    which differs between nodes, and must not change the model's fingerprint."""
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


@dataclass
class DiffHarmonyComponents:
    """Everything stage 1 and stage 2 need, loaded on one device in one dtype."""

    root: Path
    unet: Any  # diffusers UNet2DConditionModel, in_channels 9
    vae: Any  # diffusers AutoencoderKL, or a ConditionVAE (Harmony-VAE)
    scheduler: Any  # diffusers EulerAncestralDiscreteScheduler
    refiner: RefinerUNet | None
    empty_prompt_embeds: torch.Tensor  # (1, 77, D)
    checksums: dict[str, str] = field(default_factory=dict)  # relative path -> sha256
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)


def load_components(
    model_dir: str,
    *,
    device: torch.device,
    dtype: torch.dtype,
    load_refiner: bool = True,
    allow_unsafe_pickle: bool = False,
    cache_dir: str | None = None,
    storage_options: dict[str, Any] | None = None,
) -> DiffHarmonyComponents:
    """Resolve and load a model directory; raises ModelDirError listing every problem (the same
    lines `check_model_dir` gives), UnsafePickleError when a pickle was among them."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    root = resolve_model_dir(model_dir, cache_dir=cache_dir, storage_options=storage_options)
    loaded, problems = load_all(
        root,
        device=device,
        dtype=dtype,
        with_refiner=load_refiner,
        allow_unsafe_pickle=allow_unsafe_pickle,
        keep=True,
    )
    if problems:
        error = (
            UnsafePickleError
            if any(isinstance(p, UnsafePickleError) for p in problems)
            else ModelDirError
        )
        raise error(
            f"model directory {model_dir} is not usable:\n  " + "\n  ".join(map(str, problems))
        )
    unet, vae, refiner = loaded[UNET], loaded[VAE], loaded.get(REFINER)
    for model in (unet, vae):
        # PyTorch SDPA everywhere (the official script used xformers; same maths).
        model.set_attn_processor(AttnProcessor2_0())
    for model in (unet, vae, refiner):
        if model is not None:
            # Already in `dtype`: from_pretrained built it so (a diffusers .to(dtype) warns).
            model.to(device).eval().requires_grad_(False)
    scheduler = loaded[SCHEDULER]

    checksums = (
        {rel: entry["sha256"] for rel, entry in read_manifest(root).items()}
        if (root / MANIFEST).is_file()
        else file_checksums(root)
    )

    configs = {
        UNET: public_config(unet.config),
        VAE: public_config(vae.config),
        SCHEDULER: public_config(scheduler.config),
    }
    if refiner is not None:
        configs[REFINER] = public_config(refiner.config)
    return DiffHarmonyComponents(
        root=root,
        unet=unet,
        vae=vae,
        scheduler=scheduler,
        refiner=refiner,
        empty_prompt_embeds=loaded[EMPTY_PROMPT_EMBEDS],
        checksums=checksums,
        configs=configs,
    )
