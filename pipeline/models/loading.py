"""DiffHarmony model directories: layout checks, remote copies to a node-local cache, loading.

Enters: a model directory, as a local path or an fsspec URI (s3://, gs://, file://, memory://).
Leaves: the local folder to load from (`resolve_model_dir`), a list of readable problems
(`check_model_dir`, empty when the folder is usable), and the loaded stage-1/stage-2 modules with
the constant empty-prompt embedding (`load_components`).

Expected layout (the official release's components, in diffusers folder layout):

    ROOT/
      tokenizer/     CLIPTokenizer: tokenizer.json, or vocab.json + merges.txt   SD inpainting
      text_encoder/  CLIPTextModel config.json + weights                          SD inpainting
      scheduler/     scheduler_config.json                                        SD inpainting
      vae/           AutoencoderKL config.json + weights                          sd-vae-ft-mse
      unet/          UNet2DConditionModel, in_channels 9                          DiffHarmony
      refiner/       stage-2 UNet2DCustom, in_channels 3/4/7                      DiffHarmony
      empty_prompt_embeds.safetensors  optional: key "prompt_embeds", (1, 77, D); when present,
                                       tokenizer/ and text_encoder/ are neither needed nor loaded

Each component is loaded by its own library's `from_pretrained` (transformers for the text
encoder and tokenizer, diffusers for the rest, the refiner being a diffusers model), so the files
real downloads hold are read as those libraries read them: weight names of their older versions
(CLIP's `text_model.` prefix, the VAE's pre-0.14 attention names), shards with an `.index.json`,
variants (`*.fp16.safetensors`). `check_model_dir` runs the very same loads and turns what the
libraries report (missing or surplus tensors, wrong shapes, unreadable files) into one line each.
Weights are read from `.safetensors`; pickled `.bin` files are refused unless the caller allows
them (`allow_unsafe_pickle`), and even then both libraries read them with
`torch.load(weights_only=True)`.

Remote directories are copied once per node to `<cache_dir>/<sha256(uri)[:16]>/` (default cache
`~/.cache/harmonize/models`): files go to a temporary folder, their sha256 is computed while they
stream and written to a manifest, and the folder is renamed into place; an exclusive file lock
serialises actors on the same node. Every later load re-hashes the copy against the manifest and
compares the remote listing (paths and sizes), fetching again if either differs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.models.refiner import OFFICIAL_CLASS_NAME, RefinerUNet
from pipeline.storage import filesystem

logger = logging.getLogger(__name__)

TOKENIZER = "tokenizer"
TEXT_ENCODER = "text_encoder"
SCHEDULER = "scheduler"
VAE = "vae"
UNET = "unet"
REFINER = "refiner"
EMPTY_PROMPT_EMBEDS = "empty_prompt_embeds.safetensors"
EMPTY_PROMPT_KEY = "prompt_embeds"
MANIFEST = ".harmonize-manifest.json"
UNET_IN_CHANNELS = 9  # 4 noisy latent + 1 mask + 4 composite latent
DEFAULT_CACHE = Path("~/.cache/harmonize/models")

_CHUNK = 8 << 20


class ModelDirError(ValueError):
    """The model directory cannot be used as it is; the message says why."""


class UnsafePickleError(ModelDirError):
    """A pickled checkpoint was found and pickles were not allowed."""


# --- weight files ------------------------------------------------------------------------------

# Which library loads which component, and so whose file names and renaming rules apply.
DIFFUSERS = "diffusers"
TRANSFORMERS = "transformers"


def library_weight_names(library: str) -> tuple[str, str, str, str]:
    """(safetensors file, its shard index, pickle file, its shard index) as `library` names them."""
    if library == DIFFUSERS:
        from diffusers.utils import (
            SAFE_WEIGHTS_INDEX_NAME,
            SAFETENSORS_WEIGHTS_NAME,
            WEIGHTS_INDEX_NAME,
            WEIGHTS_NAME,
        )

        return SAFETENSORS_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME
    from transformers.utils import (
        SAFE_WEIGHTS_INDEX_NAME,
        SAFE_WEIGHTS_NAME,
        WEIGHTS_INDEX_NAME,
        WEIGHTS_NAME,
    )

    return SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME


def with_variant(name: str, variant: str | None) -> str:
    """A weight file name with a variant, as both libraries spell it: before the last extension
    (`diffusion_pytorch_model.fp16.safetensors`, `model.safetensors.index.fp16.json`)."""
    if variant is None:
        return name
    stem, extension = name.rsplit(".", 1)
    return f"{stem}.{variant}.{extension}"


def _variants(name: str, names: Collection[str]) -> set[str]:
    stem, extension = name.rsplit(".", 1)
    pattern = re.compile(rf"{re.escape(stem)}\.(\w+)\.{re.escape(extension)}")
    return {match.group(1) for n in names if (match := pattern.fullmatch(n))}


@dataclass(frozen=True)
class WeightsChoice:
    """The weights a library is asked to read from one component folder."""

    entry: str  # the single weight file, or the shard index naming the files
    safetensors: bool
    variant: str | None  # "fp16" for diffusion_pytorch_model.fp16.safetensors, ...

    @property
    def sharded(self) -> bool:
        return self.entry.endswith(".json")


def choose_weights(
    names: Collection[str], library: str, where: str, *, allow_unsafe_pickle: bool = False
) -> WeightsChoice:
    """Which weights of a component folder (its file names) to load, as `from_pretrained` args.

    Safetensors before pickles, the plain file before variants (a download may hold the fp32
    file, its fp16 variant and pickles of both). Several variants and no plain file is
    ambiguous. Pickles are refused (UnsafePickleError) unless allowed. `where` prefixes messages.
    """
    safe, safe_index, pickle, pickle_index = library_weight_names(library)
    for safetensors, single, index in ((True, safe, safe_index), (False, pickle, pickle_index)):
        choice = None
        if single in names or index in names:
            choice = WeightsChoice(single if single in names else index, safetensors, None)
        else:
            variants = sorted(_variants(single, names) | _variants(index, names))
            if len(variants) > 1:
                raise ModelDirError(
                    f"{where}/: weights in several variants ({', '.join(variants)}) and no "
                    f"{single}; keep one"
                )
            if variants:
                entry = with_variant(single, variants[0])
                entry = entry if entry in names else with_variant(index, variants[0])
                choice = WeightsChoice(entry, safetensors, variants[0])
        if choice is None:
            continue
        if not safetensors and not allow_unsafe_pickle:
            raise UnsafePickleError(
                f"{where}/{choice.entry}: pickled checkpoint (loading a pickle can run code); "
                "convert it to safetensors (`harmonize model assemble --allow-unsafe-pickle` "
                "does), or allow pickles (--allow-unsafe-pickle, allow_unsafe_pickle) if you "
                "trust it"
            )
        return choice
    raise ModelDirError(f"{where}/: no weights (expected {safe} or {safe_index})")


def shard_names(index_text: str) -> list[str]:
    """The shard files a `*.index.json` names."""
    return sorted(set(json.loads(index_text)["weight_map"].values()))


def _unreadable_weights(folder: Path, label: str, choice: WeightsChoice) -> list[ModelDirError]:
    """Missing shards and unreadable safetensors (a truncated download), each naming the file.

    Opening a safetensors file parses its header, which checks that the data covers every
    tensor; no tensor is read.
    """
    names = [choice.entry]
    if choice.sharded:
        try:
            names = shard_names((folder / choice.entry).read_text())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            return [ModelDirError(f"{label}/{choice.entry}: unreadable shard index ({error})")]
        missing = [name for name in names if not (folder / name).is_file()]
        if missing:
            return [
                ModelDirError(f"{label}/{name}: missing (listed in {choice.entry})")
                for name in missing
            ]
    if not choice.safetensors:
        return []
    from safetensors import safe_open

    problems = []
    for name in names:
        try:
            with safe_open(str(folder / name), framework="pt"):
                pass
        except Exception as error:
            problems.append(
                ModelDirError(
                    f"{label}/{name}: unreadable ({describe_error(error)}); truncated, or not a "
                    "safetensors file"
                )
            )
    return problems


# --- loading each component, for the check and the run alike ------------------------------------


def describe_error(error: BaseException) -> str:
    """An exception as one line: its root cause's message (the libraries wrap the reason, a
    truncated archive or a refused pickle global, in a generic "unable to load")."""
    while (cause := error.__cause__ or error.__context__) is not None:
        error = cause
    lines = str(error).strip().splitlines()
    text = lines[0].strip() if lines else type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."


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


def _load_pretrained(
    model_class: Any,
    folder: Path,
    label: str,
    library: str,
    *,
    dtype: torch.dtype,
    allow_unsafe_pickle: bool,
) -> tuple[Any | None, list[ModelDirError]]:
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
    problems = _unreadable_weights(folder, label, choice)
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


def _load_tokenizer(root: Path) -> tuple[Any | None, list[ModelDirError]]:
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


def _text_side(
    root: Path, *, device: torch.device, dtype: torch.dtype, allow_unsafe_pickle: bool
) -> tuple[torch.Tensor | None, list[ModelDirError]]:
    """The empty-prompt embedding: from ROOT/empty_prompt_embeds.safetensors, else from CLIP."""
    from transformers import CLIPTextModel

    path = root / EMPTY_PROMPT_EMBEDS
    if path.is_file():
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path))
        except Exception as error:
            return None, [
                ModelDirError(f"{EMPTY_PROMPT_EMBEDS}: unreadable ({describe_error(error)})")
            ]
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

    tokenizer, problems = _load_tokenizer(root)
    text_encoder, more = _load_pretrained(
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


def _load_scheduler(root: Path) -> tuple[Any | None, list[ModelDirError]]:
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


def _load_vae(
    root: Path, *, dtype: torch.dtype, allow_unsafe_pickle: bool
) -> tuple[Any | None, list[ModelDirError]]:
    from diffusers import AutoencoderKL

    vae, problems = _load_pretrained(
        AutoencoderKL,
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


def _load_unet(
    root: Path, *, dtype: torch.dtype, text_dim: int | None, allow_unsafe_pickle: bool
) -> tuple[Any | None, list[ModelDirError]]:
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
    return _load_pretrained(
        UNet2DConditionModel,
        root / UNET,
        UNET,
        DIFFUSERS,
        dtype=dtype,
        allow_unsafe_pickle=allow_unsafe_pickle,
    )


def _load_refiner(
    root: Path, *, dtype: torch.dtype, allow_unsafe_pickle: bool
) -> tuple[Any | None, list[ModelDirError]]:
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
    return _load_pretrained(
        RefinerUNet,
        root / REFINER,
        REFINER,
        DIFFUSERS,
        dtype=dtype,
        allow_unsafe_pickle=allow_unsafe_pickle,
    )


def _load_all(
    root: Path,
    *,
    device: torch.device,
    dtype: torch.dtype,
    load_refiner: bool,
    allow_unsafe_pickle: bool,
    keep: bool,
) -> tuple[dict[str, Any], list[ModelDirError]]:
    """Every component the run needs, loaded one after the other, and every problem found.

    With keep=False each model is dropped as soon as it is judged (the check's memory is one
    component's, not the whole model's).
    """
    loaded: dict[str, Any] = {}
    problems: list[ModelDirError] = []

    def take(name: str, result: tuple[Any | None, list[ModelDirError]]) -> Any | None:
        component, found = result
        problems.extend(found)
        if keep and component is not None:
            loaded[name] = component
        return component

    embeds = take(
        EMPTY_PROMPT_EMBEDS,
        _text_side(root, device=device, dtype=dtype, allow_unsafe_pickle=allow_unsafe_pickle),
    )
    text_dim = int(embeds.shape[-1]) if embeds is not None else None
    take(SCHEDULER, _load_scheduler(root))
    take(VAE, _load_vae(root, dtype=dtype, allow_unsafe_pickle=allow_unsafe_pickle))
    take(
        UNET,
        _load_unet(root, dtype=dtype, text_dim=text_dim, allow_unsafe_pickle=allow_unsafe_pickle),
    )
    if load_refiner:
        take(REFINER, _load_refiner(root, dtype=dtype, allow_unsafe_pickle=allow_unsafe_pickle))
    return loaded, problems


def check_model_dir(
    path: str | Path,
    allow_unsafe_pickle: bool = False,
    *,
    require_refiner: bool = True,
    cache_dir: str | Path | None = None,
    storage_options: dict[str, Any] | None = None,
) -> list[str]:
    """Human-readable problems with a model directory, one line each; empty means usable.

    Judges the folder exactly as `load_components` loads it: each component through its
    library's `from_pretrained` (on the CPU, one at a time, then dropped), the empty prompt
    encoded. A URI is first copied to the node cache.
    """
    if is_remote(str(path)):
        try:
            path = resolve_model_dir(
                str(path), cache_dir=cache_dir, storage_options=storage_options
            )
        except Exception as error:
            return [f"{path}: cannot fetch the model directory ({error})"]
    root = Path(path)
    if not root.is_dir():
        return [f"{root}: model directory not found"]
    _, problems = _load_all(
        root,
        device=torch.device("cpu"),
        dtype=torch.float32,
        load_refiner=require_refiner,
        allow_unsafe_pickle=allow_unsafe_pickle,
        keep=False,
    )
    return [str(problem) for problem in problems]


# --- remote copies -----------------------------------------------------------------------------


def is_remote(uri: str) -> bool:
    """fsspec URIs (anything with a protocol, file:// included) are copied; plain paths are not."""
    return re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", uri) is not None


def cache_path(uri: str, cache_dir: str | Path | None = None) -> Path:
    """Where a remote model directory is cached on this node."""
    root = Path(cache_dir) if cache_dir else DEFAULT_CACHE
    key = hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]
    return root.expanduser() / key


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_checksums(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under `root` (the cache manifest excluded)."""
    return {
        path.relative_to(root).as_posix(): _sha256_file(path)
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }


def read_manifest(local: Path) -> dict[str, dict[str, Any]]:
    """Relative path -> {"sha256", "size"} as recorded when the copy was made."""
    return json.loads((local / MANIFEST).read_text())["files"]


def verify_cache(local: Path) -> list[str]:
    """Problems with a cached copy: files missing, resized or not matching their sha256."""
    if not (local / MANIFEST).is_file():
        return [f"{local}: no {MANIFEST} (incomplete copy)"]
    problems = []
    for rel, entry in read_manifest(local).items():
        path = local / rel
        if not path.is_file():
            problems.append(f"{rel}: missing from the cache")
        elif path.stat().st_size != entry["size"]:
            problems.append(f"{rel}: size {path.stat().st_size}, manifest says {entry['size']}")
        elif _sha256_file(path) != entry["sha256"]:
            problems.append(f"{rel}: sha256 differs from the manifest (corrupted)")
    return problems


@contextlib.contextmanager
def _node_lock(lock_file: Path) -> Iterator[None]:
    """An exclusive lock among the processes of this node (released if the holder dies)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: the atomic rename still protects the cache
        yield
        return
    with lock_file.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def list_tree(fs: Any, remote_root: str) -> dict[str, int]:
    """Relative path -> size of every file under the remote directory."""
    remote_root = remote_root.rstrip("/")
    listing = {}
    for path, info in fs.find(remote_root, detail=True).items():
        if info.get("type", "file") != "file":
            continue
        rel = path.rstrip("/")[len(remote_root) :].lstrip("/")
        if rel and rel != MANIFEST:
            listing[rel] = int(info.get("size") or 0)
    return listing


def _fetch_tree(fs: Any, remote_root: str, listing: dict[str, int], local: Path, uri: str) -> None:
    """Copy every listed file to a temporary folder, hashing as it streams, then rename it."""
    tmp = local.parent / f".{local.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        manifest: dict[str, dict[str, Any]] = {}
        for rel in sorted(listing):
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            digest, size = hashlib.sha256(), 0
            with fs.open(f"{remote_root.rstrip('/')}/{rel}", "rb") as src, target.open("wb") as dst:
                while chunk := src.read(_CHUNK):
                    digest.update(chunk)
                    dst.write(chunk)
                    size += len(chunk)
            if size != listing[rel]:
                raise ModelDirError(f"{uri}/{rel} changed while it was being copied")
            manifest[rel] = {"sha256": digest.hexdigest(), "size": size}
        (tmp / MANIFEST).write_text(json.dumps({"uri": uri, "files": manifest}, indent=1))
        try:
            os.rename(tmp, local)
        except OSError:
            if not local.is_dir():  # not the "another process finished first" case
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("copied %s (%d files) to %s", uri, len(listing), local)


def _discard(local: Path) -> None:
    # Rename first: a crash while deleting must not leave a half-deleted folder at `local`.
    stale = local.parent / f".{local.name}.stale-{uuid.uuid4().hex[:8]}"
    os.rename(local, stale)
    shutil.rmtree(stale, ignore_errors=True)


def resolve_model_dir(
    uri: str,
    *,
    cache_dir: str | Path | None = None,
    storage_options: dict[str, Any] | None = None,
) -> Path:
    """The local folder to load from: a plain path as is, a URI through the node cache.

    Credentials and endpoints come from `storage_options` or the environment (e.g. AWS_* and
    FSSPEC_S3_ENDPOINT_URL for s3://); the filesystem is `storage.filesystem`'s, with the retry
    settings of every other read.
    """
    if not is_remote(uri):
        local = Path(uri).expanduser()
        if not local.is_dir():
            raise ModelDirError(f"{local}: model directory not found")
        return local

    local = cache_path(uri, cache_dir)
    local.parent.mkdir(parents=True, exist_ok=True)
    with _node_lock(local.parent / f"{local.name}.lock"):
        fs, remote_root = filesystem(uri, storage_options or {})
        try:
            listing: dict[str, int] | None = list_tree(fs, remote_root)
        except Exception as error:
            if not local.is_dir():
                raise ModelDirError(f"{uri}: cannot list the model directory ({error})") from error
            logger.warning("cannot list %s (%s); using the cached copy", uri, error)
            listing = None
        if listing == {}:
            raise ModelDirError(f"{uri}: no files under this URI")

        if local.is_dir():
            problems = verify_cache(local)
            if not problems and listing is not None:
                recorded = {rel: e["size"] for rel, e in read_manifest(local).items()}
                if recorded != listing:
                    problems = ["the remote directory changed since it was copied"]
            if not problems:
                return local
            if listing is None:
                raise ModelDirError(f"{local}: cache unusable and remote unreachable: {problems}")
            logger.warning("cached %s is unusable (%s); copying it again", uri, "; ".join(problems))
            _discard(local)
        assert listing is not None
        # Under the lock, leftovers of this key belong to processes that died mid-copy.
        for leftover in local.parent.glob(f".{local.name}.*"):
            shutil.rmtree(leftover, ignore_errors=True)
        _fetch_tree(fs, remote_root, listing, local, uri)
    return local


# --- loading -----------------------------------------------------------------------------------


def compute_empty_prompt_embeds(
    root: Path, *, device: torch.device, dtype: torch.dtype, allow_unsafe_pickle: bool = False
) -> torch.Tensor:
    """The empty prompt's CLIP embedding from ROOT's tokenizer/ and text_encoder/: (1, 77, D)."""
    from transformers import CLIPTextModel

    tokenizer, problems = _load_tokenizer(root)
    text_encoder, more = _load_pretrained(
        CLIPTextModel,
        root / TEXT_ENCODER,
        TEXT_ENCODER,
        TRANSFORMERS,
        dtype=dtype,
        allow_unsafe_pickle=allow_unsafe_pickle,
    )
    problems += more
    if problems:
        raise ModelDirError("; ".join(map(str, problems)))
    return encode_empty_prompt(tokenizer, text_encoder.to(device).eval()).to(dtype)


def load_empty_prompt_embeds(
    root: Path, *, device: torch.device, dtype: torch.dtype, allow_unsafe_pickle: bool = False
) -> torch.Tensor:
    """From `ROOT/empty_prompt_embeds.safetensors` when present, else computed with CLIP once."""
    embeds, problems = _text_side(
        root, device=device, dtype=dtype, allow_unsafe_pickle=allow_unsafe_pickle
    )
    if embeds is None:
        raise ModelDirError("; ".join(map(str, problems)))
    return embeds


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

    embeds = compute_empty_prompt_embeds(
        root, device=torch.device(device), dtype=dtype, allow_unsafe_pickle=allow_unsafe_pickle
    )
    path = root / EMPTY_PROMPT_EMBEDS
    save_file({EMPTY_PROMPT_KEY: embeds.cpu().contiguous()}, str(path))
    return path


@dataclass
class DiffHarmonyComponents:
    """Everything stage 1 and stage 2 need, loaded on one device in one dtype."""

    root: Path
    unet: Any  # diffusers UNet2DConditionModel, in_channels 9
    vae: Any  # diffusers AutoencoderKL
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
    loaded, problems = _load_all(
        root,
        device=device,
        dtype=dtype,
        load_refiner=load_refiner,
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

    def public(config: Any) -> dict[str, Any]:
        # `_name_or_path` and the like name the local folder, which differs between nodes.
        return {k: v for k, v in dict(config).items() if not k.startswith("_")}

    configs = {
        UNET: public(unet.config),
        VAE: public(vae.config),
        SCHEDULER: public(scheduler.config),
    }
    if refiner is not None:
        configs[REFINER] = public(refiner.config)
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
