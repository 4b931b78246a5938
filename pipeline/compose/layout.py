"""Copy-paste maths: where objects go on a background, and what the result's annotations are.

Pure functions on numpy arrays, no I/O and no Ray (`compose.py` is the Ray glue).

Enters: cut-outs (an object's RGB pixels and binary mask, cropped to the mask's box), a
background's size, `LayoutRules` and a numpy random generator (seeded per composite by the
caller).
Leaves: from `layout`, each placed object's size, position and flip (`Placement`) with its
resized pixels, and the objects left out because no position kept the overlap rule; from
`paste`, the composite
(H, W, 3) uint8, the instance label map (H, W) uint8 (0 background, i = the i-th pasted object
where it is visible after occlusion) and the per-instance annotations (`Instance`: box and
area of the visible pixels, visible fraction).

Rules:
- scale: an object's pasted height is `scale` x the background's height (its width follows
  its own aspect ratio), `scale` uniform in `rules.scale`. With `keep_inside` the range is cut
  to the scales at which the object fits inside the background; an object that fits at none
  (wider than the background at the smallest scale) is a `LayoutError`.
- position: "uniform" draws the top-left corner uniformly among the positions that keep the
  object inside (`keep_inside`), or its centre uniformly over the background (otherwise: it may
  be cut by the border); "ground" draws the object's bottom edge uniformly between
  `horizon` x the height and the bottom (objects stand on the ground), x as "uniform".
- overlap: objects are pasted in order, later ones on top. A position is taken only if, after
  it, every object already placed still shows at least 1 - `max_overlap` of its pixels (those
  inside the background): the rule holds for the finished composite, not pair by pair.
  After `attempts` positions an object is left out (and named).
- flip: each object is mirrored horizontally with probability `flip`.
- objects: `min_objects` to `max_objects` per composite, drawn without replacement while the
  pool allows, never one cut from the background's own image.
Draws happen in a fixed order from one generator, so a composite depends only on its seed,
its background's size and its objects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image

Position = Literal["uniform", "ground"]
MAX_INSTANCES = 255  # instance labels are stored as an 8-bit PNG


class LayoutError(ValueError):
    """An object that cannot be placed on a background at all (a bad input, not bad luck)."""


@dataclass(frozen=True)
class LayoutRules:
    per_background: int = 1  # composites made from each background
    min_objects: int = 1  # objects per composite: uniform in [min_objects, max_objects]
    max_objects: int = 1
    scale: tuple[float, float] = (0.3, 0.6)  # pasted height / background height
    position: Position = "uniform"
    horizon: float = 0.5  # "ground": bottom edges lie below this fraction of the height
    keep_inside: bool = True
    max_overlap: float = 0.3  # largest fraction of a placed object that later ones may hide
    flip: float = 0.5  # probability of a horizontal flip
    attempts: int = 20  # positions tried per object before it is left out

    def problems(self) -> list[str]:
        """What is wrong with these rules (empty when they are usable), for the CLI."""
        found = []
        if self.per_background < 1:
            found.append("--per-background must be at least 1")
        if not 1 <= self.min_objects <= self.max_objects <= MAX_INSTANCES:
            found.append(f"need 1 <= --min-objects <= --max-objects <= {MAX_INSTANCES}")
        low, high = self.scale
        if not 0 < low <= high:
            found.append(f"--scale {low} {high}: need 0 < MIN <= MAX")
        elif self.keep_inside and low > 1:
            found.append(f"--scale {low} {high}: with --keep-inside, MIN must be at most 1")
        if self.position not in ("uniform", "ground"):
            found.append(f"--position {self.position!r}: uniform or ground")
        if not 0 <= self.horizon < 1:
            found.append(f"--horizon {self.horizon}: need 0 <= HORIZON < 1")
        if not 0 <= self.max_overlap < 1:
            found.append(f"--max-overlap {self.max_overlap}: need 0 <= MAX_OVERLAP < 1")
        if not 0 <= self.flip <= 1:
            found.append(f"--flip {self.flip}: a probability, 0 to 1")
        if self.attempts < 1:
            found.append("--attempts must be at least 1")
        return found


@dataclass(frozen=True)
class Cutout:
    """An object's pixels cropped to its mask's box: rgb (h, w, 3) uint8, mask (h, w) bool;
    `name` says which object in messages."""

    rgb: np.ndarray
    mask: np.ndarray
    name: str = "object"


def cut_out(rgb: np.ndarray, mask: np.ndarray, name: str = "object") -> Cutout:
    """Crop an object image and its binary mask to the mask's box (raises on an empty mask)."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise LayoutError(f"{name}: mask is empty (no foreground pixel)")
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    return Cutout(rgb[y0:y1, x0:x1].copy(), mask[y0:y1, x0:x1].astype(bool), name)


