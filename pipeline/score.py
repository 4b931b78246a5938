"""Per-sample quality metrics, batched in torch on the model's device.

Enters: harmonized, composite and (optional) real images as lists of (3, H, W) tensors in
[0, 1] and their (1, H, W) binary masks.
Leaves: a dict of metric name -> (B,) float64 tensor; NaN where a metric does not apply
(`score_batch` returns every column of `schemas.results.METRIC_COLUMNS`).

What each metric is (its formula, range, which way is better, whether it needs the ground
truth) is defined once, in its column of the results schema (`schemas/results.py`; `harmonize
schema` and the README print it). Here is how they are computed:
- Images are put on the uint8 scale [0, 255] first, rounded as the written file holds them.
- Ground-truth metrics follow the official iHarmony4 evaluation: output, composite, real and
  mask resized to 256x256 by PIL exactly as the official script and `harmonize evaluate` resize
  them (bilinear; the mask 1-bit, nearest at pixel centres), so a row's metrics are its line of
  the table; `mse_full` / `psnr_full` skip that resize.
- Reference-free metrics are computed at the output's own size (composite and mask resized to
  it when `--output-size model` made them differ), except the Lab gaps and the foreground
  changes, which use the same 256 px images as the ground-truth metrics. SSIM is scikit-image's
  Gaussian SSIM (`ssim_map`, tested against it); CIEDE2000 is `imaging.delta_e_2000`.
- `unharmony_prob` is the harmony classifier's (`models/classifier.py`, with `--classifier`)
  on the same 256 px output.
- Inverse runs (the input is the real image, the output a generated composite): the input is
  the ground truth, so every ground-truth metric compares the output with the real, and the
  composite_* baseline (input against the real) is NaN.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch

from pipeline.imaging import delta_e_2000, eval_resize, eval_resize_mask, resize, rgb_to_lab
from schemas.results import GROUND_TRUTH_METRICS

if TYPE_CHECKING:
    from pipeline.models.classifier import HarmonyClassifier

# An identical background has infinite PSNR; capping it keeps means and histograms finite.
# 100 dB is an MSE of 6.5e-6 (uint8 scale): about one grey level in one channel of one pixel
# of a 256x256 background (101 dB). Below 100 dB, the background was changed.
BG_PSNR_CAP = 100.0
# scikit-image's Gaussian SSIM: sigma 1.5, truncated at 3.5 sigma (an 11x11 window).
SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
# The input's own metrics against the ground truth (the unharmonized baseline). In inverse runs
# the input is the ground truth: they do not apply (NaN, stored as null).
BASELINE_METRICS = ("composite_mse", "composite_psnr", "composite_fmse")
# ITU-R BT.601 luma, as PIL's "L" conversion.
_LUMA = (0.299, 0.587, 0.114)


def quantize(image: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """[0, 1] images -> `dtype` on the uint8 scale, rounded as the written file holds them.

    The arithmetic is done in the image's own dtype, as `HarmonizeActor` does before writing,
    so that values on a rounding boundary land on the same grey level as in the file."""
    return (image.clamp(0, 1) * 255.0).round().to(dtype)


def to_eval_scale(images: list[torch.Tensor]) -> torch.Tensor:
    """Images of any sizes -> (B, 3, 256, 256) float64 holding uint8 values, on their device.

    Resized on the host by PIL (`imaging.eval_resize`): a few small copies per image, and the
    same pixels as the official evaluation's, to the last grey level."""
    arrays = [
        eval_resize(quantize(image, torch.uint8).permute(1, 2, 0).cpu().numpy()) for image in images
    ]
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return batch.to(images[0].device, torch.float64)


def masks_to_eval_scale(masks: list[torch.Tensor]) -> torch.Tensor:
    """Masks of any sizes -> (B, 1, 256, 256) float64 in {0, 1}: 1-bit, nearest (PIL)."""
    arrays = [eval_resize_mask((mask[0] > 0.5).cpu().numpy()) for mask in masks]
    return torch.from_numpy(np.stack(arrays))[:, None].to(masks[0].device, torch.float64)


