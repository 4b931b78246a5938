"""Harmonizer implementations, chosen by name (`--model`)."""

from __future__ import annotations

from pipeline.config import ModelConfig
from pipeline.models.base import HarmonizeBatch, Harmonizer, sample_seed

__all__ = ["HarmonizeBatch", "Harmonizer", "load_harmonizer", "sample_seed"]


def load_harmonizer(config: ModelConfig) -> Harmonizer:
    """Build the harmonizer named by `config.name`; heavy imports happen only when needed."""
    if config.name == "reinhard":
        from pipeline.models.reinhard import ReinhardHarmonizer

        return ReinhardHarmonizer(config)
    if config.name == "identity":
        from pipeline.models.reinhard import IdentityHarmonizer

        return IdentityHarmonizer(config)
    if config.name == "diffharmony":
        from pipeline.models.diffharmony import DiffHarmonyHarmonizer

        return DiffHarmonyHarmonizer(config)
    raise ValueError(f"unknown model {config.name!r}: choose reinhard, diffharmony or identity")
