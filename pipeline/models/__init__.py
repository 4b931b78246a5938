"""The harmonizers by the name `--model` gives them: the one place model names are listed.

Enters: a `ModelConfig` (its `name`), and storage options for a model directory on object
storage.
Leaves: `MODELS` (name -> where its class lives, and what it is, for the CLI's help and the
config's check) and `load_harmonizer`, the harmonizer ready to run. Importing this package
imports no model code: each model's module (and torch, diffusers) loads only when asked for.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from pipeline.config import ModelConfig
    from pipeline.models.base import Harmonizer


class ModelEntry(NamedTuple):
    location: str  # "module:Class"
    description: str
    needs_model_dir: bool = False  # weights read from `--model-dir`


MODELS: dict[str, ModelEntry] = {
    "reinhard": ModelEntry("pipeline.models.reinhard:ReinhardHarmonizer", "classical baseline"),
    "diffharmony": ModelEntry(
        "pipeline.models.diffharmony:DiffHarmonyHarmonizer", "two-stage diffusion model", True
    ),
    "identity": ModelEntry(
        "pipeline.models.reinhard:IdentityHarmonizer", "no change; I/O benchmark"
    ),
}
MODEL_NAMES = tuple(MODELS)


def harmonizer_class(name: str) -> type[Harmonizer]:
    """The class of the model `name` (its module imported now)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: choose {', '.join(MODEL_NAMES)}")
    module, _, attribute = MODELS[name].location.partition(":")
    return getattr(importlib.import_module(module), attribute)


def load_harmonizer(
    config: ModelConfig, storage_options: dict[str, Any] | None = None
) -> Harmonizer:
    """The harmonizer named by `config.name`, loaded (`Harmonizer.load`): `storage_options`
    reach a model directory on object storage (diffharmony on s3:// etc.)."""
    return harmonizer_class(config.name).load(config, storage_options)
