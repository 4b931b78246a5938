"""DiffHarmony model directories: layout checks, remote copies to a node-local cache, loading.

Enters: a model directory, as a local path or an fsspec URI (s3://, gs://, file://, memory://).
Leaves: the local folder to load from (`resolve_model_dir`), a list of readable problems
(`check_model_dir`, empty when the folder is usable), and the loaded stage-1/stage-2 modules with
the constant empty-prompt embedding (`load_components`).

Expected layout (the official release's components, in diffusers folder layout):

    ROOT/
      tokenizer/     CLIPTokenizer files (vocab.json, merges.txt, ...) stable-diffusion-inpainting
      text_encoder/  CLIPTextModel config.json + model.safetensors      stable-diffusion-inpainting
      scheduler/     scheduler_config.json                               stable-diffusion-inpainting
      vae/           AutoencoderKL config.json + diffusion_pytorch_model.safetensors  sd-vae-ft-mse
      unet/          UNet2DConditionModel, in_channels 9                 DiffHarmony release
      refiner/       stage-2 UNet2DCustom, in_channels 3/4/7             DiffHarmony release
      empty_prompt_embeds.safetensors  optional: key "prompt_embeds", (1, 77, D); when present,
                                       tokenizer/ and text_encoder/ are neither needed nor loaded

Weights are read from `.safetensors`; pickled `.bin` files are refused unless the caller allows
them (`allow_unsafe_pickle`), and even then they are read with `torch.load(weights_only=True)`.

Remote directories are copied once per node to `<cache_dir>/<sha256(uri)[:16]>/` (default cache
`~/.cache/harmonize/models`): files go to a temporary folder, their sha256 is computed while they
stream and written to a manifest, and the folder is renamed into place; an exclusive file lock
serialises actors on the same node. Every later load re-hashes the copy against the manifest and
compares the remote listing (paths and sizes), fetching again if either differs.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.models.refiner import (
    SUPPORTED_IN_CHANNELS,
    RefinerConfig,
    RefinerUNet,
    rename_legacy_attention_keys,
)

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

_SAFETENSORS_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors")
_PICKLE_NAMES = ("diffusion_pytorch_model.bin", "pytorch_model.bin")
_CHUNK = 8 << 20


class ModelDirError(ValueError):
    """The model directory cannot be used as it is; the message says why."""


class UnsafePickleError(ModelDirError):
    """A pickled checkpoint was found and pickles were not allowed."""


# --- weight files ------------------------------------------------------------------------------


def _shards(index_file: Path) -> list[Path]:
    weight_map = json.loads(index_file.read_text())["weight_map"]
    return [index_file.parent / name for name in sorted(set(weight_map.values()))]


def weight_files(folder: Path, *, allow_unsafe_pickle: bool = False) -> list[Path]:
    """The weight files of one component folder, safetensors preferred (single file or shards)."""
    for name in _SAFETENSORS_NAMES:
        if (folder / name).is_file():
            return [folder / name]
        if (folder / f"{name}.index.json").is_file():
            return _shards(folder / f"{name}.index.json")
    candidates = [*_PICKLE_NAMES, *(f"{n}.index.json" for n in _PICKLE_NAMES)]
    pickles = [folder / name for name in candidates if (folder / name).is_file()]
    if pickles:
        if not allow_unsafe_pickle:
            raise UnsafePickleError(
                f"{pickles[0]} is a pickled checkpoint; convert it to safetensors, or allow "
                "pickles explicitly (allow_unsafe_pickle / --allow-unsafe-pickle) if you trust it"
            )
        first = pickles[0]
        return _shards(first) if first.name.endswith(".index.json") else [first]
    raise ModelDirError(
        f"{folder}: no weights (expected {_SAFETENSORS_NAMES[0]} or {_SAFETENSORS_NAMES[1]})"
    )


def read_weights(path: Path, *, allow_unsafe_pickle: bool = False) -> dict[str, torch.Tensor]:
    """One weight file as a CPU state dict."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if not allow_unsafe_pickle:
        raise UnsafePickleError(f"{path} is a pickled checkpoint and pickles are not allowed")
    return torch.load(path, map_location="cpu", weights_only=True)


