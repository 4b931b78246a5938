"""`harmonize model assemble`: the DiffHarmony model directory, built from what users download.

Enters: three downloads, as local paths or fsspec URIs (s3://, gs://, file://, ...):
- `inpainting`: a Stable Diffusion inpainting folder; its tokenizer/, text_encoder/ and
  scheduler/ are taken (its own unet/ and vae/ are not);
- `vae`: the sd-vae-ft-mse folder (config.json + weights), when the Harmony-VAE is not taken;
- `diffharmony`: the extracted DiffHarmony release, searched at any depth for the stage-1 UNet,
  the refiner and DiffHarmony++'s Harmony-VAE (`unet` / `refiner` / `harmony_vae` name a
  folder instead, when the release holds several; `downloads.py` says how they are
  recognised). `direction="inverse"` takes the inverse model's UNet and Harmony-VAE (the
  release's diffharmony-gen, cvae-gen) instead of the forward model's. The Harmony-VAE goes in
  vae/ when the release has one, unless `plain_vae` asks for `vae`;
and `out`, where the model directory goes (absent or empty).
Leaves: at `out`, the layout `pipeline.models.components` loads, with safetensors only (pickles
converted tensor for tensor, only when allowed), `empty_prompt_embeds.safetensors`, and
MODEL_CARD.md (sources, sha256 of every file, licence note), judged by `check_model_dir` before
it is published; an `AssembleReport` saying what was taken from where. Any problem raises
`AssembleError` listing them all (an ambiguity with its candidates), and nothing is published.

Only the files the loader will read are copied (`downloads.py` picks them).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem

from pipeline.models.cache import file_checksums, list_tree
from pipeline.models.check import check_model_dir
from pipeline.models.components import save_empty_prompt_embeds
from pipeline.models.downloads import (
    AssembleError,
    Download,
    Part,
    inpainting_parts,
    release_parts,
    require_class,
    weights_part,
)
from pipeline.models.layout import (
    CONDITION_VAE_CLASS_NAME,
    EMPTY_PROMPT_EMBEDS,
    REFINER,
    SCHEDULER,
    TEXT_ENCODER,
    TOKENIZER,
    UNET,
    VAE,
    describe_error,
)
from pipeline.models.weights import (
    DIFFUSERS,
    TRANSFORMERS,
    library_weight_names,
    shard_names,
    with_variant,
)
from pipeline.storage import filesystem, join

MODEL_CARD = "MODEL_CARD.md"
LICENCE_NOTE = (
    "The DiffHarmony weights are published by their authors (Zhou, Feng, Wang: DiffHarmony: "
    "Latent Diffusion Model Meets Image Harmonization, ICMR 2024; github.com/nicecv/DiffHarmony). "
    "The official repository carries no licence file: the weights come under their authors' "
    "terms, and whoever uses this folder is responsible for respecting them. Stable Diffusion "
    "inpainting (CreativeML OpenRAIL-M) and sd-vae-ft-mse come under their own licences."
)


EMBEDS_SOURCE = "the empty prompt's CLIP embedding, from tokenizer/ + text_encoder/ on CPU in fp32"


@dataclass
class AssembleReport:
    """What `assemble` took from where, and what it wrote."""

    out: str
    parts: list[Part]
    written: dict[str, list[str]]  # folder -> the files written into it
    notes: list[str] = field(default_factory=list)
    checksums: dict[str, str] = field(default_factory=dict)  # relative path -> sha256
    direction: str = "forward"  # whose UNet (and Harmony-VAE): the forward or inverse model's
    harmony_vae: bool = False  # vae/ holds the release's Harmony-VAE

    def lines(self) -> list[str]:
        lines = []
        for part in self.parts:
            taken = ", ".join(part.files)
            if part.converts:
                taken += " -> " + ", ".join(self.written[part.name]) + " (converted)"
            lines.append(f"{part.name + '/':<14} <- {part.source}: {taken}")
        lines.append(f"{EMPTY_PROMPT_EMBEDS}: {EMBEDS_SOURCE}")
        lines += [f"note: {note}" for note in self.notes]
        return lines


def _for_safetensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors as safetensors stores them: each contiguous in a storage of its own.

    Pickles may hold views (transformers 4.x stored CLIP's `position_ids` as an expanded arange)
    and tensors sharing one storage, which safetensors refuses; those are copied.
    """
    seen: set[int] = set()
    result = {}
    for key, tensor in tensors.items():
        storage = tensor.untyped_storage()
        whole = (
            tensor.is_contiguous()
            and tensor.storage_offset() == 0
            and storage.nbytes() == tensor.numel() * tensor.element_size()
        )
        result[key] = tensor if whole and storage.data_ptr() not in seen else tensor.clone()
        seen.add(storage.data_ptr())
    return result


