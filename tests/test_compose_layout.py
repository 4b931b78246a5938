"""Placement rules and annotations of copy-paste (`pipeline/compose/layout.py`), on synthetic
arrays; boxes and areas checked against pycocotools."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from pipeline.compose.layout import (
    Cutout,
    LayoutError,
    LayoutRules,
    cut_out,
    draw_objects,
    layout,
    paste,
    resized,
)

BACKGROUND = (64, 96)  # H, W


def ellipse(h: int, w: int, seed: int = 0, name: str = "object") -> Cutout:
    """A textured object: random colours inside an ellipse filling an (h, w) image with a
    border of 3 px (so that cut_out has something to crop)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: h + 6, : w + 6]
    inside = ((yy - (h + 5) / 2) / (h / 2)) ** 2 + ((xx - (w + 5) / 2) / (w / 2)) ** 2 <= 1
    rgb = rng.integers(0, 256, (h + 6, w + 6, 3), dtype=np.uint8)
    return cut_out(rgb, inside, name)


def background(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*BACKGROUND, 3), dtype=np.uint8)


def run(rules: LayoutRules, cutouts: list[Cutout], seed: int):
    rng = np.random.default_rng(seed)
    placed, dropped = layout(rng, rules, cutouts, BACKGROUND)
    composite, labels, instances = paste(background(), placed)
    return placed, dropped, composite, labels, instances


def in_image_mask(p, mask: np.ndarray) -> np.ndarray:
    """The pasted object's full mask on the background canvas (before occlusion)."""
    canvas = np.zeros((BACKGROUND[0] + 2 * p.height, BACKGROUND[1] + 2 * p.width), bool)
    canvas[p.y + p.height : p.y + 2 * p.height, p.x + p.width : p.x + 2 * p.width] = mask
    return canvas[p.height : p.height + BACKGROUND[0], p.width : p.width + BACKGROUND[1]]


def test_keep_inside_and_scale_range() -> None:
    rules = LayoutRules(scale=(0.2, 0.5), keep_inside=True, flip=0.5)
    cutout = ellipse(30, 20)
    heights = []
    for seed in range(150):
        placed, dropped, _, _labels, instances = run(rules, [cutout], seed)
        assert not dropped and len(placed) == 1
        p = placed[0].placement
        assert 0 <= p.x and p.x + p.width <= BACKGROUND[1]
        assert 0 <= p.y and p.y + p.height <= BACKGROUND[0]
        assert 0.2 <= p.scale <= 0.5 and p.height == round(p.scale * BACKGROUND[0])
        assert abs(p.width - p.height * 20 / 30) <= 1  # the object's own aspect ratio
        x, y, w, h = instances[0].bbox  # the visible pixels lie within the pasted box
        assert p.x <= x and x + w <= p.x + p.width and p.y <= y and y + h <= p.y + p.height
        assert instances[0].visible == 1.0
        heights.append(p.height / BACKGROUND[0])
    assert min(heights) < 0.25 and max(heights) > 0.45  # the whole range is drawn


def test_scale_is_cut_where_a_wide_object_would_not_fit() -> None:
    wide = ellipse(10, 100)  # fits a 96 px wide background only up to scale 96 * 10 / (64 * 100)
    rules = LayoutRules(scale=(0.1, 0.5))
    for seed in range(50):
        placed, *_ = run(rules, [wide], seed)
        p = placed[0].placement
        assert p.scale <= 0.15 + 1e-9 and p.x >= 0 and p.x + p.width <= BACKGROUND[1]


def test_object_larger_than_the_background_is_an_error() -> None:
    wide = ellipse(10, 100, name="object 'plank'")
    with pytest.raises(LayoutError, match=r"object .plank. .* is larger than the background"):
        run(LayoutRules(scale=(0.3, 0.5)), [wide], 0)
    # Without keep-inside it is pasted, cut by the border.
    placed, *_ = run(LayoutRules(scale=(0.3, 0.5), keep_inside=False), [wide], 0)
    assert placed[0].placement.width > BACKGROUND[1]


def test_max_overlap_holds_in_the_finished_composite() -> None:
    cutouts = [ellipse(30, 30, seed=i) for i in range(6)]
    hidden_somewhere = dropped_somewhere = False
    for max_overlap in (0.0, 0.25):
        rules = LayoutRules(min_objects=6, max_objects=6, scale=(0.4, 0.6), max_overlap=max_overlap)
        for seed in range(40):
            placed, dropped, _, labels, instances = run(rules, cutouts, seed)
            dropped_somewhere |= bool(dropped)
            assert len(placed) + len(dropped) == 6
            for label, pasted in enumerate(placed, start=1):
                full = in_image_mask(pasted.placement, pasted.mask)
                visible = labels == label
                assert not (visible & ~full).any()  # an instance shows only its own pixels
                fraction = visible.sum() / full.sum()
                assert fraction >= 1 - max_overlap - 1e-9
                assert instances[label - 1].visible == pytest.approx(fraction)
                hidden_somewhere |= fraction < 1
    assert hidden_somewhere and dropped_somewhere  # the rule was exercised, both ways


