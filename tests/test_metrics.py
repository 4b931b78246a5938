"""Every per-sample metric of `pipeline/score.py` against a known answer.

Ground-truth metrics against scikit-image (`mean_squared_error`, `peak_signal_noise_ratio`,
`structural_similarity`) and hand-computed fMSE / bMSE; reference-free metrics on constructed
images whose right answer is known (an untouched background, a blurred foreground, a
colour-matched foreground, a known constant change).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from skimage.color import rgb2lab
from skimage.metrics import mean_squared_error, peak_signal_noise_ratio, structural_similarity

from pipeline.config import ModelConfig
from pipeline.models.base import HarmonizeBatch
from pipeline.models.reinhard import IdentityHarmonizer, ReinhardHarmonizer
from pipeline.score import (
    BG_PSNR_CAP,
    full_resolution_metrics,
    lab_gap,
    score_batch,
    sharpness_ratio,
    ssim,
)
from schemas.results import GROUND_TRUTH_METRICS, METRIC_COLUMNS


def texture(height: int, width: int, seed: int = 0) -> np.ndarray:
    """(3, H, W) float64 in [0, 1]: smooth-ish random detail, like a photo's texture."""
    rng = np.random.default_rng(seed)
    noise = rng.normal(0.0, 1.0, (3, height, width))
    smooth = np.stack([gaussian_filter(channel, 1.0) for channel in noise])
    return (0.5 + 0.12 * smooth / smooth.std()).clip(0, 1)


def box_mask(height: int, width: int, top: int, bottom: int, left: int, right: int) -> np.ndarray:
    mask = np.zeros((1, height, width))
    mask[:, top:bottom, left:right] = 1.0
    return mask


def t(array: np.ndarray) -> torch.Tensor:
    """Float32 tensor, as the actor holds images (uint8 / 255)."""
    return torch.from_numpy(np.ascontiguousarray(array)).float()


def to_uint8(image: np.ndarray) -> np.ndarray:
    return (image.clip(0, 1) * 255).round().astype(np.uint8)


# --- ground truth --------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 40, 33), (3, 256, 256), (1, 24, 24)])
def test_ssim_matches_scikit_image(shape: tuple[int, int, int]) -> None:
    rng = np.random.default_rng(sum(shape))
    real = rng.integers(0, 256, (2, *shape)).astype(np.float64)
    real[1] = np.stack([gaussian_filter(c, 2.0) for c in real[1]])  # a smooth image too
    output = np.clip(real + rng.normal(0, 25, real.shape), 0, 255).round()
    ours = ssim(torch.from_numpy(output), torch.from_numpy(real)).numpy()
    for i in range(2):
        expected = structural_similarity(
            output[i], real[i], channel_axis=0, data_range=255, gaussian_weights=True,
            sigma=1.5, use_sample_covariance=False,
        )  # fmt: skip
        assert ours[i] == pytest.approx(expected, abs=1e-10)
    same = ssim(torch.from_numpy(real), torch.from_numpy(real))
    assert torch.allclose(same, torch.ones(2, dtype=torch.float64))


