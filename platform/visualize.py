"""Colourised panoptic predictions for MLflow artifacts and `maxdeeplab predict` overlays.

A figure is three panels side by side: the input image, the prediction blended over it (each
segment a colour, instance boundaries darkened) and a legend naming the classes present. Small
images are enlarged by an integer factor (nearest neighbour, so every pixel stays a block of the
original value) until their shorter side reaches `MIN_PANEL_SIDE`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PALETTE_SEED = 1234  # fixed, so a class keeps its hue across images and runs
MIN_PANEL_SIDE = 256  # shorter side of a panel, in pixels, below which it is enlarged
OVERLAY_ALPHA = 0.5  # opacity of the prediction over the image (`predict --alpha`)
GAP = 4  # white pixels between panels
LEGEND_WIDTH = 160
LEGEND_ROW = 16  # pixels per legend line
SWATCH = 12  # side of a legend colour square
MAX_NAME_CHARS = 22  # longer class names are cut so they fit LEGEND_WIDTH


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


def upscale_factor(height: int, width: int, min_side: int = MIN_PANEL_SIDE) -> int:
    """The smallest integer k >= 1 with min(k * height, k * width) >= min_side."""
    return max(1, -(-min_side // max(1, min(height, width))))


def upscale_nearest(array: np.ndarray, factor: int) -> np.ndarray:
    """H x W [x C] -> kH x kW [x C]: each pixel repeated factor times along both axes."""
    if factor == 1:
        return array
    return np.repeat(np.repeat(array, factor, axis=0), factor, axis=1)


def blend(image: np.ndarray, colours: np.ndarray, mask: np.ndarray, alpha: float) -> np.ndarray:
    """H x W x 3 uint8 image with `colours` (H x W x 3) drawn at opacity `alpha` where `mask`
    (H x W bool); elsewhere the image is unchanged."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    mixed = (1.0 - alpha) * image.astype(np.float32) + alpha * colours.astype(np.float32)
    out = image.copy()
    out[mask] = np.rint(mixed[mask]).clip(0, 255).astype(np.uint8)
    return out


def legend_entries(
    panoptic: np.ndarray, *, label_divisor: int, class_names: Sequence[str]
) -> list[tuple[int, str]]:
    """(contiguous id, name) of each class present in H x W panoptic ids, by id; void left out."""
    present = np.unique(panoptic // label_divisor)
    return [(int(c), class_names[c - 1]) for c in present if 1 <= c <= len(class_names)]


def draw_legend(entries: Sequence[tuple[int, str]], *, height: int, num_classes: int) -> np.ndarray:
    """height x LEGEND_WIDTH x 3 uint8: a colour square and the name per entry, one per line.

    Entries that do not fit end in a line `+N more`.
    """
    panel = Image.new("RGB", (LEGEND_WIDTH, height), (255, 255, 255))
    draw = ImageDraw.Draw(panel)
    font = ImageFont.load_default()
    palette = class_palette(num_classes)
    rows = max(1, height // LEGEND_ROW)
    shown = entries if len(entries) <= rows else entries[: rows - 1]
    for row, (class_id, name) in enumerate(shown):
        top = row * LEGEND_ROW + (LEGEND_ROW - SWATCH) // 2
        colour = tuple(int(v) for v in palette[class_id])
        draw.rectangle((4, top, 4 + SWATCH - 1, top + SWATCH - 1), fill=colour, outline=(0, 0, 0))
        draw.text(
            (8 + SWATCH, row * LEGEND_ROW + 1), name[:MAX_NAME_CHARS], fill=(0, 0, 0), font=font
        )
    if len(shown) < len(entries):
        more = f"+{len(entries) - len(shown)} more"
        draw.text((8 + SWATCH, len(shown) * LEGEND_ROW + 1), more, fill=(0, 0, 0), font=font)
    return np.asarray(panel, dtype=np.uint8).copy()


def panoptic_figure(
    image: np.ndarray,
    panoptic: np.ndarray,
    *,
    label_divisor: int,
    class_names: Sequence[str],
    alpha: float = OVERLAY_ALPHA,
) -> np.ndarray:
    """Input | prediction over the input | legend, enlarged to at least MIN_PANEL_SIDE.

    Args:
        image: H x W x 3 uint8 RGB in [0, 255].
        panoptic: H x W panoptic ids (semantic * label_divisor + instance, 0 void), semantic ids
            contiguous (1..K).
        label_divisor: as in post-processing.
        class_names: K names, the name of contiguous id c at index c - 1.
        alpha: opacity of the prediction; void pixels show the image.

    Returns:
        kH x (2 kW + LEGEND_WIDTH + 2 GAP) x 3 uint8, k = `upscale_factor(H, W)`; the first kW
        columns are the input image, each pixel a k x k block.
    """
    H, W = panoptic.shape
    if image.shape != (H, W, 3):
        raise ValueError(f"image is {image.shape}, prediction {panoptic.shape}: sizes differ")
    k = upscale_factor(H, W)
    big_image, big_ids = upscale_nearest(image, k), upscale_nearest(panoptic, k)
    num_classes = len(class_names)
    colours = colorize_panoptic(big_ids, label_divisor=label_divisor, num_classes=num_classes)
    overlay = blend(big_image, colours, big_ids // label_divisor > 0, alpha)
    entries = legend_entries(panoptic, label_divisor=label_divisor, class_names=class_names)
    legend = draw_legend(entries, height=k * H, num_classes=num_classes)
    gap = np.full((k * H, GAP, 3), 255, dtype=np.uint8)
    return np.concatenate([big_image, gap, overlay, gap, legend], axis=1)
