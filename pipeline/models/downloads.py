"""The downloads `harmonize model assemble` takes, read: which folder of which download holds
each component, and which of its files the loader will read.

Enters: the downloads as local paths or fsspec URIs (a Stable Diffusion inpainting folder, the
sd-vae-ft-mse folder, the extracted DiffHarmony release or its folders named one by one) and
storage options.
Leaves: a `Part` per component of the model directory (the source folder, the files taken:
config.json and the weights `choose_weights` picks, since a download may hold fp32, fp16 and
pickled copies side by side), notes on what was seen and not used, or an `AssembleError`
listing every problem (an ambiguity with its candidates).

The release is searched at any depth: the stage-1 UNet is the folder whose config.json says
UNet2DConditionModel with in_channels 9, the refiner the one that says UNet2DCustom,
DiffHarmony++'s Harmony-VAE the one that says ConditionVAE. The release holds the inverse model
beside the forward one (the official "diffharmony-gen" and "cvae-gen"): a folder whose path has
a `gen` word (`diffharmony-gen`, `cvae_gen`) belongs to the inverse model, any other to the
forward model; the UNet and Harmony-VAE are searched among the asked direction's folders.
"""

from __future__ import annotations

import json
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.models.cache import list_tree
from pipeline.models.layout import (
    CONDITION_VAE_CLASS_NAME,
    REFINER,
    SCHEDULER,
    TEXT_ENCODER,
    TOKENIZER,
    UNET,
    UNET_IN_CHANNELS,
    VAE,
    ModelDirError,
)
from pipeline.models.refiner import OFFICIAL_CLASS_NAME
from pipeline.models.weights import (
    DIFFUSERS,
    TRANSFORMERS,
    WeightsChoice,
    choose_weights,
    shard_names,
)
from pipeline.storage import filesystem, join

STAGE1_CLASS_NAME = "UNet2DConditionModel"
# A path word that marks the inverse model's folders (the release's diffharmony-gen, cvae-gen).
_INVERSE_WORD = re.compile(r"(^|[-_])gen($|[-_])", re.IGNORECASE)


class AssembleError(ValueError):
    """The downloads cannot be assembled as given; the message lists every reason."""


@dataclass(frozen=True)
class Part:
    """One folder of the model directory and the download folder it comes from."""

    name: str  # tokenizer, text_encoder, scheduler, vae, unet, refiner
    source: str  # URI of the source folder
    files: tuple[str, ...]  # what is taken from it
    weights: WeightsChoice | None = None

    @property
    def converts(self) -> bool:
        return self.weights is not None and not self.weights.safetensors


