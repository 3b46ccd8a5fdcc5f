"""deeplab2's MaX-DeepLab preprocessing (`data/preprocessing/input_preprocessing.py`).

Described in docs/deeplab2.md#data-pipeline.

Training, in deeplab2's order:
1. resize so the longer side equals the crop size S (aspect kept, sizes floored in deeplab2's
   float32 arithmetic, `resized_sizes`); the image with bilinear align-corners, the label with
   nearest align-corners;
2. random scale from a float32 linspace(min, max, ...) (0.5 .. 1.5 in steps of 0.1), new size
   int(float32(size) * scale), same interpolation;
3. pad to at least S x S at a random offset, the image with 127.5 (0 after normalisation), the
   label with void (0);
4. random S x S crop; horizontal flip with p = 0.5.
Evaluation: the same resize, then pad bottom/right to S x S; `undo_eval_resize` crops the resized
region back out and nearest-resizes (align corners) to the raw size before PQ.

Labels are COCO panoptic segment-id maps (H x W int64): nearest resizing keeps ids intact, so the
targets are built after augmentation, as deeplab2's sample generator does. Images are read as
H x W x 3 uint8 and transformed as 3 x H x W float32 tensors in [0, 255]; the model applies
deeplab2's normalisation x / 127.5 - 1 itself (`models/network.py`), mapping the pad to 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

PAD_IMAGE_VALUE = 127.5  # deeplab2 pads with the mean pixel, 0 after the model's normalisation
PAD_LABEL_VALUE = 0  # void


def resized_sizes(
    heights: np.ndarray, widths: np.ndarray, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """deeplab2's `resize_to_range_helper` with min = max = `size`, on arrays of image sizes.

    deeplab2 (`data/preprocessing/preprocess_utils.py`) scales twice, each time by a factor
    computed in float64 (`size / side` on int32 tensors), cast to float32, and applied to each side
    as `floor(float32(side) * factor)`: first so that the shorter side reaches `size`, then, the
    longer side now exceeding it, so that the longer side is at most `size` (the factor capped at
    1). The float32 steps are reproduced exactly: they make e.g. 640 x 480 become 641 x 481 at 641
    (not 641 x 480), and in a few sizes leave the longer side at `size - 1`.

    Args:
        heights, widths: integer arrays of the same shape, every side >= 1.
        size: the crop side S (`min_resize_value = max_resize_value = S`).

    Returns:
        (heights, widths) after the resize, int64 arrays of the input shape.
    """
    shape = (np.asarray(heights, np.int64), np.asarray(widths, np.int64))
    to_min = np.maximum(size / shape[0], size / shape[1]).astype(np.float32)
    shape = _scale_sides(shape, to_min)
    to_max = np.minimum(size / shape[0], size / shape[1]).astype(np.float32)
    height, width = _scale_sides(shape, np.minimum(to_max, np.float32(1.0)))
    # A side of 0 (an image hundreds of times wider than tall) would fail in deeplab2 too.
    return np.maximum(height, 1), np.maximum(width, 1)


def _scale_sides(
    sides: tuple[np.ndarray, np.ndarray], factor: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """deeplab2's `_scale_dim` on both sides: floor(float32(side) * float32 factor)."""
    height, width = (np.floor(side.astype(np.float32) * factor).astype(np.int64) for side in sides)
    return height, width


def resized_size(height: int, width: int, size: int) -> tuple[int, int]:
    """The (height, width) of one image after deeplab2's resize to `size` (see `resized_sizes`)."""
    h, w = resized_sizes(np.array(height), np.array(width), size)
    return int(h), int(w)


def scale_choices(min_scale: float, max_scale: float, step: float) -> np.ndarray:
    """deeplab2's `get_random_scale` choices: float32 `linspace(min, max, int((max - min) / step
    + 1))` as TensorFlow computes it, `min + i * delta` in float32 with the last value exactly max.

    A single value (min) when min == max; deeplab2 draws uniformly from [min, max) when step is 0,
    which is not supported here (also a single value).
    """
    start, stop = np.float32(min_scale), np.float32(max_scale)
    if step <= 0 or max_scale <= min_scale:
        return np.array([start], dtype=np.float32)
    count = int((max_scale - min_scale) / step + 1)  # truncated, as deeplab2 does
    if count < 2:
        return np.array([start], dtype=np.float32)
    delta = (stop - start) / np.float32(count - 1)
    values = start + np.arange(count - 1, dtype=np.float32) * delta
    return np.append(values, stop).astype(np.float32)


def scaled_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """deeplab2's random-scale size: int32(float32(side) * float32(scale)) (truncation = floor).

    Sizes are kept >= 1 (deeplab2 would fail on an empty image).
    """
    factor = np.float32(scale)
    return (
        max(int(np.float32(height) * factor), 1),
        max(int(np.float32(width) * factor), 1),
    )


def nearest_indices(size_in: int, size_out: int) -> np.ndarray:
    """Source indices of a nearest align-corners resize: round(i * (in - 1) / (out - 1)).

    TF1's `resize_nearest_neighbor(align_corners=True)` rounds half away from zero; the indices are
    computed with integers so that half-way cases are exact.
    """
    if size_out == 1 or size_in == 1:
        return np.zeros(size_out, dtype=np.int64)
    i = np.arange(size_out, dtype=np.int64)
    return (2 * i * (size_in - 1) + (size_out - 1)) // (2 * (size_out - 1))