def weight_shapes(folder: Path, *, allow_unsafe_pickle: bool = False) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, read from safetensors headers (no tensor data is loaded)."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for path in weight_files(folder, allow_unsafe_pickle=allow_unsafe_pickle):
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():
                    shapes[key] = tuple(handle.get_slice(key).get_shape())
        else:
            tensors = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            shapes.update({k: tuple(v.shape) for k, v in tensors.items()})
    return shapes


def _uses_pickle(folder: Path) -> bool:
    """True when the folder's weights exist only as pickles (False when there are none at all)."""
    try:
        files = weight_files(folder, allow_unsafe_pickle=True)
    except ModelDirError:
        return False
    return all(p.suffix != ".safetensors" for p in files)


# --- checks ------------------------------------------------------------------------------------


def _read_json(path: Path, problems: list[str]) -> dict[str, Any] | None:
    if not path.is_file():
        problems.append(f"{path.parent.name}/: missing {path.name}")
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        problems.append(f"{path.parent.name}/{path.name}: unreadable ({error})")
        return None
    if not isinstance(config, dict):
        problems.append(f"{path.parent.name}/{path.name}: not a JSON object")
        return None
    return config


def _names(keys: list[str]) -> str:
    shown = ", ".join(keys[:5])
    return shown + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")


def _compare_weights(
    name: str,
    model: torch.nn.Module,
    folder: Path,
    allow_unsafe_pickle: bool,
    ignore_unexpected: tuple[str, ...] = (),
) -> list[str]:
    """Missing/unexpected keys and shape mismatches of a folder's weights against `model`."""
    try:
        found = rename_legacy_attention_keys(
            weight_shapes(folder, allow_unsafe_pickle=allow_unsafe_pickle)
        )
    except ModelDirError as error:
        return [f"{name}/: {error}"]
    except Exception as error:  # a truncated or foreign file: report it, do not crash the check
        return [f"{name}/: weights unreadable ({error})"]
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = []
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(k for k in set(found) - set(expected) if not k.endswith(ignore_unexpected))
    mismatched = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
    if missing:
        problems.append(f"{name}/: {len(missing)} missing weights: {_names(missing)}")
    if unexpected:
        problems.append(f"{name}/: {len(unexpected)} unexpected weights: {_names(unexpected)}")
    for key in mismatched[:5]:
        problems.append(
            f"{name}/: {key} has shape {found[key]}, the config expects {expected[key]}"
        )
    if len(mismatched) > 5:
        problems.append(f"{name}/: {len(mismatched) - 5} more shape mismatches")
    return problems


def _build_on_meta(factory: Any, name: str, problems: list[str]) -> torch.nn.Module | None:
    try:
        with torch.device("meta"):
            return factory()
    except Exception as error:
        problems.append(f"{name}/config.json: cannot build the model ({error})")
        return None