def _convert_pickles(tree_fs: Any, part: Part, source_root: str, folder: Path) -> list[str]:
    """A pickled component's weights as safetensors under the library's names, tensor for
    tensor, read with torch.load(weights_only=True); returns the files written."""
    from safetensors.torch import save_file

    assert part.weights is not None
    library = TRANSFORMERS if part.name == TEXT_ENCODER else DIFFUSERS
    safe, safe_index, _, _ = library_weight_names(library)
    variant = part.weights.variant
    pickles = folder / ".pickles"

    def convert(name: str, target: str) -> None:
        local = pickles / name
        local.parent.mkdir(parents=True, exist_ok=True)
        tree_fs.get_file(join(source_root, name), str(local))
        try:
            tensors = torch.load(local, map_location="cpu", weights_only=True)
        except Exception as error:
            raise AssembleError(
                f"{part.source}/{name}: cannot read the pickle ({describe_error(error)})"
            ) from error
        save_file(_for_safetensors(tensors), str(folder / target), metadata={"format": "pt"})
        local.unlink()

    try:
        if not part.weights.sharded:
            target = with_variant(safe, variant)
            convert(part.weights.entry, target)
            return [target]
        index = json.loads(tree_fs.cat_file(join(source_root, part.weights.entry)))
        renamed = {
            shard: shard.removesuffix(".bin") + ".safetensors"
            for shard in shard_names(json.dumps(index))
        }
        for shard, target in renamed.items():
            convert(shard, target)
        index["weight_map"] = {key: renamed[shard] for key, shard in index["weight_map"].items()}
        index_name = with_variant(safe_index, variant)
        (folder / index_name).write_text(json.dumps(index, indent=2))
        return [index_name, *renamed.values()]
    finally:
        shutil.rmtree(pickles, ignore_errors=True)


def _model_card(report: AssembleReport) -> str:
    rows = "\n".join(
        f"| `{part.name}/` | `{part.source}` | "
        + ", ".join(f"`{f}`" for f in part.files)
        + (
            " (pickles, converted to "
            + ", ".join(f"`{f}`" for f in report.written[part.name])
            + ")"
            if part.converts
            else ""
        )
        + " |"
        for part in report.parts
    )
    files = "\n".join(
        f"| `{rel}` | `{digest}` |" for rel, digest in sorted(report.checksums.items())
    )
    notes = "".join(f"- {note}\n" for note in report.notes)
    inverse = report.direction == "inverse"
    run_with = "harmonize run --model diffharmony --model-dir" + (
        " --direction inverse" if inverse else ""
    )
    unet_text = "inverse model's (diffharmony-gen)" if inverse else "DiffHarmony"
    vae_text = (
        "DiffHarmony++'s Harmony-VAE (`vae/`, a ConditionVAE)"
        if report.harmony_vae
        else "the `sd-vae-ft-mse` VAE"
    )
    return f"""# DiffHarmony model directory

Assembled by `harmonize model assemble` for `{run_with}`.
Stage 1: the {unet_text} UNet (`unet/`, 9 input channels) with the Stable Diffusion
inpainting tokenizer, text encoder and scheduler config and {vae_text}; stage 2: the
refinement UNet (`refiner/`, used by forward runs only). Layout and use: docs/models.md of the
harmonize pipeline.

## Sources

| folder | taken from | files |
| --- | --- | --- |
{rows}
| `{EMPTY_PROMPT_EMBEDS}` | computed | {EMBEDS_SOURCE} |

{notes}
## Files

| file | sha256 |
| --- | --- |
{files}

## Licence

{LICENCE_NOTE}
"""


def _check_out_is_free(out: str, storage_options: dict[str, Any]) -> tuple[Any, str]:
    fs, path = filesystem(out, storage_options)
    if fs.exists(path) and (not fs.isdir(path) or list_tree(fs, path)):
        raise AssembleError(f"--out {out}: already holds files; give an empty or new location")
    return fs, path


