"""The Harmonizer interface that every model implements, and the per-sample seeding.

Enters: a `HarmonizeBatch`, full-resolution composites and masks of any sizes, already on the
model's device.
Leaves: one harmonized image per sample, (3, H_i, W_i) in [0, 1] at the input's own size (or
square `output_resolution` when `output_size == "model"`), background pixels unchanged.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from pipeline.config import ModelConfig
from pipeline.imaging import carry_back, resize


@dataclass
class HarmonizeBatch:
    sample_ids: list[str]
    composites: list[torch.Tensor]  # each (3, H_i, W_i) float32 in [0, 1], on the model's device
    masks: list[torch.Tensor]  # each (1, H_i, W_i) float32 in {0, 1}, same device
    seeds: list[int]  # per-sample seeds from `sample_seed`

    def __len__(self) -> int:
        return len(self.sample_ids)


def sample_seed(run_seed: int, sample_id: str) -> int:
    """A 63-bit seed from (run seed, sample_id): a sample's noise never depends on its batch."""
    digest = hashlib.blake2b(f"{run_seed}:{sample_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def resolve_dtype(requested: str, device: torch.device) -> torch.dtype:
    """auto: fp16 on CUDA (as the official script), fp32 on CPU."""
    if requested == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[requested]


class Harmonizer(ABC):
    """Loaded once per actor; called once per batch."""

    name: ClassVar[str]

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        self.device = resolve_device(config.device)

    @property
    @abstractmethod
    def fingerprint(self) -> str:
        """A short hash of the weights and configuration that produced the output."""

    @abstractmethod
    def harmonize(self, batch: HarmonizeBatch) -> list[torch.Tensor]:
        """One harmonized (3, H, W) image in [0, 1] per sample of the batch."""

    def finish(self, batch: HarmonizeBatch, harmonized_low: torch.Tensor) -> list[torch.Tensor]:
        """From the model's square output (B, 3, h, w) to the images the pipeline writes.

        output_size "input": the change is carried back to each composite's own size, background
        exact. output_size "model": the official square `output_resolution` image.
        """
        if self.config.output_size == "model":
            size = (self.config.output_resolution, self.config.output_resolution)
            return list(resize(harmonized_low.float(), size).clamp(0, 1))
        return [
            carry_back(composite, mask, low.float())
            for composite, mask, low in zip(batch.composites, batch.masks, harmonized_low)
        ]


def fingerprint_of(*parts: bytes | str) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode() if isinstance(part, str) else part)
    return digest.hexdigest()[:16]
