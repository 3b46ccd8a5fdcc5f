"""deeplab2's train/eval transforms: sizes, label/pixel alignment, void pad, determinism, undo."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from maxdeeplab.platform.data.transforms import (
    EvalTransform,
    TrainTransform,
    image_to_tensor,
    nearest_indices,
    resize_image,
    resized_size,
    resized_sizes,
    scale_choices,
    scaled_size,
    undo_eval_resize,
)

# deeplab2's own resize and random-scale sizes, recorded in TensorFlow by
# scripts/deeplab2_resize_table.py (its docstring describes the arrays).
DEEPLAB2_TABLE = Path(__file__).with_name("deeplab2_resize_table.npz")

# Label k is painted with colour COLOURS[k]; every colour is > 128 so no blend equals the 127.5 pad.
COLOURS = np.array(
    [
        [200, 200, 200],
        [140, 250, 160],
        [250, 140, 210],
        [170, 190, 250],
        [230, 230, 140],
        [150, 150, 240],
    ],
    dtype=np.float32,
)


def blocks(height: int, width: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A label of random rectangles (ids 1..5, no void) and its image (colour = COLOURS[id])."""
    rng = np.random.default_rng(seed)
    label = np.ones((height, width), dtype=np.int32)
    for k in range(2, 6):
        y0, x0 = rng.integers(0, height - 4), rng.integers(0, width - 4)
        label[
            y0 : y0 + rng.integers(4, height // 2 + 5), x0 : x0 + rng.integers(4, width // 2 + 5)
        ] = k
    return COLOURS[label].astype(np.uint8), label


def interior(label: np.ndarray, radius: int) -> np.ndarray:
    """Pixels whose (2r+1)^2 neighbourhood carries one label: bilinear (image) and nearest (label)
    agree there; near an edge they differ by up to one source pixel, scaled by the upsampling."""
    padded = np.pad(label, radius, constant_values=-1)  # unknown beyond the crop
    same = np.ones(label.shape, dtype=bool)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            same &= padded[dy : dy + label.shape[0], dx : dx + label.shape[1]] == label
    return same


def test_resized_size_is_deeplab2s_float32_two_step_resize() -> None:
    # The shorter side is scaled to S first, then the longer one, each floored in float32.
    assert resized_size(480, 640, 641) == (481, 641)  # not 480 x 641
    assert resized_size(640, 427, 641) == (641, 428)
    assert resized_size(98, 375, 641) == (167, 640)  # float32 leaves the longer side at 640
    assert resized_size(321, 321, 129) == (129, 129)
    assert resized_size(10, 20, 1025) == (512, 1025)


def test_resized_sizes_match_deeplab2_table() -> None:
    table = np.load(DEEPLAB2_TABLE)
    shorter, longer = np.meshgrid(
        np.arange(1, table["resized_shorter"].shape[-1] + 1), table["longer"]
    )
    for k, crop in enumerate(table["crops"].tolist()):
        valid = table["resized_shorter"][k] >= 0
        expected = (table["resized_shorter"][k][valid], table["resized_longer"][k][valid])
        landscape = resized_sizes(shorter[valid], longer[valid], crop)
        portrait = resized_sizes(longer[valid], shorter[valid], crop)
        for ours, theirs in zip((*landscape, *portrait[::-1]), expected * 2, strict=True):
            mismatched = int((ours != theirs).sum())
            assert mismatched == 0, (crop, mismatched)


def test_scale_choices_are_deeplab2s() -> None:
    table = np.load(DEEPLAB2_TABLE)
    choices = scale_choices(0.5, 1.5, 0.1)
    assert choices.dtype == np.float32
    np.testing.assert_array_equal(choices, table["scales"])  # float32 1.3 is 1.29999995
    assert scale_choices(1.0, 1.0, 0.1).tolist() == [1.0]
    # deeplab2 truncates the count: (0.7 - 0.5) / 0.1 + 1 = 2.9999999999999996 -> 2 values.
    np.testing.assert_array_equal(scale_choices(0.5, 0.7, 0.1), np.float32([0.5, 0.7]))


def test_scaled_sizes_match_deeplab2_table() -> None:
    table = np.load(DEEPLAB2_TABLE)
    heights = np.arange(2, 2 + len(table["scaled"]))
    ours = [[scaled_size(h, 1, float(s))[0] for s in table["scales"]] for h in heights]
    np.testing.assert_array_equal(ours, table["scaled"])
    assert scaled_size(90, 170, float(table["scales"][8])) == (116, 220)  # x 1.29999995, not 1.3


def test_nearest_is_align_corners_rounding_half_up() -> None:
    assert nearest_indices(3, 5).tolist() == [0, 1, 1, 2, 2]  # 0, .5, 1, 1.5, 2
    assert nearest_indices(5, 3).tolist() == [0, 2, 4]
    assert nearest_indices(7, 1).tolist() == [0]


def test_bilinear_is_align_corners() -> None:
    ramp = np.tile(np.arange(5, dtype=np.float32) * 10, (3, 1))[..., None].repeat(3, axis=2)
    out = resize_image(image_to_tensor(ramp), 3, 9)
    np.testing.assert_allclose(out[0, 0].numpy(), np.arange(9) * 5.0, atol=1e-4)


@pytest.mark.parametrize("raw", [(20, 30), (97, 129), (60, 300), (200, 150)])
def test_train_crop_is_s_by_s_aligned_and_pads_void(raw: tuple[int, int]) -> None:
    S = 65
    transform = TrainTransform(S)
    image, label = blocks(*raw, seed=sum(raw))
    seen_pad, seen_flip, checked = False, set(), 0
    for seed in range(12):
        out_image, out_label, params = transform(image, label, np.random.default_rng(seed))
        assert tuple(out_image.shape) == (3, S, S) and out_label.shape == (S, S)
        assert out_label.dtype == label.dtype
        pixels = out_image.permute(1, 2, 0).numpy()
        pad = (pixels == 127.5).all(axis=2)
        np.testing.assert_array_equal(out_label == 0, pad)  # pad <=> void (raw has no void)
        seen_pad |= bool(pad.any())
        seen_flip.add(params.flip)
        # Every label keeps its colour: away from edges the pixel is exactly the label's colour.
        # two resizes: blends reach about one intermediate pixel (scale output px) past an edge
        radius = int(np.ceil(max(S / max(raw), 1.0) * params.scale)) + 2
        inside = interior(out_label, radius) & (out_label > 0)
        checked += int(inside.sum())
        np.testing.assert_allclose(pixels[inside], COLOURS[out_label[inside]], atol=0.01)
        # Scaled-down images lose ids only to the resize, never invent them.
        assert set(np.unique(out_label)) <= set(np.unique(label)) | {0}
    assert seen_pad and seen_flip == {True, False} and checked > 1000


@pytest.mark.parametrize("raw", [(65, 33), (33, 65)])
def test_exact_alignment_through_resize_and_random_pad(raw: tuple[int, int]) -> None:
    """With the longer side already S nothing is interpolated, so every non-pad
    pixel must carry exactly its label's colour (an off-by-one pad/flip would break this)."""
    S = 65
    image, label = blocks(*raw, seed=7)
    offsets = set()
    for seed in range(10):
        out_image, out_label, params = TrainTransform(S, scales=(1.0,))(
            image, label, np.random.default_rng(seed)
        )
        pixels = out_image.permute(1, 2, 0).numpy()
        pad = out_label == 0
        assert pad.sum() == S * S - 33 * 65
        assert (pixels[pad] == 127.5).all()
        np.testing.assert_allclose(pixels[~pad], COLOURS[out_label[~pad]], atol=1e-3)
        offsets.add((params.pad_top, params.pad_left, params.flip))
    assert len(offsets) > 3


def test_painted_object_keeps_its_id_through_flip() -> None:
    S = 129
    label = np.full((S, S), 1, np.int32)
    label[10:40, 5:30] = 7  # an object on the left
    image = COLOURS[np.where(label == 7, 2, 1)].astype(np.uint8)
    transform = TrainTransform(S, scales=(1.0,))
    outcomes = set()
    for seed in range(8):
        out_image, out_label, params = transform(image, label, np.random.default_rng(seed))
        expected = label[:, ::-1] if params.flip else label
        np.testing.assert_array_equal(out_label, expected)
        np.testing.assert_allclose(
            out_image.permute(1, 2, 0).numpy(), image[:, ::-1] if params.flip else image, atol=1e-4
        )
        outcomes.add(params.flip)
    assert outcomes == {True, False}


def test_train_transform_is_deterministic_under_seed() -> None:
    image, label = blocks(97, 129, seed=1)
    transform = TrainTransform(65)
    a = transform(image, label, np.random.default_rng([4, 0, 7]))
    b = transform(image, label, np.random.default_rng([4, 0, 7]))
    torch.testing.assert_close(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert a[2] == b[2]
    params = {transform(image, label, np.random.default_rng([4, e, 7]))[2] for e in range(6)}
    assert len(params) > 1
    small_image, small_label = blocks(20, 20, seed=2)
    draws = [transform(small_image, small_label, np.random.default_rng(s))[2] for s in range(150)]
    scales = {p.scale for p in draws}
    assert scales == set(scale_choices(0.5, 1.5, 0.1).tolist())


@pytest.mark.parametrize("raw", [(65, 33), (33, 33), (17, 65), (129, 129)])
def test_eval_round_trip_at_integer_ratios(raw: tuple[int, int]) -> None:
    S = 129
    rng = np.random.default_rng(0)
    label = rng.integers(0, 50, size=raw).astype(np.int64)
    image = rng.integers(0, 256, size=raw + (3,)).astype(np.uint8)
    padded_image, padded_label, resized = EvalTransform(S)(image, label)
    assert tuple(padded_image.shape) == (3, S, S) and max(resized) == S
    assert (padded_label[resized[0] :, :] == 0).all() and (padded_label[:, resized[1] :] == 0).all()
    assert (padded_image[:, resized[0] :, :] == 127.5).all()
    np.testing.assert_array_equal(undo_eval_resize(padded_label, resized, raw), label)
    back = undo_eval_resize(torch.from_numpy(padded_label), resized, raw)
    assert isinstance(back, torch.Tensor)
    np.testing.assert_array_equal(back.numpy(), label)