@dataclass(frozen=True)
class Placement:
    """One object on the background: pasted size, top-left corner (may be outside), flip."""

    index: int  # the object's position in the composite's list of drawn objects
    x: int
    y: int
    width: int
    height: int
    scale: float
    flip: bool


@dataclass(frozen=True)
class Instance:
    """A pasted object as the finished composite shows it (COCO conventions)."""

    label: int  # its value in the label map
    index: int  # which drawn object
    bbox: tuple[float, float, float, float]  # x, y, width, height of its visible pixels
    area: int  # visible pixels
    visible: float  # visible pixels / its pixels inside the background


def draw_objects(
    rng: np.random.Generator, rules: LayoutRules, pool: int, excluded: frozenset[int] = frozenset()
) -> list[int]:
    """How many objects and which: indices into a pool of `pool` objects, never one of
    `excluded` (objects cut from this very background), distinct while the pool allows."""
    count = int(rng.integers(rules.min_objects, rules.max_objects + 1))
    allowed = np.setdiff1d(np.arange(pool), list(excluded)) if excluded else np.arange(pool)
    if allowed.size == 0:
        raise LayoutError("no object to paste: every object was cut from this background")
    if count <= allowed.size:
        return [int(i) for i in rng.choice(allowed, size=count, replace=False)]
    return [int(i) for i in rng.choice(allowed, size=count, replace=True)]


def scale_range(
    cutout_size: tuple[int, int],
    background_size: tuple[int, int],
    rules: LayoutRules,
    name: str = "object",
) -> tuple[float, float]:
    """The scales this object may take on this background ((h, w) sizes); `LayoutError` when
    none keeps it inside."""
    (h, w), (height, width) = cutout_size, background_size
    low, high = rules.scale
    if rules.keep_inside:
        # Pasted width = scale * height_bg * w / h must fit the background's width (and the
        # pasted height the background's: scale <= 1).
        fits = min(1.0, width * h / (height * w))
        if fits < low:
            raise LayoutError(
                f"{name} ({w}x{h}) is larger than the background ({width}x{height}): at the "
                f"smallest scale {low:g} it would be {low * height * w / h:.0f} px wide; "
                "it fits only at scales up to "
                f"{fits:.3g} (--scale, or --no-keep-inside)"
            )
        high = min(high, fits)
    return low, high


def pasted_size(
    cutout_size: tuple[int, int], background_height: int, scale: float
) -> tuple[int, int]:
    """(height, width) of the pasted object, at least 1 px each."""
    h, w = cutout_size
    height = max(1, round(scale * background_height))
    return height, max(1, round(height * w / h))


def draw_position(
    rng: np.random.Generator, rules: LayoutRules, size: tuple[int, int], background: tuple[int, int]
) -> tuple[int, int]:
    """Top-left corner (x, y) of an object of `size` (h, w) on a background of (H, W)."""
    (h, w), (height, width) = size, background
    if rules.keep_inside:
        x = int(rng.integers(0, width - w + 1))
    else:
        x = int(rng.integers(0, width)) - w // 2  # centre anywhere on the background
    if rules.position == "ground":
        lowest = int(np.ceil(rules.horizon * height))
        if rules.keep_inside:
            lowest = max(lowest, h)  # the top stays inside
        bottom = int(rng.integers(min(lowest, height), height + 1))
        return x, bottom - h
    if rules.keep_inside:
        return x, int(rng.integers(0, height - h + 1))
    return x, int(rng.integers(0, height)) - h // 2


def resized(cutout: Cutout, height: int, width: int, flip: bool) -> tuple[np.ndarray, np.ndarray]:
    """The cut-out at (height, width): RGB by Lanczos, the mask resampled as grey levels
    (bilinear) and cut at half, so that its edge follows the object's rather than a nearest-
    neighbour staircase; then mirrored when `flip`."""
    rgb = Image.fromarray(cutout.rgb).resize((width, height), Image.Resampling.LANCZOS)
    grey = Image.fromarray(cutout.mask.astype(np.uint8) * 255)
    mask = np.asarray(grey.resize((width, height), Image.Resampling.BILINEAR)) >= 128
    pixels = np.asarray(rgb)
    if flip:
        pixels, mask = pixels[:, ::-1], mask[:, ::-1]
    return np.ascontiguousarray(pixels), np.ascontiguousarray(mask)