def test_ground_truth_metrics_match_scikit_image_and_hand_computation() -> None:
    """At 256x256 (no resize), on uint8 values: mse/psnr as scikit-image, fMSE/bMSE by hand."""
    real = texture(256, 256, seed=1)
    mask = box_mask(256, 256, 64, 192, 32, 160)
    output = real.copy()
    output[:, 64:192, 32:160] += 10 / 255  # every foreground value off by 10 grey levels
    output[0, :64, :] += 4 / 255  # background rows off by 4 in one channel
    output = output.clip(0, 1)
    composite = real.copy()
    composite[:, 64:192, 32:160] *= 0.7
    scores = score_batch([t(output)], [t(composite)], [t(mask)], [t(real)])

    out8, real8, comp8 = to_uint8(output), to_uint8(real), to_uint8(composite)
    assert scores["mse"].item() == pytest.approx(mean_squared_error(out8, real8))
    assert scores["psnr"].item() == pytest.approx(
        peak_signal_noise_ratio(real8, out8, data_range=255)
    )
    assert scores["composite_mse"].item() == pytest.approx(mean_squared_error(comp8, real8))
    squared = (out8.astype(float) - real8) ** 2
    foreground = mask[0] > 0
    expected_fmse = squared[:, foreground].sum() / (3 * foreground.sum())
    expected_bmse = squared[:, ~foreground].sum() / (3 * (~foreground).sum())
    assert scores["fmse"].item() == pytest.approx(expected_fmse)
    assert scores["bmse"].item() == pytest.approx(expected_bmse)
    # Almost every foreground value moved by exactly 10 (a few clip at 255); bMSE is 16 on one
    # channel of the 64 changed rows, out of 3 channels of the background.
    assert expected_fmse == pytest.approx(100.0, rel=0.01)
    background_rows = (~foreground)[:64].sum()
    assert expected_bmse == pytest.approx(16 * background_rows / (3 * (~foreground).sum()), 0.01)
    expected_ssim = structural_similarity(
        out8, real8, channel_axis=0, data_range=255, gaussian_weights=True, sigma=1.5,
        use_sample_covariance=False,
    )  # fmt: skip
    assert scores["ssim"].item() == pytest.approx(expected_ssim, abs=1e-10)
    # At 256 px the full-resolution metrics are the same numbers.
    assert scores["mse_full"].item() == pytest.approx(scores["mse"].item())
    assert scores["psnr_full"].item() == pytest.approx(scores["psnr"].item())


def test_full_resolution_metrics_per_image_of_any_size() -> None:
    rng = np.random.default_rng(2)
    sizes = [(37, 53), (120, 80)]
    reals = [rng.integers(0, 256, (3, h, w)).astype(np.uint8) for h, w in sizes]
    outputs = [np.clip(r + rng.integers(-20, 21, r.shape), 0, 255).astype(np.uint8) for r in reals]
    scores = full_resolution_metrics([t(o / 255.0) for o in outputs], [t(r / 255.0) for r in reals])
    for i, (output, real) in enumerate(zip(outputs, reals)):
        assert scores["mse_full"][i].item() == pytest.approx(mean_squared_error(output, real))
        assert scores["psnr_full"][i].item() == pytest.approx(
            peak_signal_noise_ratio(real, output, data_range=255)
        )


def test_ground_truth_metrics_only_where_there_is_ground_truth() -> None:
    """A mixed batch: NaN without real_uri, and each sample's numbers do not depend on it."""
    images = [texture(64, 96, 3), texture(50, 50, 4), texture(80, 60, 5)]
    masks = [box_mask(*image.shape[1:], 10, 40, 10, 40) for image in images]
    composites = [np.where(m > 0, i * 0.8, i) for i, m in zip(images, masks)]
    reals: list[torch.Tensor | None] = [t(images[0]), None, t(images[2])]
    batch = score_batch([t(c) for c in composites], [t(c) for c in composites],
                        [t(m) for m in masks], reals)  # fmt: skip
    assert set(batch) == set(METRIC_COLUMNS)
    for name in GROUND_TRUTH_METRICS:
        assert math.isnan(batch[name][1].item())
        assert not math.isnan(batch[name][0].item()) and not math.isnan(batch[name][2].item())
    alone = score_batch([t(composites[2])], [t(composites[2])], [t(masks[2])], [reals[2]])
    for name in METRIC_COLUMNS:
        assert batch[name][2].item() == pytest.approx(alone[name][0].item(), nan_ok=True)


# --- without ground truth --------------------------------------------------------------------


def test_untouched_background_has_capped_bg_psnr_and_known_foreground_change() -> None:
    composite = texture(90, 120, seed=6)
    mask = box_mask(90, 120, 20, 70, 30, 90)
    output = composite.copy()
    output[:, 20:70, 30:90] = (output[:, 20:70, 30:90] + 12 / 255).clip(0, 1)
    scores = score_batch([t(output)], [t(composite)], [t(mask)], [None])
    assert scores["bg_psnr"].item() == BG_PSNR_CAP  # MSE 0: infinite PSNR, capped
    expected = np.abs(to_uint8(output).astype(int) - to_uint8(composite))[:, 20:70, 30:90].mean()
    assert scores["fg_change"].item() == pytest.approx(expected)
    assert expected == pytest.approx(12.0, abs=0.2)  # a few values clip at 255
    assert scores["mask_area"].item() == pytest.approx(50 * 60 / (90 * 120))


