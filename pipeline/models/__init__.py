"""Harmonizer implementations, chosen by name (`--model`)."""

from __future__ import annotations

from typing import Any

from pipeline.config import ModelConfig
from pipeline.models.base import HarmonizeBatch, Harmonizer, sample_seed

__all__ = ["HarmonizeBatch", "Harmonizer", "load_harmonizer", "sample_seed"]


def load_harmonizer(
    config: ModelConfig, storage_options: dict[str, Any] | None = None
) -> Harmonizer:
    """Build the harmonizer named by `config.name`; heavy imports happen only when needed.

    `storage_options` reach the model directory's filesystem (diffharmony on s3:// etc.).
    """
    if config.name == "reinhard":
        from pipeline.models.reinhard import ReinhardHarmonizer

        return ReinhardHarmonizer(config)
    if config.name == "identity":
        from pipeline.models.reinhard import IdentityHarmonizer

        return IdentityHarmonizer(config)
    if config.name == "diffharmony":
        from pipeline.models.diffharmony import DiffHarmonyHarmonizer

        return DiffHarmonyHarmonizer(config, storage_options)
    raise ValueError(f"unknown model {config.name!r}: choose reinhard, diffharmony or identity")
