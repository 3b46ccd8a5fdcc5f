"""Colourised panoptic predictions for MLflow artifacts: each segment a colour, beside its image."""

from __future__ import annotations

import numpy as np

PALETTE_SEED = 1234  # fixed, so a class keeps its hue across images and runs


def class_palette(num_classes: int) -> np.ndarray:
    """(num_classes + 1) x 3 uint8 colours per contiguous semantic id; id 0 (void) is black."""
    rng = np.random.default_rng(PALETTE_SEED)
    palette = rng.integers(64, 256, size=(num_classes + 1, 3), dtype=np.int64)
    palette[0] = 0
    return palette.astype(np.uint8)


def colorize_panoptic(panoptic: np.ndarray, *, label_divisor: int, num_classes: int) -> np.ndarray:
    """H x W panoptic ids (semantic * divisor + instance, 0 void) -> H x W x 3 uint8.

    A segment takes its class colour, shifted per instance so touching instances of one class stay
    distinguishable; instance boundaries are darkened.
    """
    semantic = np.clip(panoptic // label_divisor, 0, num_classes)
    instance = panoptic % label_divisor
    palette = class_palette(num_classes).astype(np.int64)
    shift = ((instance * 37) % 61 - 30)[..., None]  # a deterministic per-instance offset
    rgb = palette[semantic] + np.where(instance[..., None] > 0, shift, 0)
    edges = np.zeros(panoptic.shape, dtype=bool)
    edges[1:, :] |= panoptic[1:, :] != panoptic[:-1, :]
    edges[:, 1:] |= panoptic[:, 1:] != panoptic[:, :-1]
    rgb[edges] //= 2
    rgb[semantic == 0] = 0
    return np.clip(rgb, 0, 255).astype(np.uint8)


def side_by_side(image: np.ndarray, prediction: np.ndarray) -> np.ndarray:
    """Two H x W x 3 uint8 images joined horizontally with a 4-pixel white gap."""
    gap = np.full((image.shape[0], 4, 3), 255, dtype=np.uint8)
    return np.concatenate([image, gap, prediction], axis=1)