def assemble(
    *,
    inpainting: str,
    vae: str | None,
    out: str,
    diffharmony: str | None = None,
    unet: str | None = None,
    refiner: str | None = None,
    harmony_vae: str | None = None,
    direction: str = "forward",
    plain_vae: bool = False,
    allow_unsafe_pickle: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> AssembleReport:
    """Build the model directory at `out` from the downloads; see the module docstring."""
    options = storage_options or {}
    if direction not in ("forward", "inverse"):
        raise AssembleError(f"direction must be 'forward' or 'inverse', not {direction!r}")
    if plain_vae and harmony_vae:
        raise AssembleError("--plain-vae and --harmony-vae exclude each other")
    out_fs, out_path = _check_out_is_free(out, options)
    problems: list[str] = []
    parts: list[Part] = []
    notes: list[str] = []

    def gather(step: Callable[[], None]) -> None:
        try:
            step()
        except AssembleError as error:
            problems.append(str(error))

    def text_side() -> None:
        parts.extend(
            inpainting_parts(Download(inpainting, options, "--inpainting"), allow_unsafe_pickle)
        )

    def vae_part() -> None:
        if any(part.name == VAE for part in parts):  # the release's Harmony-VAE
            if vae:
                notes.append(f"--vae {vae}: not used, the Harmony-VAE decodes (--plain-vae)")
            return
        if not vae and problems:  # the release's problems come first; it may hold one
            return
        if not vae:
            raise AssembleError(
                "--vae: the sd-vae-ft-mse folder is needed (the release holds no Harmony-VAE "
                "for this model, or --plain-vae asks for it)"
            )
        tree = Download(vae, options, "--vae")
        config = tree.read_json("config.json") if "config.json" in tree.files else {}
        if not isinstance(config, dict) or config.get("_class_name") != "AutoencoderKL":
            raise AssembleError(
                f"--vae {vae}: config.json says {config.get('_class_name')!r}, expected "
                "'AutoencoderKL' (the sd-vae-ft-mse folder)"
            )
        parts.append(weights_part(tree, "", VAE, DIFFUSERS, allow_unsafe_pickle))

    def diffharmony_parts() -> None:
        trees = [
            Download(uri, options, option) if uri else None
            for uri, option in (
                (diffharmony, "--diffharmony"),
                (unet, "--unet"),
                (refiner, "--refiner"),
                (harmony_vae, "--harmony-vae"),
            )
        ]
        found, found_notes = release_parts(
            *trees,
            direction=direction,
            plain_vae=plain_vae,
            allow_unsafe_pickle=allow_unsafe_pickle,
        )
        for part in found:
            if part.name == VAE:
                require_class(part, CONDITION_VAE_CLASS_NAME, "--harmony-vae", options)
        parts.extend(found)
        notes.extend(found_notes)

    # The release first: whether it holds a Harmony-VAE decides whether --vae is needed.
    for step in (text_side, diffharmony_parts, vae_part):
        gather(step)
    if problems:
        raise AssembleError("\n".join(problems))
    order = [TOKENIZER, TEXT_ENCODER, SCHEDULER, VAE, UNET, REFINER]
    parts.sort(key=lambda part: order.index(part.name))

    local_out = isinstance(out_fs, LocalFileSystem)
    if local_out:
        target = Path(out_path)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.parent / f".{target.name}.assemble-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
    else:
        staging = Path(tempfile.mkdtemp(prefix="harmonize-assemble-"))
    try:
        report = _stage(parts, notes, staging, out, options, allow_unsafe_pickle, direction)
        if local_out:
            if target.is_dir():
                target.rmdir()  # empty, as checked above
            os.rename(staging, target)
        else:
            _upload(staging, out_fs, out_path, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report


def _stage(
    parts: list[Part],
    notes: list[str],
    staging: Path,
    out: str,
    options: dict[str, Any],
    allow_unsafe_pickle: bool,
    direction: str,
) -> AssembleReport:
    """Copy and convert into `staging`, precompute the prompt, check, write the model card."""
    written: dict[str, list[str]] = {}
    for part in parts:
        fs, root = filesystem(part.source, options)
        folder = staging / part.name
        folder.mkdir()
        try:
            if part.converts:
                fs.get_file(join(root, "config.json"), str(folder / "config.json"))
                written[part.name] = _convert_pickles(fs, part, root, folder)
                continue
            for name in part.files:
                fs.get_file(join(root, name), str(folder / name))
        except OSError as error:
            raise AssembleError(f"{part.source}: cannot copy ({describe_error(error)})") from error
        written[part.name] = list(part.files)
    save_empty_prompt_embeds(staging)
    problems = check_model_dir(staging)
    if problems:
        raise AssembleError(
            "the assembled folder fails the check, nothing was written to "
            f"{out}:\n  " + "\n  ".join(problems)
        )
    report = AssembleReport(
        out=out, parts=parts, written=written, notes=notes, checksums=file_checksums(staging),
        direction=direction, harmony_vae=_is_harmony_vae(staging / VAE),
    )  # fmt: skip
    (staging / MODEL_CARD).write_text(_model_card(report))
    return report


def _is_harmony_vae(folder: Path) -> bool:
    config = json.loads((folder / "config.json").read_text())
    return config.get("_class_name") == CONDITION_VAE_CLASS_NAME


def _upload(staging: Path, fs: Any, out_path: str, out: str) -> None:
    """Every file to the remote location, the model card last (a folder without it is an
    interrupted upload), then the remote listing compared with what was sent."""
    files = sorted(
        (p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file()),
        key=lambda rel: (rel == MODEL_CARD, rel),
    )
    for rel in files:
        fs.put_file(str(staging / rel), join(out_path, rel))
    sent = {rel: (staging / rel).stat().st_size for rel in files}
    fs.invalidate_cache()
    if list_tree(fs, out_path) != sent:
        raise AssembleError(f"--out {out}: the uploaded files do not match what was written")