def test_bg_psnr_of_a_changed_background() -> None:
    composite = np.full((3, 40, 40), 100 / 255)
    mask = box_mask(40, 40, 10, 20, 10, 20)
    output = composite.copy()
    output[1][mask[0] == 0] = 105 / 255  # every background pixel off by 5 in one channel
    scores = score_batch([t(output)], [t(composite)], [t(mask)], [None])
    assert scores["bg_psnr"].item() == pytest.approx(10 * math.log10(255**2 / (25 / 3)))
    assert scores["fg_change"].item() == 0.0


def test_a_blurred_foreground_has_sharpness_ratio_below_one() -> None:
    composite = texture(128, 128, seed=7)
    mask = box_mask(128, 128, 24, 104, 24, 104)
    blurred = np.stack([gaussian_filter(channel, 1.5) for channel in composite])
    blurred = np.where(mask > 0, blurred, composite)
    # Unsharp masking: more detail than the composite.
    sharpened = np.where(mask > 0, (2 * composite - blurred).clip(0, 1), composite)
    # A contrast and brightness change alone is not a change of detail.
    affine = np.where(mask > 0, composite * 0.6 + 0.15, composite)
    outputs = [blurred, composite, sharpened, affine]
    scores = score_batch([t(o) for o in outputs], [t(composite)] * 4, [t(mask)] * 4, [None] * 4)
    ratio = scores["sharpness_ratio"].tolist()
    assert ratio[0] < 0.5
    assert ratio[1] == 1.0
    assert ratio[2] > 1.2
    assert ratio[3] == pytest.approx(1.0, abs=0.05)
    # And directly on uint8-scale tensors: the same function the actor calls.
    direct = sharpness_ratio(t(blurred * 255)[None], t(composite * 255)[None], t(mask)[None])
    assert direct.item() == pytest.approx(ratio[0], rel=0.05)


def test_colour_matched_foreground_has_lab_gap_near_zero() -> None:
    # Columns come in identical pairs and the mask takes every other column: the foreground
    # holds exactly the background's colours, so its Lab mean and std are the background's.
    half = texture(64, 32, seed=8)
    image = np.repeat(half, 2, axis=2)
    mask = np.zeros((1, 64, 64))
    mask[:, :, 1::2] = 1
    assert lab_gap(t(image)[None].double(), t(mask)[None].double()).item() == pytest.approx(
        0.0, abs=1e-6
    )


def test_lab_gap_of_flat_colours_is_their_lab_distance() -> None:
    """Two flat regions: std 0, so the gap is the Lab distance of the colours (scikit-image)."""
    fg_colour, bg_colour = np.array([0.8, 0.3, 0.2]), np.array([0.2, 0.4, 0.7])
    mask = box_mask(32, 32, 8, 24, 8, 24)
    image = np.where(mask > 0, fg_colour[:, None, None], bg_colour[:, None, None])
    expected = np.linalg.norm(
        rgb2lab(fg_colour[None, None])[0, 0] - rgb2lab(bg_colour[None, None])[0, 0]
    )
    ours = lab_gap(torch.from_numpy(image)[None], torch.from_numpy(mask)[None]).item()
    assert ours == pytest.approx(expected, rel=1e-3)


def test_reinhard_closes_the_lab_gap() -> None:
    """The colour-transfer baseline matches Lab statistics: the gap after is about 0."""
    background = texture(160, 200, seed=9)
    mask = box_mask(160, 200, 40, 120, 50, 150)
    gain = np.array([1.3, 0.8, 0.7])[:, None, None]
    composite = np.where(mask > 0, (background * gain + 0.05).clip(0, 1), background)
    harmonizer = ReinhardHarmonizer(ModelConfig(resolution=128, device="cpu"))
    batch = HarmonizeBatch(["a"], [t(composite)], [t(mask)], [0])
    output = harmonizer.harmonize(batch)
    scores = score_batch(output, [t(composite)], [t(mask)], [None])
    assert scores["lab_gap_before"].item() > 20
    assert scores["lab_gap_after"].item() < 1.0
    assert scores["bg_psnr"].item() == BG_PSNR_CAP
    assert scores["sharpness_ratio"].item() == pytest.approx(1.0, abs=0.1)