def check_model_dir(
    path: str | Path,
    allow_unsafe_pickle: bool = False,
    *,
    require_refiner: bool = True,
    cache_dir: str | Path | None = None,
    storage_options: dict[str, Any] | None = None,
) -> list[str]:
    """Human-readable problems with a model directory; an empty list means usable.

    Reads configs and safetensors headers only (models are built on the meta device), so it is
    cheap even for the full-size checkpoints. A URI is first copied to the node cache.
    """
    from diffusers import AutoencoderKL, EulerAncestralDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

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
    problems: list[str] = []
    required = [SCHEDULER, VAE, UNET] + ([REFINER] if require_refiner else [])
    embeds_file = root / EMPTY_PROMPT_EMBEDS
    if not embeds_file.is_file():
        required[:0] = [TOKENIZER, TEXT_ENCODER]
    for name in required:
        if not (root / name).is_dir():
            problems.append(f"{name}/: folder missing from {root}")

    # Text side: the hidden size the UNet's cross-attention must match.
    text_dim: int | None = None
    if embeds_file.is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(embeds_file), framework="pt") as handle:
                shape = tuple(handle.get_slice(EMPTY_PROMPT_KEY).get_shape())
            if len(shape) != 3 or shape[0] != 1:
                problems.append(f"{EMPTY_PROMPT_EMBEDS}: shape {shape}, expected (1, 77, D)")
            else:
                text_dim = shape[2]
        except Exception as error:
            problems.append(f"{EMPTY_PROMPT_EMBEDS}: unreadable ({error})")
    else:
        tokenizer_dir = root / TOKENIZER
        if tokenizer_dir.is_dir() and not (
            (tokenizer_dir / "tokenizer.json").is_file()
            or (
                (tokenizer_dir / "vocab.json").is_file()
                and (tokenizer_dir / "merges.txt").is_file()
            )
        ):
            problems.append(f"{TOKENIZER}/: needs vocab.json + merges.txt (or tokenizer.json)")
        if (root / TEXT_ENCODER).is_dir():
            config = _read_json(root / TEXT_ENCODER / "config.json", problems)
            if config is not None:
                text_dim = config.get("hidden_size")
                model = _build_on_meta(
                    lambda: CLIPTextModel(CLIPTextConfig.from_dict(config)), TEXT_ENCODER, problems
                )
                if model is not None:
                    problems += _compare_weights(
                        TEXT_ENCODER,
                        model,
                        root / TEXT_ENCODER,
                        allow_unsafe_pickle,
                        ignore_unexpected=("position_ids",),
                    )

    if (root / SCHEDULER).is_dir():
        config = _read_json(root / SCHEDULER / "scheduler_config.json", problems)
        if config is not None:
            try:
                scheduler = EulerAncestralDiscreteScheduler.from_config(config)
                if scheduler.config.prediction_type != "epsilon":
                    problems.append(
                        f"{SCHEDULER}/: prediction_type {scheduler.config.prediction_type!r}, "
                        "DiffHarmony's UNet predicts 'epsilon'"
                    )
            except Exception as error:
                problems.append(f"{SCHEDULER}/scheduler_config.json: unusable ({error})")

    if (root / VAE).is_dir():
        config = _read_json(root / VAE / "config.json", problems)
        if config is not None:
            model = _build_on_meta(lambda: AutoencoderKL.from_config(config), VAE, problems)
            if model is not None:
                problems += _compare_weights(VAE, model, root / VAE, allow_unsafe_pickle)
                if model.config.latent_channels != 4:
                    problems.append(
                        f"{VAE}/: latent_channels {model.config.latent_channels}, expected 4"
                    )

    if (root / UNET).is_dir():
        config = _read_json(root / UNET / "config.json", problems)
        if config is not None:
            if config.get("in_channels") != UNET_IN_CHANNELS:
                problems.append(
                    f"{UNET}/: in_channels is {config.get('in_channels')}, the DiffHarmony UNet "
                    f"has {UNET_IN_CHANNELS} (4 latent + 1 mask + 4 composite latent); is this a "
                    "text-to-image UNet?"
                )
            elif text_dim is not None and config.get("cross_attention_dim") != text_dim:
                problems.append(
                    f"{UNET}/: cross_attention_dim {config.get('cross_attention_dim')} does not "
                    f"match the text embedding size {text_dim}"
                )
            else:
                model = _build_on_meta(
                    lambda: UNet2DConditionModel.from_config(config), UNET, problems
                )
                if model is not None:
                    problems += _compare_weights(UNET, model, root / UNET, allow_unsafe_pickle)

    if require_refiner and (root / REFINER).is_dir():
        config = _read_json(root / REFINER / "config.json", problems)
        if config is not None:
            try:
                refiner_config = RefinerConfig.from_dict(config)
                refiner_config.validate()
            except (TypeError, ValueError) as error:
                problems.append(
                    f"{REFINER}/config.json: {error} (in_channels must be one of "
                    f"{SUPPORTED_IN_CHANNELS})"
                )
            else:
                model = _build_on_meta(lambda: RefinerUNet(refiner_config), REFINER, problems)
                if model is not None:
                    problems += _compare_weights(
                        REFINER, model, root / REFINER, allow_unsafe_pickle
                    )
    return problems


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


