"""Weight files of a component folder: which file a library is asked to read, and whether it can.

Enters: the file names of one component folder (tokenizer/, vae/, unet/, ...) and the library
that loads it (diffusers or transformers).
Leaves: a `WeightsChoice` (the single file or shard index, safetensors or pickle, the variant),
the shard files an index names, and the problems of a choice's files (a missing shard, a
truncated safetensors file), one `ModelDirError` each.

Safetensors before pickles, the plain file before variants (`*.fp16.safetensors`); pickled
`.bin` files are refused (`UnsafePickleError`) unless the caller allows them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from pipeline.models.layout import ModelDirError, UnsafePickleError, describe_error

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


def unreadable_weights(folder: Path, label: str, choice: WeightsChoice) -> list[ModelDirError]:
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