def _window(
    x: int, y: int, h: int, w: int, height: int, width: int
) -> tuple[slice, slice, slice, slice] | None:
    """Where an (h, w) patch at (x, y) meets the background: background and patch slices."""
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, width), min(y + h, height)
    if x0 >= x1 or y0 >= y1:
        return None
    return slice(y0, y1), slice(x0, x1), slice(y0 - y, y1 - y), slice(x0 - x, x1 - x)


@dataclass(frozen=True)
class Pasted:
    """A placed object's pixels at its pasted size (flip applied): rgb (h, w, 3), mask (h, w)."""

    placement: Placement
    rgb: np.ndarray
    mask: np.ndarray


def layout(
    rng: np.random.Generator,
    rules: LayoutRules,
    cutouts: list[Cutout],
    background_size: tuple[int, int],
) -> tuple[list[Pasted], list[int]]:
    """Place `cutouts` (in order) on a background of (H, W): the placed objects, bottom to
    top, and the indices of those left out because no position kept the overlap rule.
    Raises `LayoutError` for an object that fits at no scale."""
    height, width = background_size
    labels = np.zeros(background_size, np.uint8)
    full: list[int] = []  # each placed object's pixels inside the background
    hidden: list[int] = []  # ... and how many of them later objects cover
    placed: list[Pasted] = []
    dropped: list[int] = []
    for index, cutout in enumerate(cutouts):
        low, high = scale_range(cutout.mask.shape, background_size, rules, cutout.name)
        scale = float(rng.uniform(low, high))
        flip = bool(rng.random() < rules.flip)
        h, w = pasted_size(cutout.mask.shape, height, scale)
        if rules.keep_inside:  # rounding may overshoot the largest scale that fits by a pixel
            h, w = min(h, height), min(w, width)
        rgb, mask = resized(cutout, h, w, flip)
        if not mask.any():
            raise LayoutError(
                f"{cutout.name} is empty at {w}x{h} px (scale {scale:.3g}): too small"
            )
        for _ in range(rules.attempts):
            x, y = draw_position(rng, rules, (h, w), background_size)
            window = _window(x, y, h, w, height, width)
            if window is None:
                continue
            rows, cols, patch_rows, patch_cols = window
            covered = mask[patch_rows, patch_cols]
            inside = int(covered.sum())
            if inside == 0:
                continue
            under = np.bincount(labels[rows, cols][covered], minlength=len(full) + 1)
            if any(
                hidden[j] + under[j + 1] > rules.max_overlap * full[j] for j in range(len(full))
            ):
                continue
            for j in range(len(full)):
                hidden[j] += int(under[j + 1])
            labels[rows, cols][covered] = len(full) + 1  # a view: writes into `labels`
            full.append(inside)
            hidden.append(0)
            placed.append(Pasted(Placement(index, x, y, w, h, scale, flip), rgb, mask))
            break
        else:
            dropped.append(index)
    return placed, dropped


def paste(
    background: np.ndarray, placed: list[Pasted]
) -> tuple[np.ndarray, np.ndarray, list[Instance]]:
    """The composite, its instance label map and the instances' annotations.

    Pixels are copied as they are (a hard mask, no feathering): the foreground mask
    (`labels > 0`) is exactly the set of pasted pixels, which is what harmonization changes.
    """
    height, width = background.shape[:2]
    composite = background.copy()
    labels = np.zeros((height, width), np.uint8)
    inside = []
    for label, pasted in enumerate(placed, start=1):
        p = pasted.placement
        window = _window(p.x, p.y, p.height, p.width, height, width)
        assert window is not None  # `layout` keeps only placements that show
        rows, cols, patch_rows, patch_cols = window
        covered = pasted.mask[patch_rows, patch_cols]
        composite[rows, cols][covered] = pasted.rgb[patch_rows, patch_cols][covered]
        labels[rows, cols][covered] = label
        inside.append(int(covered.sum()))
    instances = []
    for label, (pasted, total) in enumerate(zip(placed, inside), start=1):
        box, area = box_and_area(labels == label)
        instances.append(Instance(label, pasted.placement.index, box, area, area / total))
    return composite, labels, instances


def box_and_area(mask: np.ndarray) -> tuple[tuple[float, float, float, float], int]:
    """COCO box (x, y, width, height) of a binary mask's pixels, and their count."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return (0.0, 0.0, 0.0, 0.0), 0
    box = (float(cols[0]), float(rows[0]), float(cols[-1] - cols[0] + 1),
           float(rows[-1] - rows[0] + 1))  # fmt: skip
    return box, int(mask.sum())
