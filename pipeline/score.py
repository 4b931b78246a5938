"""Per-sample quality metrics, batched in torch on the model's device.

Enters: harmonized, composite and (optional) real images as lists of (3, H, W) tensors in
[0, 1] and their (1, H, W) binary masks.
Leaves: a dict of metric name -> (B,) float64 tensor; NaN where a metric does not apply.

Ground-truth metrics follow the official iHarmony4 evaluation: images resized to 256x256,
values on the uint8 scale [0, 255]:
  mse  = mean over pixels and channels of (out - real)^2
  psnr = 10 log10(255^2 / mse)
  fmse = sum(mask * (out - real)^2) / (channels * sum(mask))   (foreground MSE)
  bmse = the same over (1 - mask)                               (background MSE)
"""

from __future__ import annotations

import torch

from pipeline.imaging import resize_each

EVAL_SIZE = 256


def to_eval_scale(images: list[torch.Tensor]) -> torch.Tensor:
    """Images of any sizes -> (B, 3, 256, 256) float64 holding uint8 values."""
    batch = resize_each([image.float() for image in images], EVAL_SIZE)
    return (batch.clamp(0, 1) * 255.0).round().double()


def masks_to_eval_scale(masks: list[torch.Tensor]) -> torch.Tensor:
    """Masks of any sizes -> (B, 1, 256, 256) float64 in {0, 1} (nearest)."""
    return (resize_each([mask.float() for mask in masks], EVAL_SIZE, mode="nearest") > 0.5).double()


def mse(output: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    return ((output - real) ** 2).mean(dim=(1, 2, 3))


def psnr(output: torch.Tensor, real: torch.Tensor, data_range: float = 255.0) -> torch.Tensor:
    return 10.0 * torch.log10(data_range**2 / mse(output, real))


def region_mse(output: torch.Tensor, real: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """MSE restricted to `region` (B, 1, H, W); NaN where the region is empty."""
    squared = ((output - real) ** 2 * region).sum(dim=(1, 2, 3))
    count = region.sum(dim=(1, 2, 3)) * output.shape[1]
    return squared / count.where(count > 0, torch.full_like(count, float("nan")))


def ground_truth_metrics(
    harmonized: list[torch.Tensor],
    composite: list[torch.Tensor],
    real: list[torch.Tensor],
    mask: list[torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Official-convention metrics of the output, and of the composite as the baseline."""
    output_eval = to_eval_scale(harmonized)
    composite_eval = to_eval_scale(composite)
    real_eval = to_eval_scale(real)
    mask_eval = masks_to_eval_scale(mask)
    return {
        "mse": mse(output_eval, real_eval),
        "psnr": psnr(output_eval, real_eval),
        "fmse": region_mse(output_eval, real_eval, mask_eval),
        "bmse": region_mse(output_eval, real_eval, 1.0 - mask_eval),
        "composite_mse": mse(composite_eval, real_eval),
        "composite_psnr": psnr(composite_eval, real_eval),
        "composite_fmse": region_mse(composite_eval, real_eval, mask_eval),
    }
