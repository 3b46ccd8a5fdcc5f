"""Prediction figures: enlarged small panels, the prediction blended over the image, a legend."""

from __future__ import annotations

import numpy as np
import pytest

from maxdeeplab.platform.visualize import (
    GAP,
    LEGEND_ROW,
    LEGEND_WIDTH,
    MIN_PANEL_SIDE,
    blend,
    class_palette,
    draw_legend,
    legend_entries,
    panoptic_figure,
    upscale_factor,
    upscale_nearest,
)

NAMES = ["disc", "box", "sky"]
DIVISOR = 1000


def _scene() -> tuple[np.ndarray, np.ndarray]:
    """A 40 x 60 image and its panoptic ids: sky (3) left, two discs (1) right, a void strip."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(40, 60, 3), dtype=np.uint8)
    panoptic = np.full((40, 60), 3 * DIVISOR, dtype=np.int64)
    panoptic[:, 30:45] = 1 * DIVISOR + 1
    panoptic[:, 45:] = 1 * DIVISOR + 2
    panoptic[:5] = 0
    return image, panoptic


@pytest.mark.parametrize(("h", "w", "k"), [(40, 60, 7), (256, 300, 1), (255, 999, 2), (1, 1, 256)])
def test_upscale_factor_brings_the_shorter_side_to_the_minimum(h, w, k):
    assert upscale_factor(h, w) == k
    assert min(h, w) * k >= MIN_PANEL_SIDE > min(h, w) * (k - 1)


def test_upscale_nearest_repeats_each_pixel():
    small = np.arange(6).reshape(2, 3)
    big = upscale_nearest(small, 2)
    assert big.shape == (4, 6)
    assert np.array_equal(big[::2, ::2], small) and np.array_equal(big[1::2, 1::2], small)


def test_blend_mixes_only_where_masked():
    image = np.full((2, 2, 3), 100, np.uint8)
    colours = np.full((2, 2, 3), 200, np.uint8)
    mask = np.array([[True, False], [False, True]])
    out = blend(image, colours, mask, 0.25)
    assert out[0, 0].tolist() == [125] * 3 and out[0, 1].tolist() == [100] * 3
    assert np.array_equal(blend(image, colours, mask, 1.0)[mask], colours[mask])
    with pytest.raises(ValueError, match="alpha"):
        blend(image, colours, mask, 1.5)


def test_figure_panels_input_blend_and_legend():
    image, panoptic = _scene()
    figure = panoptic_figure(image, panoptic, label_divisor=DIVISOR, class_names=NAMES, alpha=0.5)
    k = upscale_factor(40, 60)
    assert figure.shape == (40 * k, 2 * 60 * k + 2 * GAP + LEGEND_WIDTH, 3)
    assert np.array_equal(figure[::k, : 60 * k : k], image)  # the input, untouched
    overlay = figure[:, 60 * k + GAP : 2 * 60 * k + GAP]
    assert np.array_equal(overlay[: 5 * k], figure[: 5 * k, : 60 * k])  # void shows the image
    sky = class_palette(len(NAMES))[3].astype(float)
    inner = overlay[20 * k, 10 * k].astype(float)  # inside the sky, away from edges
    assert np.allclose(inner, 0.5 * image[20, 10] + 0.5 * sky, atol=1)


def test_legend_names_the_classes_present():
    _, panoptic = _scene()
    entries = legend_entries(panoptic, label_divisor=DIVISOR, class_names=NAMES)
    assert entries == [(1, "disc"), (3, "sky")]
    legend = draw_legend(entries, height=MIN_PANEL_SIDE, num_classes=len(NAMES))
    assert legend.shape == (MIN_PANEL_SIDE, LEGEND_WIDTH, 3)
    dark = (legend < 64).all(axis=2)
    assert dark[:LEGEND_ROW, 30:].any() and dark[LEGEND_ROW : 2 * LEGEND_ROW, 30:].any()  # text
    assert not dark[2 * LEGEND_ROW :].any()  # nothing below the two entries


def test_legend_that_overflows_ends_in_a_count():
    entries = [(1, "disc")] * 10
    full = draw_legend(entries, height=3 * LEGEND_ROW, num_classes=1)
    dark = (full < 64).all(axis=2)
    assert dark[2 * LEGEND_ROW :, 30:].any()  # the "+8 more" line
    assert not dark[2 * LEGEND_ROW :, :20].any()  # which has no colour square