def test_square_model_output_is_compared_at_its_own_size() -> None:
    """--output-size model: a 256 px output of a 90x150 input; identity scores as untouched."""
    composite = t(texture(90, 150, seed=10))
    mask = t(box_mask(90, 150, 20, 70, 40, 110))
    harmonizer = IdentityHarmonizer(ModelConfig(output_size="model", device="cpu"))
    output = harmonizer.harmonize(HarmonizeBatch(["a"], [composite], [mask], [0]))
    assert output[0].shape == (3, 256, 256)
    scores = score_batch(output, [composite], [mask], [composite])
    assert scores["bg_psnr"].item() == BG_PSNR_CAP
    assert scores["fg_change"].item() == 0.0
    assert scores["sharpness_ratio"].item() == 1.0
    assert scores["mask_area"].item() == pytest.approx(50 * 70 / (90 * 150))
    assert scores["psnr_full"].item() == math.inf  # the real resized the same way: identical


def test_degenerate_inputs_give_nan_not_an_error() -> None:
    """A 2-pixel-high image has no mask interior; a mask lost at 256 px has no fMSE."""
    thin = t(texture(2, 300, seed=11))
    thin_mask = t(box_mask(2, 300, 0, 2, 100, 101))
    scores = score_batch([thin], [thin], [thin_mask], [thin])
    assert math.isnan(scores["sharpness_ratio"].item())
    assert scores["bg_psnr"].item() == BG_PSNR_CAP
    for name in METRIC_COLUMNS:
        assert scores[name].shape == (1,)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_metrics_on_cuda_match_cpu() -> None:
    composite = texture(100, 140, seed=12)
    mask = box_mask(100, 140, 20, 80, 30, 110)
    output = np.where(mask > 0, (composite * 1.2).clip(0, 1), composite)
    args = ([t(output)], [t(composite)], [t(mask)], [t(composite)])
    cpu = score_batch(*args)
    cuda = score_batch(*[[x.cuda() for x in arg] for arg in args])
    for name in METRIC_COLUMNS:
        assert cuda[name].device.type == "cuda"
        assert cuda[name].cpu().item() == pytest.approx(cpu[name].item(), rel=1e-5, nan_ok=True)


def test_per_sample_fmse_is_the_official_computation_on_masks_of_a_few_pixels() -> None:
    """Foregrounds of 1 to 40 pixels in images of odd sizes: the official evaluation (PIL
    bilinear for images, a 1-bit mask resized nearest at pixel centres, uint8 values) and
    `score_batch` give the same fMSE (or both none: the mask vanished at 256 px). A top-left
    nearest (torch's "nearest") drifts by up to tens of percent here."""
    from PIL import Image

    rng = np.random.default_rng(21)
    checked = 0
    for case in range(12):
        h, w = int(rng.integers(300, 900)), int(rng.integers(300, 900))
        real = (rng.random((h, w, 3)) * 255).round().astype(np.uint8)
        output = np.clip(real.astype(int) + rng.integers(-40, 40, (h, w, 3)), 0, 255).astype(
            np.uint8
        )
        mask = np.zeros((h, w), bool)
        y, x = int(rng.integers(0, h - 8)), int(rng.integers(0, w - 8))
        side = 1 + case % 6
        mask[y : y + side, x : x + side + case % 3] = True

        def pil(a: np.ndarray) -> np.ndarray:
            return np.asarray(Image.fromarray(a).resize((256, 256), Image.Resampling.BILINEAR))

        m = np.asarray(Image.fromarray(mask).resize((256, 256), Image.Resampling.NEAREST))
        m = m.astype(np.float64)[..., None]
        o, r = pil(output).astype(np.float64), pil(real).astype(np.float64)
        expected = ((o - r) ** 2 * m).sum() / (3 * m.sum()) if m.sum() else math.nan
        image = torch.from_numpy(output).permute(2, 0, 1).double() / 255
        truth = torch.from_numpy(real).permute(2, 0, 1).double() / 255
        region = torch.from_numpy(mask)[None].double()
        got = score_batch([image], [truth], [region], [truth])["fmse"].item()
        if math.isnan(expected):
            assert math.isnan(got)
        else:
            assert got == pytest.approx(expected, rel=1e-12), (case, got, expected)
            checked += 1
    assert checked >= 8
