"""Classical baseline: Reinhard colour transfer in Lab, foreground matched to background.

Enters: a `HarmonizeBatch` (full-resolution composites and masks on the device).
Leaves: harmonized images at each input's size; only pixels inside the mask change.

Statistics are computed in one batched pass at the square working resolution (means and
standard deviations barely depend on resolution); the per-channel affine map they define is
then applied to each full-resolution image, so no detail is lost to resizing.
"""

from __future__ import annotations

import torch

from pipeline.imaging import lab_to_rgb, masked_mean_std, resize, resize_each, rgb_to_lab
from pipeline.models.base import HarmonizeBatch, Harmonizer, fingerprint_of


class ReinhardHarmonizer(Harmonizer):
    name = "reinhard"

    @property
    def fingerprint(self) -> str:
        return fingerprint_of("reinhard-lab-v1", str(self.config.resolution))

    def harmonize(self, batch: HarmonizeBatch) -> list[torch.Tensor]:
        size = self.config.resolution
        composite_sq = resize_each(batch.composites, size)  # (B, 3, R, R)
        mask_sq = (resize_each(batch.masks, size, mode="nearest") > 0.5).float()  # (B, 1, R, R)
        lab_sq = rgb_to_lab(composite_sq)
        fg_mean, fg_std = masked_mean_std(lab_sq, mask_sq)  # (B, 3, 1, 1) each
        bg_mean, bg_std = masked_mean_std(lab_sq, 1.0 - mask_sq)
        scale = bg_std / fg_std
        shift = bg_mean - fg_mean * scale

        harmonized = []
        for i, (composite, mask) in enumerate(zip(batch.composites, batch.masks)):
            lab = rgb_to_lab(composite[None])  # (1, 3, H, W)
            matched = lab_to_rgb(lab * scale[i : i + 1] + shift[i : i + 1])[0]
            harmonized.append(torch.where(mask > 0.5, matched, composite))
        if self.config.output_size == "model":
            side = self.config.output_resolution
            return [resize(image[None], (side, side))[0].clamp(0, 1) for image in harmonized]
        return harmonized


class IdentityHarmonizer(Harmonizer):
    """Returns the composite unchanged: measures the I/O path without any model."""

    name = "identity"

    @property
    def fingerprint(self) -> str:
        return fingerprint_of("identity-v1")

    def harmonize(self, batch: HarmonizeBatch) -> list[torch.Tensor]:
        if self.config.output_size == "model":
            side = self.config.output_resolution
            return [resize(c[None], (side, side))[0] for c in batch.composites]
        return [composite.clone() for composite in batch.composites]
