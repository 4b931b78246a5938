"""Pure image maths on batched torch tensors: resizing, colour spaces, pasting a change back.

Enters: float tensors in [0, 1], images (B, 3, H, W) and masks (B, 1, H, W) with values {0, 1}.
Leaves: tensors of the same conventions; `eval_resize*` take and give uint8 arrays (PIL). No
I/O, no Ray, no model: every function here is tested on its own.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def resize(images: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """Resize (B, C, H, W) to `size` = (h, w); bilinear is anti-aliased like PIL's."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    if mode == "nearest":
        return F.interpolate(images, size=size, mode="nearest")
    return F.interpolate(images, size=size, mode=mode, antialias=True, align_corners=False)


# --- the official evaluation's resize ------------------------------------------------------

EVAL_SIZE = 256


def eval_resize(rgb: np.ndarray, size: int = EVAL_SIZE) -> np.ndarray:
    """(H, W, 3) uint8 -> (size, size, 3) uint8 with PIL's bilinear (antialiased) filter, as the
    official `scripts/evaluate/main.py` resizes output and ground truth. Not reimplemented in
    torch: PIL rounds after each of its two passes, and only PIL itself matches it everywhere."""
    image = Image.fromarray(rgb)
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image)


def eval_resize_mask(mask: np.ndarray, size: int = EVAL_SIZE) -> np.ndarray:
    """(H, W) bool -> (size, size) uint8 in {0, 1}: a 1-bit PIL image resized nearest (pixel
    centres), as the official evaluation resizes the mask."""
    image = Image.fromarray(mask.astype(bool))  # mode "1"
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.NEAREST)
    return np.asarray(image, dtype=np.uint8)


def resize_each(images: list[torch.Tensor], size: int, mode: str = "bilinear") -> torch.Tensor:
    """Resize a list of (C, H_i, W_i) images of any sizes to one square batch (B, C, size, size).

    The aspect ratio is not kept, as in the official preprocessing.
    """
    return torch.cat([resize(image[None], (size, size), mode) for image in images])


def binarize(mask: torch.Tensor) -> torch.Tensor:
    """Mask values >= 0.5 become 1, the rest 0 (same dtype)."""
    return (mask >= 0.5).to(mask.dtype)


def carry_back(
    composite: torch.Tensor, mask: torch.Tensor, harmonized_low: torch.Tensor
) -> torch.Tensor:
    """Carry a low-resolution harmonization back to the composite's full resolution.

    composite: (3, H, W) full resolution, mask: (1, H, W) binary, harmonized_low: (3, h, w).
    The change the model made, `harmonized_low - resize(composite)`, is upsampled to (H, W) and
    added to the full-resolution composite inside the mask only; outside it the composite's
    pixels are returned exactly.
    """
    full_size = tuple(composite.shape[-2:])
    low_size = tuple(harmonized_low.shape[-2:])
    composite_low = resize(composite[None], low_size)  # (1, 3, h, w)
    change_low = harmonized_low[None] - composite_low
    change = resize(change_low, full_size, mode="bilinear")[0]  # (3, H, W)
    harmonized = (composite + change).clamp(0.0, 1.0)
    return torch.where(mask > 0.5, harmonized, composite)


# --- sRGB <-> CIE Lab (D65), batched, differentiable ---------------------------------------

_RGB_TO_XYZ = torch.tensor(
    [
        [0.412453, 0.357580, 0.180423],
        [0.212671, 0.715160, 0.072169],
        [0.019334, 0.119193, 0.950227],
    ]
)
_WHITE_D65 = torch.tensor([0.950456, 1.0, 1.088754])


def _srgb_to_linear(rgb: torch.Tensor) -> torch.Tensor:
    return torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)