class Download:
    """A download as fsspec sees it: its files by path relative to its root."""

    def __init__(self, uri: str, storage_options: dict[str, Any], what: str) -> None:
        self.uri = uri.rstrip("/")
        self.fs, self.root = filesystem(self.uri, storage_options)
        try:
            self.files = list_tree(self.fs, self.root)
        except Exception as error:
            raise AssembleError(f"{what} {uri}: cannot list it ({error})") from error
        if not self.files:
            raise AssembleError(f"{what} {uri}: no files there")

    def path(self, rel: str) -> str:
        return join(self.root, rel) if rel else self.root

    def uri_of(self, rel: str) -> str:
        return join(self.uri, rel) if rel else self.uri

    def names_in(self, folder: str) -> set[str]:
        prefix = f"{folder}/" if folder else ""
        return {
            rel[len(prefix) :]
            for rel in self.files
            if rel.startswith(prefix) and "/" not in rel[len(prefix) :]
        }

    def read_json(self, rel: str) -> Any:
        try:
            return json.loads(self.fs.cat_file(self.path(rel)))
        except (OSError, ValueError) as error:
            raise AssembleError(f"{self.uri_of(rel)}: unreadable ({error})") from error

    def get(self, rel: str, local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        self.fs.get_file(self.path(rel), str(local))


def weights_part(
    tree: Download, folder: str, name: str, library: str, allow_unsafe_pickle: bool
) -> Part:
    """config.json and the weights the loader would pick, of one component folder."""
    names = tree.names_in(folder)
    where = tree.uri_of(folder)
    if "config.json" not in names:
        raise AssembleError(f"{where}: no config.json (expected the {name} folder)")
    try:
        choice = choose_weights(names, library, where, allow_unsafe_pickle=allow_unsafe_pickle)
    except ModelDirError as error:
        raise AssembleError(str(error)) from error
    files = [choice.entry]
    if choice.sharded:
        index = tree.read_json(posixpath.join(folder, choice.entry))
        try:
            files += shard_names(json.dumps(index))
        except (KeyError, TypeError, AttributeError) as error:
            raise AssembleError(f"{where}/{choice.entry}: not a shard index ({error})") from error
    return Part(name, where, ("config.json", *files), choice)


def inpainting_parts(tree: Download, allow_unsafe_pickle: bool) -> list[Part]:
    tokenizer = sorted(tree.names_in(TOKENIZER))
    if not tokenizer:
        raise AssembleError(
            f"--inpainting {tree.uri}: no {TOKENIZER}/ (expected a Stable Diffusion inpainting "
            "folder: tokenizer/, text_encoder/, scheduler/)"
        )
    if "scheduler_config.json" not in tree.names_in(SCHEDULER):
        raise AssembleError(f"--inpainting {tree.uri}: no {SCHEDULER}/scheduler_config.json")
    return [
        Part(TOKENIZER, tree.uri_of(TOKENIZER), tuple(tokenizer)),
        weights_part(tree, TEXT_ENCODER, TEXT_ENCODER, TRANSFORMERS, allow_unsafe_pickle),
        Part(SCHEDULER, tree.uri_of(SCHEDULER), ("scheduler_config.json",)),
    ]


@dataclass(frozen=True)
class _Config:
    folder: str  # relative to the release's root
    class_name: Any
    in_channels: Any

    def describe(self) -> str:
        return f"{self.folder or '.'} ({self.class_name}, in_channels {self.in_channels})"


def _survey(tree: Download) -> list[_Config]:
    """Every model folder of the release: those with a readable config.json."""
    found = []
    for rel in sorted(tree.files):
        if posixpath.basename(rel) != "config.json":
            continue
        try:
            config = tree.read_json(rel)
        except AssembleError:  # not a model folder's config; the search goes on
            continue
        if isinstance(config, dict):
            found.append(
                _Config(
                    posixpath.dirname(rel), config.get("_class_name"), config.get("in_channels")
                )
            )
    return found


def _pick(configs: list[_Config], wanted: str, what: str, option: str, uri: str) -> _Config:
    """The one folder that is `what`, or an error listing the candidates."""
    if len(configs) == 1:
        return configs[0]
    if not configs:
        raise AssembleError(
            f"--diffharmony {uri}: no {what} ({wanted}); name its folder with {option}"
        )
    candidates = ", ".join(c.describe() for c in configs)
    raise AssembleError(
        f"--diffharmony {uri}: {len(configs)} candidates for the {what} ({wanted}): {candidates}; "
        f"choose one with {option} URI"
    )


def is_inverse_folder(folder: str) -> bool:
    """Whether a release folder belongs to the inverse model: a `gen` word in its path."""
    return any(_INVERSE_WORD.search(part) for part in folder.split("/"))


def release_parts(
    release: Download | None,
    unet: Download | None,
    refiner: Download | None,
    harmony_vae: Download | None = None,
    *,
    direction: str = "forward",
    plain_vae: bool = False,
    allow_unsafe_pickle: bool,
) -> tuple[list[Part], list[str]]:
    """The stage-1 UNet, the refiner and the Harmony-VAE: named, or found in the release (the
    UNet and Harmony-VAE of `direction`'s model); plus notes. No Harmony-VAE part when the
    release has none (or `plain_vae`): vae/ then comes from --vae."""
    notes: list[str] = []
    configs = _survey(release) if release is not None else []
    inverse = direction == "inverse"
    own = [c for c in configs if is_inverse_folder(c.folder) == inverse]
    model = "inverse model's (a 'gen' folder)" if inverse else "forward model's"
    parts: list[Part] = []
    problems: list[str] = []
    harmony_vaes = [c for c in own if c.class_name == CONDITION_VAE_CLASS_NAME]
    searches = [
        (
            UNET,
            unet,
            "--unet",
            f"{model} stage-1 UNet",
            f"a config.json saying {STAGE1_CLASS_NAME} with in_channels {UNET_IN_CHANNELS}",
            [
                c
                for c in own
                if c.class_name == STAGE1_CLASS_NAME and c.in_channels == UNET_IN_CHANNELS
            ],
        ),
        (
            REFINER,
            refiner,
            "--refiner",
            "refiner",
            f"a config.json saying {OFFICIAL_CLASS_NAME}",
            [c for c in configs if c.class_name == OFFICIAL_CLASS_NAME],
        ),
    ]
    if plain_vae:
        for config in harmony_vaes:
            notes.append(
                f"{release.uri_of(config.folder) if release else config.folder}: a "
                f"{CONDITION_VAE_CLASS_NAME} (DiffHarmony++ Harmony-VAE), not used: "
                "--plain-vae decodes with --vae's AutoencoderKL"
            )
    elif harmony_vae is not None or harmony_vaes:
        searches.append(
            (
                VAE,
                harmony_vae,
                "--harmony-vae",
                f"{model} Harmony-VAE",
                f"a config.json saying {CONDITION_VAE_CLASS_NAME}",
                harmony_vaes,
            )
        )
    for name, named, option, what, wanted, candidates in searches:
        try:
            if named is not None:
                parts.append(weights_part(named, "", name, DIFFUSERS, allow_unsafe_pickle))
            elif release is None:
                problems.append(f"no --diffharmony: name the {what} with {option}")
            else:
                found = _pick(candidates, wanted, what, option, release.uri)
                parts.append(
                    weights_part(release, found.folder, name, DIFFUSERS, allow_unsafe_pickle)
                )
        except AssembleError as error:
            problems.append(str(error))
    if problems:
        raise AssembleError("\n".join(problems))
    return parts, notes


def require_class(part: Part, class_name: str, option: str, options: dict[str, Any]) -> None:
    """A named folder must hold the class its option asks for."""
    fs, root = filesystem(part.source, options)
    try:
        found = json.loads(fs.cat_file(join(root, "config.json"))).get("_class_name")
    except (OSError, ValueError, AttributeError) as error:
        raise AssembleError(f"{part.source}/config.json: unreadable ({error})") from error
    if found != class_name:
        raise AssembleError(
            f"{option} {part.source}: config.json says {found!r}, expected {class_name!r}"
        )