def resize_label(label: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest align-corners resize of an H x W label to height x width."""
    if label.shape == (height, width):
        return label
    rows = nearest_indices(label.shape[0], height)
    cols = nearest_indices(label.shape[1], width)
    return label[rows[:, None], cols[None, :]]


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """H x W x 3 uint8 (or float) -> 3 x H x W float32 in [0, 255], contiguous."""
    if not image.flags.writeable:  # PIL-backed arrays are read-only; torch wants writable memory
        image = image.copy()
    chw = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    return chw.to(torch.float32, memory_format=torch.contiguous_format)


def resize_image(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear align-corners resize of a 3 x H x W float image to 3 x height x width."""
    if tuple(image.shape[1:]) == (height, width):
        return image
    resized = F.interpolate(
        image.unsqueeze(0), size=(height, width), mode="bilinear", align_corners=True
    )
    return resized[0]


def pad_to(
    image: torch.Tensor, label: np.ndarray, height: int, width: int, top: int, left: int
) -> tuple[torch.Tensor, np.ndarray]:
    """Place image (3 x h x w) and label (h x w) at (top, left) on a height x width canvas.

    The image is padded with 127.5, the label with void (0).
    """
    h, w = label.shape
    if (h, w) == (height, width):
        return image, label
    out_image = torch.full((3, height, width), PAD_IMAGE_VALUE, dtype=torch.float32)
    out_label = np.full((height, width), PAD_LABEL_VALUE, dtype=label.dtype)
    out_image[:, top : top + h, left : left + w] = image
    out_label[top : top + h, left : left + w] = label
    return out_image, out_label


@dataclass(frozen=True)
class AugmentParams:
    """The random draws of one training sample (recorded for tests and debugging)."""

    scale: float
    pad_top: int
    pad_left: int
    crop_top: int
    crop_left: int
    flip: bool


@dataclass(frozen=True)
class TrainTransform:
    """deeplab2's training augmentation to an S x S crop.

    Attributes:
        crop_size: S.
        scales: the random-scale choices, e.g. `scale_choices(0.5, 1.5, 0.1)`.
        flip_prob: probability of a horizontal flip (0.5 in deeplab2).
    """

    crop_size: int
    scales: tuple[float, ...] = field(
        default_factory=lambda: tuple(float(s) for s in scale_choices(0.5, 1.5, 0.1))
    )
    flip_prob: float = 0.5

    def __call__(
        self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator
    ) -> tuple[torch.Tensor, np.ndarray, AugmentParams]:
        """Augment one sample.

        Args:
            image: H x W x 3 uint8 (or float) in [0, 255].
            label: H x W integer labels (0 = void), e.g. segment ids.
            rng: the sample's generator; the draws are made in a fixed order.

        Returns:
            image 3 x S x S float32 in [0, 255], label S x S (same dtype), the draws made.
        """
        S = self.crop_size
        h, w = resized_size(label.shape[0], label.shape[1], S)
        pixels = resize_image(image_to_tensor(image), h, w)
        label = resize_label(label, h, w)

        scale = float(self.scales[int(rng.integers(len(self.scales)))])
        h, w = scaled_size(h, w, scale)
        pixels, label = resize_image(pixels, h, w), resize_label(label, h, w)

        padded_h, padded_w = max(h, S), max(w, S)
        pad_top = int(rng.integers(padded_h - h + 1))
        pad_left = int(rng.integers(padded_w - w + 1))
        pixels, label = pad_to(pixels, label, padded_h, padded_w, pad_top, pad_left)

        crop_top = int(rng.integers(padded_h - S + 1))
        crop_left = int(rng.integers(padded_w - S + 1))
        rows, cols = slice(crop_top, crop_top + S), slice(crop_left, crop_left + S)
        pixels, label = pixels[:, rows, cols], label[rows, cols]

        flip = bool(rng.random() < self.flip_prob)
        if flip:
            pixels, label = pixels.flip(2), label[:, ::-1]
        params = AugmentParams(scale, pad_top, pad_left, crop_top, crop_left, flip)
        return pixels.contiguous(), np.ascontiguousarray(label), params


@dataclass(frozen=True)
class EvalTransform:
    """deeplab2's evaluation preprocessing: resize (longer side S), pad bottom/right to S x S."""

    crop_size: int

    def __call__(
        self, image: np.ndarray, label: np.ndarray | None = None
    ) -> tuple[torch.Tensor, np.ndarray | None, tuple[int, int]]:
        """image H x W x 3 [, label H x W] -> image 3 x S x S float32 in [0, 255], label S x S
        (or None) and the resized (h, w)."""
        S = self.crop_size
        h, w = resized_size(image.shape[0], image.shape[1], S)
        pixels = resize_image(image_to_tensor(image), h, w)
        if label is None:
            padded, _ = pad_to(pixels, np.zeros((h, w), np.int64), S, S, 0, 0)
            return padded, None, (h, w)
        padded, padded_label = pad_to(pixels, resize_label(label, h, w), S, S, 0, 0)
        return padded, padded_label, (h, w)


def undo_eval_resize(
    label: np.ndarray | torch.Tensor, resized: tuple[int, int], raw: tuple[int, int]
) -> np.ndarray | torch.Tensor:
    """Invert `EvalTransform` on a label or prediction (deeplab2's `undo_preprocessing`).

    Args:
        label: S x S (numpy or torch, any integer dtype).
        resized: the (h, w) the image was resized to before padding.
        raw: the raw image's (H, W).

    Returns:
        H x W, same type and dtype: the top-left h x w region, nearest-resized (align corners).
    """
    h, w = resized
    cropped = label[:h, :w]
    rows = nearest_indices(h, raw[0])
    cols = nearest_indices(w, raw[1])
    if isinstance(cropped, torch.Tensor):
        r = torch.from_numpy(rows).to(cropped.device)
        c = torch.from_numpy(cols).to(cropped.device)
        return cropped[r[:, None], c[None, :]]
    return cropped[rows[:, None], cols[None, :]]