def test_ground_position_puts_bottoms_below_the_horizon() -> None:
    rules = LayoutRules(position="ground", horizon=0.7, scale=(0.2, 0.4))
    for seed in range(100):
        placed, *_ = run(rules, [ellipse(20, 20)], seed)
        p = placed[0].placement
        assert 0.7 * BACKGROUND[0] <= p.y + p.height <= BACKGROUND[0] and p.y >= 0


def test_without_keep_inside_objects_are_centred_on_the_background_and_cut() -> None:
    rules = LayoutRules(keep_inside=False, scale=(0.5, 0.8))
    cut = 0
    for seed in range(100):
        placed, _, _, labels, _instances = run(rules, [ellipse(20, 20)], seed)
        p = placed[0].placement
        assert 0 <= p.x + p.width // 2 < BACKGROUND[1] and 0 <= p.y + p.height // 2 < BACKGROUND[0]
        cut += int((labels == 1).sum() < placed[0].mask.sum())
    assert cut > 10


def test_flip_mirrors_the_object() -> None:
    cutout = ellipse(24, 16)
    for flip, mirrored in ((1.0, True), (0.0, False)):
        placed, _, composite, labels, _ = run(LayoutRules(flip=flip), [cutout], 3)
        p = placed[0].placement
        assert p.flip is mirrored
        rgb, mask = resized(cutout, p.height, p.width, flip=False)
        if mirrored:
            rgb, mask = rgb[:, ::-1], mask[:, ::-1]
        patch = composite[p.y : p.y + p.height, p.x : p.x + p.width]
        np.testing.assert_array_equal(patch[mask], rgb[mask])
        np.testing.assert_array_equal(labels[p.y : p.y + p.height, p.x : p.x + p.width] == 1, mask)


def test_the_same_seed_gives_the_same_composite() -> None:
    rules = LayoutRules(min_objects=1, max_objects=4, scale=(0.2, 0.6))
    pool = [ellipse(20 + i, 25, seed=i) for i in range(5)]
    draws = []
    for _ in range(2):
        rng = np.random.default_rng(1234)
        picks = draw_objects(rng, rules, len(pool))
        placed, dropped = layout(rng, rules, [pool[i] for i in picks], BACKGROUND)
        composite, labels, _ = paste(background(), placed)
        draws.append((picks, [p.placement for p in placed], dropped, composite, labels))
    assert draws[0][:3] == draws[1][:3]
    np.testing.assert_array_equal(draws[0][3], draws[1][3])


def test_paste_annotations_match_pycocotools_and_pixels() -> None:
    rules = LayoutRules(min_objects=4, max_objects=4, scale=(0.3, 0.6), max_overlap=0.5)
    cutouts = [ellipse(30, 24, seed=i) for i in range(4)]
    placed, _, composite, labels, instances = run(rules, cutouts, 7)
    bg = background()
    np.testing.assert_array_equal(composite[labels == 0], bg[labels == 0])
    for instance, pasted in zip(instances, placed):
        visible = labels == instance.label
        rle = mask_utils.encode(np.asfortranarray(visible.astype(np.uint8)))
        assert instance.area == int(mask_utils.area(rle))
        assert list(instance.bbox) == [float(v) for v in mask_utils.toBbox(rle)]
        # The composite shows the resized object's own pixels where it is visible.
        p = pasted.placement
        canvas = np.zeros_like(composite)
        canvas[p.y : p.y + p.height, p.x : p.x + p.width] = pasted.rgb
        np.testing.assert_array_equal(composite[visible], canvas[visible])


def test_empty_object_mask_is_an_error() -> None:
    with pytest.raises(LayoutError, match="object 'x': mask is empty"):
        cut_out(np.zeros((5, 5, 3), np.uint8), np.zeros((5, 5), bool), "object 'x'")


def test_rules_problems() -> None:
    assert LayoutRules().problems() == []
    bad = dataclasses.replace(LayoutRules(), scale=(0.5, 0.2), max_overlap=1.0, max_objects=0)
    problems = " ".join(bad.problems())
    assert "--scale" in problems and "--max-overlap" in problems and "--max-objects" in problems