def _linear_to_srgb(linear: torch.Tensor) -> torch.Tensor:
    linear = linear.clamp(min=0.0)
    return torch.where(
        linear <= 0.0031308, linear * 12.92, 1.055 * linear.clamp(min=1e-12) ** (1 / 2.4) - 0.055
    )


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) sRGB in [0, 1] -> Lab with L in [0, 100], a/b roughly [-128, 127]."""
    matrix = _RGB_TO_XYZ.to(rgb)
    xyz = torch.einsum("ij,bjhw->bihw", matrix, _srgb_to_linear(rgb))
    xyz = xyz / _WHITE_D65.to(rgb).view(1, 3, 1, 1)
    epsilon = 216 / 24389
    kappa = 24389 / 27
    f = torch.where(xyz > epsilon, xyz.clamp(min=1e-12) ** (1 / 3), (kappa * xyz + 16) / 116)
    fx, fy, fz = f[:, 0], f[:, 1], f[:, 2]
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], dim=1)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """Inverse of `rgb_to_lab`; result clamped to [0, 1]."""
    fy = (lab[:, 0] + 16) / 116
    fx = fy + lab[:, 1] / 500
    fz = fy - lab[:, 2] / 200
    f = torch.stack([fx, fy, fz], dim=1)
    epsilon = 6 / 29
    xyz = torch.where(f > epsilon, f**3, 3 * epsilon**2 * (f - 4 / 29))
    xyz = xyz * _WHITE_D65.to(lab).view(1, 3, 1, 1)
    matrix = torch.linalg.inv(_RGB_TO_XYZ.double()).to(lab)
    linear = torch.einsum("ij,bjhw->bihw", matrix, xyz)
    return _linear_to_srgb(linear).clamp(0.0, 1.0)


def delta_e_2000(lab1: torch.Tensor, lab2: torch.Tensor) -> torch.Tensor:
    """CIEDE2000 colour difference of (B, 3, H, W) Lab images -> (B, 1, H, W) (kL = kC = kH = 1).

    Sharma, Wu and Dalal's formulation, as `skimage.color.deltaE_ciede2000` computes it (tested
    against it). About 2.3 is a just-noticeable difference."""
    l1, a1, b1 = lab1[:, 0:1], lab1[:, 1:2], lab1[:, 2:3]
    l2, a2, b2 = lab2[:, 0:1], lab2[:, 1:2], lab2[:, 2:3]
    c_bar = (torch.hypot(a1, b1) + torch.hypot(a2, b2)) / 2
    g = 0.5 * (1 - torch.sqrt(c_bar**7 / (c_bar**7 + 25.0**7)))
    a1p, a2p = a1 * (1 + g), a2 * (1 + g)
    c1p, c2p = torch.hypot(a1p, b1), torch.hypot(a2p, b2)
    h1p = torch.remainder(torch.atan2(b1, a1p), 2 * torch.pi)
    h2p = torch.remainder(torch.atan2(b2, a2p), 2 * torch.pi)
    dl = l2 - l1
    dc = c2p - c1p
    dh = h2p - h1p
    dh = torch.where(dh > torch.pi, dh - 2 * torch.pi, dh)
    dh = torch.where(dh < -torch.pi, dh + 2 * torch.pi, dh)
    dh = torch.where(c1p * c2p == 0, torch.zeros_like(dh), dh)
    dh_term = 2 * torch.sqrt(c1p * c2p) * torch.sin(dh / 2)
    l_bar = (l1 + l2) / 2
    cp_bar = (c1p + c2p) / 2
    h_sum = h1p + h2p
    h_bar = (
        torch.where(
            (h1p - h2p).abs() > torch.pi,
            torch.where(h_sum < 2 * torch.pi, h_sum + 2 * torch.pi, h_sum - 2 * torch.pi),
            h_sum,
        )
        / 2
    )
    h_bar = torch.where(c1p * c2p == 0, h_sum, h_bar)
    t = (
        1
        - 0.17 * torch.cos(h_bar - torch.deg2rad(torch.tensor(30.0)))
        + 0.24 * torch.cos(2 * h_bar)
        + 0.32 * torch.cos(3 * h_bar + torch.deg2rad(torch.tensor(6.0)))
        - 0.20 * torch.cos(4 * h_bar - torch.deg2rad(torch.tensor(63.0)))
    )
    s_l = 1 + 0.015 * (l_bar - 50) ** 2 / torch.sqrt(20 + (l_bar - 50) ** 2)
    s_c = 1 + 0.045 * cp_bar
    s_h = 1 + 0.015 * cp_bar * t
    d_theta = torch.deg2rad(torch.tensor(30.0)) * torch.exp(
        -(((torch.rad2deg(h_bar) - 275) / 25) ** 2)
    )
    r_c = 2 * torch.sqrt(cp_bar**7 / (cp_bar**7 + 25.0**7))
    r_t = -torch.sin(2 * d_theta) * r_c
    terms = (dl / s_l) ** 2 + (dc / s_c) ** 2 + (dh_term / s_h) ** 2
    return torch.sqrt((terms + r_t * (dc / s_c) * (dh_term / s_h)).clamp(min=0))


def masked_mean_std(
    values: torch.Tensor, weights: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image, per-channel mean and std of (B, C, H, W) `values` over (B, 1, H, W) `weights`.

    Returns two (B, C, 1, 1) tensors. Images whose weights sum to zero get mean 0, std `eps`.
    """
    total = weights.sum(dim=(2, 3), keepdim=True).clamp(min=eps)
    mean = (values * weights).sum(dim=(2, 3), keepdim=True) / total
    variance = (((values - mean) ** 2) * weights).sum(dim=(2, 3), keepdim=True) / total
    return mean, variance.clamp(min=0).sqrt().clamp(min=eps)