# Full-resolution images are compared in float32 (uint8 values and their squared differences
# are exact in it, at half the cost of float64) and summed in float64 (sums of millions of
# terms are not exact in float32).
_SUM = {"dim": (1, 2, 3), "dtype": torch.float64}


def mse(output: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    return ((output - real) ** 2).sum(**_SUM) / output[0].numel()


def psnr(output: torch.Tensor, real: torch.Tensor, data_range: float = 255.0) -> torch.Tensor:
    return 10.0 * torch.log10(data_range**2 / mse(output, real))


def _nan_where_empty(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    return total / count.where(count > 0, torch.full_like(count, float("nan")))


def region_mse(output: torch.Tensor, real: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """MSE restricted to `region` (B, 1, H, W); NaN where the region is empty."""
    squared = ((output - real) ** 2 * region).sum(**_SUM)
    return _nan_where_empty(squared, region.sum(**_SUM) * output.shape[1])


def region_mean_abs(
    output: torch.Tensor, other: torch.Tensor, region: torch.Tensor
) -> torch.Tensor:
    """Mean absolute difference inside `region` (B, 1, H, W); NaN where it is empty."""
    total = ((output - other).abs() * region).sum(**_SUM)
    return _nan_where_empty(total, region.sum(**_SUM) * output.shape[1])


def _gaussian_window(device: torch.device) -> torch.Tensor:
    """scipy.ndimage's Gaussian kernel: radius int(truncate * sigma + 0.5), normalized."""
    radius = int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64, device=device)
    weights = torch.exp(-0.5 * (x / SSIM_SIGMA) ** 2)
    return weights / weights.sum()


def ssim(output: torch.Tensor, real: torch.Tensor, data_range: float = 255.0) -> torch.Tensor:
    """Mean SSIM of (B, C, H, W) images (as scikit-image's Gaussian SSIM, see the top)."""
    return ssim_map(output, real, data_range).mean(dim=(1, 2, 3))


def ssim_map(output: torch.Tensor, real: torch.Tensor, data_range: float = 255.0) -> torch.Tensor:
    """The SSIM index per pixel, (B, C, H - 10, W - 10): the valid region of the 11x11 window.

    The window is applied without padding: scikit-image filters with reflected borders and
    then drops the border the window overlaps, which leaves exactly the valid region.
    """
    x, y = output.double(), real.double()
    weights = _gaussian_window(x.device).tolist()
    size = len(weights)

    def blur(t: torch.Tensor) -> torch.Tensor:
        # Separable, as in-place weighted sums of shifted views: several times faster on CPU
        # than a grouped float64 conv2d (which has no fast kernel), and as exact.
        h, w = t.shape[-2] - size + 1, t.shape[-1] - size + 1
        rows = t[..., 0:h, :] * weights[0]
        for i in range(1, size):
            rows.add_(t[..., i : i + h, :], alpha=weights[i])
        out = rows[..., :, 0:w] * weights[0]
        for i in range(1, size):
            out.add_(rows[..., :, i : i + w], alpha=weights[i])
        return out

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    return ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / (
        (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    )


def luma(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) BT.601 luma, on the images' scale."""
    weights = torch.tensor(_LUMA, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images * weights).sum(dim=1, keepdim=True)


def foreground_change(
    output_eval: torch.Tensor, composite_eval: torch.Tensor, mask_eval: torch.Tensor
) -> dict[str, torch.Tensor]:
    """How the foreground changed from composite to output, at 256 px (uint8-valued images,
    {0, 1} mask): CIEDE2000 mean and 95th percentile, the shift of its mean hue angle (degrees,
    in (-180, 180]), the change of its mean chroma (Lab units) and the SSIM of its luma (over
    the mask; 1 = same structure and contrast). NaN where the mask is empty."""
    lab_c = rgb_to_lab(composite_eval / 255.0)
    lab_o = rgb_to_lab(output_eval / 255.0)
    difference = delta_e_2000(lab_c, lab_o)  # (B, 1, 256, 256)
    fg = mask_eval > 0.5
    count = fg.sum(dim=(1, 2, 3)).double()
    safe = count.clamp(min=1)

    def mean(values: torch.Tensor) -> torch.Tensor:  # over the mask, per image
        return (values * fg).sum(dim=(1, 2, 3), dtype=torch.float64) / safe

    p95 = torch.stack([
        torch.quantile(d[m], 0.95) if m.any() else d.new_tensor(math.nan)
        for d, m in zip(difference.double(), fg)
    ])  # fmt: skip
    hue_c = torch.atan2(mean(lab_c[:, 2:3]), mean(lab_c[:, 1:2]))
    hue_o = torch.atan2(mean(lab_o[:, 2:3]), mean(lab_o[:, 1:2]))
    hue_shift = torch.rad2deg(torch.remainder(hue_o - hue_c + math.pi, 2 * math.pi) - math.pi)
    chroma = mean(torch.hypot(lab_o[:, 1:2], lab_o[:, 2:3])) - mean(
        torch.hypot(lab_c[:, 1:2], lab_c[:, 2:3])
    )
    # SSIM's window needs 5 pixels around each: the map covers [5, 251), the mask likewise.
    index = ssim_map(luma(output_eval.double()), luma(composite_eval.double()))
    inner = fg[..., 5:-5, 5:-5]
    inner_count = inner.sum(dim=(1, 2, 3)).double()
    structure = (index * inner).sum(dim=(1, 2, 3)) / inner_count.clamp(min=1)
    empty = count == 0
    return {
        "fg_delta_e": mean(difference).masked_fill(empty, math.nan),
        "fg_delta_e_p95": p95.to(count.device),
        "fg_hue_shift": hue_shift.masked_fill(empty, math.nan),
        "fg_chroma_change": chroma.masked_fill(empty, math.nan),
        "fg_structure": structure.masked_fill(inner_count == 0, math.nan),
    }


def lab_gap(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Distance between foreground and background Lab statistics of (B, 3, H, W) [0, 1] images.

    sqrt(sum over L, a, b of (mean_fg - mean_bg)^2 + (std_fg - std_bg)^2); NaN when either
    region is empty.
    """
    # Pixels in float32 (ample for statistics in Lab units, and twice as fast), sums in float64.
    lab = rgb_to_lab(images.float())
    sums = {"dim": (2, 3), "keepdim": True, "dtype": torch.float64}
    stats = []
    for region in (mask.float(), 1.0 - mask.float()):
        count = region.sum(**sums)
        safe = count.clamp(min=1.0)
        mean = (lab * region).sum(**sums) / safe
        variance = (torch.square(lab - mean.float()) * region).sum(**sums) / safe
        stats.append((mean, variance.clamp(min=0).sqrt(), count))
    (fg_mean, fg_std, fg_count), (bg_mean, bg_std, bg_count) = stats
    squared = ((fg_mean - bg_mean) ** 2 + (fg_std - bg_std) ** 2).sum(dim=(1, 2, 3))
    empty = (fg_count.flatten() == 0) | (bg_count.flatten() == 0)
    return squared.sqrt().masked_fill(empty, float("nan"))


def interior(mask: torch.Tensor) -> torch.Tensor:
    """(B, 1, H - 2, W - 2): 1 where the 3x3 block around a pixel is all foreground."""
    m = mask > 0.5
    rows = m[:, :, :-2] & m[:, :, 1:-1] & m[:, :, 2:]
    return (rows[..., :-2] & rows[..., 1:-1] & rows[..., 2:]).float()


def high_frequency_fraction(images: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Laplacian energy of the luminance over `region`, divided by the luminance variance there.

    images (B, 3, H, W) on any scale; region (B, 1, H - 2, W - 2), the pixels whose 3x3
    Laplacian is taken (`interior(mask)`: the mask's own edge, where a model may legitimately
    change the transition, does not count). NaN for an empty region or a flat one.
    """
    luma = torch.tensor(_LUMA, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    y = (images * luma).sum(dim=1, keepdim=True)
    centre = y[:, :, 1:-1, 1:-1]
    # The 4-neighbour Laplacian on the valid region, by slicing (cheaper than a conv2d).
    laplacian = (
        y[:, :, :-2, 1:-1] + y[:, :, 2:, 1:-1] + y[:, :, 1:-1, :-2] + y[:, :, 1:-1, 2:] - 4 * centre
    )
    count = region.sum(**_SUM)
    safe = count.clamp(min=1.0)
    energy = (laplacian**2 * region).sum(**_SUM) / safe
    mean = (centre * region).sum(**_SUM) / safe
    deviation = centre - mean.to(centre.dtype).view(-1, 1, 1, 1)
    variance = (deviation**2 * region).sum(**_SUM) / safe
    fraction = energy / variance.where(variance > 1e-9, torch.full_like(variance, math.nan))
    return fraction.masked_fill(count == 0, math.nan)


def sharpness_ratio(
    output: torch.Tensor, composite: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """hf(output) / hf(composite) over the foreground: < 1 blurrier, 1 same detail, > 1 sharper."""
    if min(output.shape[-2:]) < 3:  # no interior at all; a metric must not fail a sample
        return torch.full(output.shape[:1], math.nan, dtype=torch.float64, device=output.device)
    region = interior(mask)
    before = high_frequency_fraction(composite, region)
    after = high_frequency_fraction(output, region)
    return after / before.where(before > 0, torch.full_like(before, math.nan))


def capped_psnr(error: torch.Tensor, cap: float = BG_PSNR_CAP) -> torch.Tensor:
    """PSNR (uint8 data range) of an MSE, at most `cap` dB; NaN stays NaN."""
    return (10.0 * torch.log10(255.0**2 / error)).clamp(max=cap)


def _at_output_size(
    image: torch.Tensor, output: torch.Tensor, mode: str = "bilinear"
) -> torch.Tensor:
    """`image` (C, h, w) resized to `output`'s size when `--output-size model` made them differ."""
    return resize(image[None].float(), tuple(output.shape[-2:]), mode)[0]


def ground_truth_metrics(
    harmonized: list[torch.Tensor],
    composite: list[torch.Tensor],
    real: list[torch.Tensor],
    mask: list[torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Official-convention metrics of the output, and of the composite as the baseline,
    with SSIM and full-resolution MSE / PSNR."""
    metrics = _ground_truth_at_eval_scale(
        to_eval_scale(harmonized), to_eval_scale(composite), to_eval_scale(real),
        masks_to_eval_scale(mask),
    )  # fmt: skip
    metrics.update(full_resolution_metrics(harmonized, real))
    return metrics


def _ground_truth_at_eval_scale(
    output_eval: torch.Tensor,
    composite_eval: torch.Tensor,
    real_eval: torch.Tensor,
    mask_eval: torch.Tensor,
) -> dict[str, torch.Tensor]:
    return {
        "mse": mse(output_eval, real_eval),
        "psnr": psnr(output_eval, real_eval),
        "fmse": region_mse(output_eval, real_eval, mask_eval),
        "bmse": region_mse(output_eval, real_eval, 1.0 - mask_eval),
        "composite_mse": mse(composite_eval, real_eval),
        "composite_psnr": psnr(composite_eval, real_eval),
        "composite_fmse": region_mse(composite_eval, real_eval, mask_eval),
        "ssim": ssim(output_eval, real_eval),
    }


def full_resolution_metrics(
    harmonized: list[torch.Tensor], real: list[torch.Tensor]
) -> dict[str, torch.Tensor]:
    """mse_full / psnr_full at each output's own size (one image at a time: sizes differ)."""
    errors = []
    for output, truth in zip(harmonized, real):
        out = quantize(output, torch.float32)[None]
        truth = quantize(_at_output_size(truth, output), torch.float32)[None]
        errors.append(mse(out, truth))
    error = torch.cat(errors)
    return {"mse_full": error, "psnr_full": 10.0 * torch.log10(255.0**2 / error)}


def reference_free_metrics(
    harmonized: list[torch.Tensor],
    composite: list[torch.Tensor],
    mask: list[torch.Tensor],
    output_eval: torch.Tensor | None = None,
    composite_eval: torch.Tensor | None = None,
    mask_eval: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Metrics that need no ground truth (see the top); the *_eval tensors when already made."""
    output_eval = to_eval_scale(harmonized) if output_eval is None else output_eval
    composite_eval = to_eval_scale(composite) if composite_eval is None else composite_eval
    mask_eval = masks_to_eval_scale(mask) if mask_eval is None else mask_eval
    per_image: dict[str, list[torch.Tensor]] = {
        "bg_psnr": [], "fg_change": [], "sharpness_ratio": [], "mask_area": [],
    }  # fmt: skip
    for output, source, region in zip(harmonized, composite, mask):
        per_image["mask_area"].append((region > 0.5).double().mean().view(1))
        # Compare at the output's size: it equals the input's unless --output-size model.
        out = quantize(output, torch.float32)[None]
        comp = quantize(_at_output_size(source, output), torch.float32)[None]
        fg = (_at_output_size(region, output, "nearest") > 0.5).float()[None]
        per_image["bg_psnr"].append(capped_psnr(region_mse(out, comp, 1.0 - fg)))
        per_image["fg_change"].append(region_mean_abs(out, comp, fg))
        per_image["sharpness_ratio"].append(sharpness_ratio(out, comp, fg))
    metrics = {name: torch.cat(values) for name, values in per_image.items()}
    metrics["lab_gap_before"] = lab_gap(composite_eval / 255.0, mask_eval)
    metrics["lab_gap_after"] = lab_gap(output_eval / 255.0, mask_eval)
    metrics.update(foreground_change(output_eval, composite_eval, mask_eval))
    return metrics


def score_batch(
    harmonized: list[torch.Tensor],
    composite: list[torch.Tensor],
    mask: list[torch.Tensor],
    real: list[torch.Tensor | None],
    *,
    input_is_real: bool = False,
    classifier: HarmonyClassifier | None = None,
) -> dict[str, torch.Tensor]:
    """Every metric for a batch: reference-free ones for all samples, ground-truth ones where
    `real` is given (NaN elsewhere). One resize to 256 px per image serves both.

    `input_is_real` (inverse runs): `composite` holds the model's input, the real image, which
    is then also the ground truth (`real` is ignored); the output is a generated composite, so
    its metrics against the real say how strong its disharmony is, and the baseline metrics
    (input against the real) do not apply. `classifier`: `unharmony_prob` of each output, from
    the same 256 px pixels (NaN without one).
    """
    if input_is_real:
        real = list(composite)
    output_eval = to_eval_scale(harmonized)
    composite_eval = to_eval_scale(composite)
    mask_eval = masks_to_eval_scale(mask)
    metrics = reference_free_metrics(
        harmonized, composite, mask, output_eval, composite_eval, mask_eval
    )
    n = len(harmonized)
    metrics["unharmony_prob"] = (
        classifier.unharmony_prob(output_eval).to(output_eval.device)
        if classifier is not None
        else torch.full((n,), math.nan, dtype=torch.float64, device=output_eval.device)
    )
    for name in GROUND_TRUTH_METRICS:
        metrics[name] = torch.full((n,), math.nan, dtype=torch.float64, device=output_eval.device)
    with_real = [k for k in range(n) if real[k] is not None]
    if with_real:
        truth = [image for image in real if image is not None]
        index = torch.tensor(with_real, device=output_eval.device)
        scored = _ground_truth_at_eval_scale(
            output_eval[index], composite_eval[index], to_eval_scale(truth), mask_eval[index]
        )
        scored.update(full_resolution_metrics([harmonized[k] for k in with_real], truth))
        for name, values in scored.items():
            metrics[name][index] = values
    if input_is_real:
        for name in BASELINE_METRICS:
            metrics[name].fill_(math.nan)
    return metrics
