"""The harmonizers, by the name `--model` gives them (`pipeline.config.MODELS` lists them).

Enters: a `ModelConfig` (its `name`), and storage options for a model directory on object
storage.
Leaves: `load_harmonizer`, the harmonizer ready to run, and `harmonizer_class`. Importing this
package imports no model code: each model's module (and torch, diffusers) loads only when
asked for.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from pipeline.config import MODELS, ModelConfig

if TYPE_CHECKING:  # importing it at run time would import torch with the package
    from pipeline.models.base import Harmonizer


def harmonizer_class(name: str) -> type[Harmonizer]:
    """The class of the model `name` (its module imported now)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: choose {', '.join(MODELS)}")
    module, _, attribute = MODELS[name].location.partition(":")
    return getattr(importlib.import_module(module), attribute)


def load_harmonizer(
    config: ModelConfig, storage_options: dict[str, Any] | None = None
) -> Harmonizer:
    """The harmonizer named by `config.name`, loaded (`Harmonizer.load`): `storage_options`
    reach a model directory on object storage (diffharmony on s3:// etc.)."""
    return harmonizer_class(config.name).load(config, storage_options)