def _remote_listing(fs: Any, remote_root: str) -> dict[str, int]:
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
    FSSPEC_S3_ENDPOINT_URL for s3://).
    """
    if not is_remote(uri):
        local = Path(uri).expanduser()
        if not local.is_dir():
            raise ModelDirError(f"{local}: model directory not found")
        return local

    import fsspec

    local = cache_path(uri, cache_dir)
    local.parent.mkdir(parents=True, exist_ok=True)
    with _node_lock(local.parent / f"{local.name}.lock"):
        fs, remote_root = fsspec.core.url_to_fs(uri, **(storage_options or {}))
        try:
            listing: dict[str, int] | None = _remote_listing(fs, remote_root)
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
    root: Path, *, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """CLIP text embedding of "" padded to max_length (77): (1, 77, D), as the official pipeline."""
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(root / TOKENIZER)
    text_encoder = CLIPTextModel.from_pretrained(root / TEXT_ENCODER, dtype=dtype)
    text_encoder = text_encoder.to(device).eval()
    tokens = tokenizer(
        "",
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    with torch.inference_mode():
        # No attention mask: the SD text encoder config has no use_attention_mask.
        embeds = text_encoder(tokens.input_ids.to(device))[0]  # (1, 77, D)
    return embeds.to(dtype)


def load_empty_prompt_embeds(
    root: Path, *, device: torch.device, dtype: torch.dtype, allow_unsafe_pickle: bool = False
) -> torch.Tensor:
    """From `ROOT/empty_prompt_embeds.safetensors` when present, else computed with CLIP once."""
    path = root / EMPTY_PROMPT_EMBEDS
    if path.is_file():
        from safetensors.torch import load_file

        return load_file(str(path))[EMPTY_PROMPT_KEY].to(device=device, dtype=dtype)
    weight_files(root / TEXT_ENCODER, allow_unsafe_pickle=allow_unsafe_pickle)  # refuses pickles
    return compute_empty_prompt_embeds(root, device=device, dtype=dtype)


def save_empty_prompt_embeds(
    root: Path, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> Path:
    """Precompute the empty-prompt embedding into ROOT so actors need not load CLIP.

    The official script runs the text encoder in fp16; pass dtype=torch.float16 on a GPU to
    store exactly the embedding it uses.
    """
    from safetensors.torch import save_file

    embeds = compute_empty_prompt_embeds(root, device=torch.device(device), dtype=dtype)
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
    """Resolve, check and load a model directory; raises ModelDirError listing every problem."""
    from diffusers import AutoencoderKL, EulerAncestralDiscreteScheduler, UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0

    root = resolve_model_dir(model_dir, cache_dir=cache_dir, storage_options=storage_options)
    if not allow_unsafe_pickle:
        needed = [UNET, VAE] + ([REFINER] if load_refiner else [])
        if not (root / EMPTY_PROMPT_EMBEDS).is_file():
            needed.append(TEXT_ENCODER)
        for name in needed:
            if (root / name).is_dir() and _uses_pickle(root / name):
                weight_files(root / name)  # raises UnsafePickleError naming the file
    problems = check_model_dir(root, allow_unsafe_pickle, require_refiner=load_refiner)
    if problems:
        raise ModelDirError(
            f"model directory {model_dir} is not usable:\n  " + "\n  ".join(problems)
        )

    def use_safetensors(folder: Path) -> bool:
        return not _uses_pickle(folder)

    # Without accelerate diffusers cannot use low_cpu_mem_usage (and warns); ask only if present.
    low_cpu_mem_usage = importlib.util.find_spec("accelerate") is not None
    unet = UNet2DConditionModel.from_pretrained(
        root / UNET,
        torch_dtype=dtype,
        use_safetensors=use_safetensors(root / UNET),
        low_cpu_mem_usage=low_cpu_mem_usage,
    )
    vae = AutoencoderKL.from_pretrained(
        root / VAE,
        torch_dtype=dtype,
        use_safetensors=use_safetensors(root / VAE),
        low_cpu_mem_usage=low_cpu_mem_usage,
    )
    for model in (unet, vae):
        # PyTorch SDPA everywhere (the official script used xformers; same maths).
        model.set_attn_processor(AttnProcessor2_0())
        model.to(device).eval().requires_grad_(False)
    scheduler_config = EulerAncestralDiscreteScheduler.load_config(root / SCHEDULER)
    scheduler = EulerAncestralDiscreteScheduler.from_config(scheduler_config)
    refiner = None
    if load_refiner:
        refiner = RefinerUNet.from_pretrained(
            root / REFINER, allow_unsafe_pickle=allow_unsafe_pickle, device=device, dtype=dtype
        )
    embeds = load_empty_prompt_embeds(
        root, device=device, dtype=dtype, allow_unsafe_pickle=allow_unsafe_pickle
    )

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
        configs[REFINER] = public(refiner.config.to_dict())
    return DiffHarmonyComponents(
        root=root,
        unet=unet,
        vae=vae,
        scheduler=scheduler,
        refiner=refiner,
        empty_prompt_embeds=embeds,
        checksums=checksums,
        configs=configs,
    )
