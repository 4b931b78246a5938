"""Image maths on their own: colour spaces, statistics, resizing, carry-back, Reinhard."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage import color

from pipeline.config import ModelConfig
from pipeline.imaging import (
    carry_back,
    delta_e_2000,
    eval_resize,
    eval_resize_mask,
    lab_to_rgb,
    masked_mean_std,
    resize_each,
    rgb_to_lab,
)
from pipeline.models.base import HarmonizeBatch, sample_seed
from pipeline.models.reinhard import ReinhardHarmonizer


def random_images(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def test_rgb_to_lab_matches_scikit_image() -> None:
    rgb = random_images(2, 8, 9)
    ours = rgb_to_lab(rgb).permute(0, 2, 3, 1).numpy()
    reference = np.stack([color.rgb2lab(image.permute(1, 2, 0).numpy()) for image in rgb])
    np.testing.assert_allclose(ours, reference, atol=1e-2)  # white-point rounding


def test_lab_round_trip() -> None:
    rgb = random_images(2, 16, 16, seed=1)
    torch.testing.assert_close(lab_to_rgb(rgb_to_lab(rgb)), rgb, atol=1e-4, rtol=0)


def test_masked_mean_std() -> None:
    values = torch.tensor([[1.0, 2.0], [3.0, 10.0]]).view(1, 1, 2, 2)
    weights = torch.tensor([[1.0, 1.0], [1.0, 0.0]]).view(1, 1, 2, 2)
    mean, std = masked_mean_std(values, weights)
    assert mean.item() == pytest.approx(2.0)
    assert std.item() == pytest.approx(np.std([1.0, 2.0, 3.0]))


def test_resize_each_batches_any_sizes() -> None:
    images = [torch.rand(3, 30, 50), torch.rand(3, 64, 20)]
    assert resize_each(images, 32).shape == (2, 3, 32, 32)


def test_carry_back_keeps_background_exact_and_applies_change() -> None:
    composite = torch.rand(3, 90, 130)
    mask = torch.zeros(1, 90, 130)
    mask[:, 20:70, 30:100] = 1.0
    # A model output at 64x64 that brightens everything by 0.1.
    harmonized_low = (resize_each([composite], 64)[0] + 0.1).clamp(0, 1)
    out = carry_back(composite, mask, harmonized_low)
    assert out.shape == composite.shape
    assert torch.equal(out[:, mask[0] == 0], composite[:, mask[0] == 0])
    change = (out - composite)[:, 30:60, 40:90]  # inside, away from the clamp at 1
    unclamped = composite[:, 30:60, 40:90] < 0.85
    assert change[unclamped].mean().item() == pytest.approx(0.1, abs=0.01)


def test_sample_seed_depends_on_run_seed_and_id_only() -> None:
    assert sample_seed(0, "a") == sample_seed(0, "a")
    assert len({sample_seed(0, "a"), sample_seed(1, "a"), sample_seed(0, "b")}) == 3
    assert 0 <= sample_seed(7, "x") < 2**63


def test_reinhard_matches_foreground_statistics_to_background() -> None:
    generator = torch.Generator().manual_seed(3)
    composite = torch.rand(3, 64, 96, generator=generator) * 0.5 + 0.25
    mask = torch.zeros(1, 64, 96)
    mask[:, 16:48, 24:72] = 1.0
    composite[:, mask[0] > 0] = composite[:, mask[0] > 0] * torch.tensor([1.4, 0.6, 0.9])[:, None]
    harmonizer = ReinhardHarmonizer(ModelConfig(resolution=64, device="cpu"))
    (out,) = harmonizer.harmonize(HarmonizeBatch(["s"], [composite], [mask], [0]))
    assert torch.equal(out[:, mask[0] == 0], composite[:, mask[0] == 0])
    lab = rgb_to_lab(out[None])
    fg_mean, fg_std = masked_mean_std(lab, mask[None])
    bg_mean, bg_std = masked_mean_std(lab, 1 - mask[None])
    before_mean, _ = masked_mean_std(rgb_to_lab(composite[None]), mask[None])
    # The gap in Lab mean shrinks to almost nothing (stats computed at 64 px vs applied at full).
    assert (fg_mean - bg_mean).abs().max() < 1.0 < (before_mean - bg_mean).abs().max()
    torch.testing.assert_close(fg_std, bg_std, atol=1.0, rtol=0.1)


# Sharma, Wu and Dalal (2005), test data for CIEDE2000: (Lab 1, Lab 2, ΔE00).
SHARMA = [
    ((50.0, 2.6772, -79.7751), (50.0, 0.0, -82.7485), 2.0425),
    ((50.0, -1.3802, -84.2814), (50.0, 0.0, -82.7485), 1.0000),
    ((50.0, 0.0, 0.0), (50.0, -1.0, 2.0), 2.3669),
    ((50.0, 2.49, -0.001), (50.0, -2.49, 0.0009), 7.1792),
    ((50.0, 2.5, 0.0), (50.0, 0.0, -2.5), 4.3065),
    ((60.2574, -34.0099, 36.2677), (60.4626, -34.1751, 39.4387), 1.2644),
    ((22.7233, 20.0904, -46.694), (23.0331, 14.973, -42.5619), 2.0373),
    ((90.8027, -2.0831, 1.441), (91.1528, -1.6435, 0.0447), 1.4441),
]


def test_delta_e_2000_matches_the_published_pairs_and_scikit_image() -> None:
    for lab1, lab2, expected in SHARMA:
        a = torch.tensor(lab1, dtype=torch.float64).view(1, 3, 1, 1)
        b = torch.tensor(lab2, dtype=torch.float64).view(1, 3, 1, 1)
        assert delta_e_2000(a, b).item() == pytest.approx(expected, abs=1e-4)
    rng = np.random.default_rng(4)
    x = rng.random((2, 40, 50, 3))
    y = np.clip(x + rng.normal(0, 0.1, x.shape), 0, 1)
    lab_x, lab_y = color.rgb2lab(x), color.rgb2lab(y)
    expected_map = color.deltaE_ciede2000(lab_x, lab_y)
    got = delta_e_2000(
        torch.from_numpy(lab_x).permute(0, 3, 1, 2), torch.from_numpy(lab_y).permute(0, 3, 1, 2)
    )
    np.testing.assert_allclose(got[:, 0].numpy(), expected_map, atol=1e-5)


def test_eval_resize_is_pils_bilinear_and_one_bit_nearest() -> None:
    from PIL import Image

    rng = np.random.default_rng(5)
    image = (rng.random((301, 457, 3)) * 255).astype(np.uint8)
    expected = np.asarray(Image.fromarray(image).resize((256, 256), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(eval_resize(image), expected)
    mask = rng.random((301, 457)) < 0.3
    resized = eval_resize_mask(mask)
    assert resized.dtype == np.uint8 and set(np.unique(resized)) <= {0, 1}
    # Pixel centres: output pixel (i, j) takes source pixel floor((i + 0.5) * scale).
    rows = np.floor((np.arange(256) + 0.5) * 301 / 256).astype(int)
    cols = np.floor((np.arange(256) + 0.5) * 457 / 256).astype(int)
    np.testing.assert_array_equal(resized, mask[rows][:, cols])
