"""Metrics against scikit-image and hand computation on small arrays."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.metrics import mean_squared_error, peak_signal_noise_ratio

from pipeline.score import ground_truth_metrics, mse, psnr, region_mse


def test_mse_psnr_match_scikit_image() -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (2, 3, 8, 8)).astype(np.float64)
    b = rng.integers(0, 256, (2, 3, 8, 8)).astype(np.float64)
    ours_mse = mse(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    ours_psnr = psnr(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    for i in range(2):
        assert ours_mse[i] == pytest.approx(mean_squared_error(a[i], b[i]))
        assert ours_psnr[i] == pytest.approx(peak_signal_noise_ratio(b[i], a[i], data_range=255))


def test_fmse_by_hand() -> None:
    output = torch.zeros(1, 3, 2, 2, dtype=torch.float64)
    real = torch.zeros(1, 3, 2, 2, dtype=torch.float64)
    output[0, :, 0, 0] = 10.0  # foreground pixel off by 10 in every channel
    output[0, 0, 1, 1] = 4.0  # background pixel off by 4 in one channel
    mask = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    mask[0, 0, 0, 0] = 1.0
    # fMSE = MSE(out*m, real*m) * HW / sum(m) = (3 * 100 / 12) * 4 / 1 = 100
    assert region_mse(output, real, mask).item() == pytest.approx(100.0)
    # bMSE over the 3 background pixels: 16 / (3 * 3)
    assert region_mse(output, real, 1 - mask).item() == pytest.approx(16 / 9)


def test_ground_truth_metrics_of_a_perfect_output() -> None:
    real = [torch.rand(3, 40, 60)]
    mask = [torch.zeros(1, 40, 60)]
    mask[0][:, 10:30, 10:40] = 1
    composite = [real[0] * 0.5]
    scores = ground_truth_metrics(real, composite, real, mask)
    assert scores["mse"].item() == 0 and scores["fmse"].item() == 0
    assert scores["composite_mse"].item() > 0 and scores["composite_fmse"].item() > 0
    assert torch.isinf(scores["psnr"]).all()
