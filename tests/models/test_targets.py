"""Stride-4 loss targets: subsampling, mask columns, validity, the >max_thing_id guard.

See docs/deeplab2.md#ground-truth-at-stride-4.
"""

from __future__ import annotations

import pytest
import torch

from maxdeeplab.models.structures import PanopticTargets
from maxdeeplab.models.targets import build_mask_targets, strided_subsample

# Tiny label space: semantic 1-2 are things, 3-4 stuff; 4 thing columns (max_thing_id).
K, THINGS, T = 4, 2, 4


def _targets(stride4_sem: list[list[int]], stride4_ids: list[list[int]], classes: list[int]):
    """Full-crop (9 x 9) labels whose [::4, ::4] samples are the given 3 x 3 grids.

    The non-sampled pixels carry a thing (id 2, class 1) that must vanish at stride 4.
    """
    sem = torch.full((1, 9, 9), 1, dtype=torch.long)
    ids = torch.full((1, 9, 9), 2, dtype=torch.long)
    sem[0, ::4, ::4] = torch.tensor(stride4_sem)
    ids[0, ::4, ::4] = torch.tensor(stride4_ids)
    thing_classes = torch.full((1, T), -1, dtype=torch.long)
    thing_classes[0, : len(classes)] = torch.tensor(classes)
    return PanopticTargets(sem, ids, thing_classes, torch.ones(1, 9, 9))


def _build(targets: PanopticTargets):
    return build_mask_targets(
        targets, height=3, width=3, num_classes=K, num_thing_classes=THINGS, max_thing_id=T
    )


def test_columns_classes_validity_by_hand() -> None:
    # stride-4 grid: thing 0 (class 1), thing 1 (class 2), stuff 3, one void pixel; stuff 4 absent;
    # thing 2 (class 1) only lives on non-sampled pixels and vanishes.
    t = _build(
        _targets(
            [[1, 1, 3], [0, 2, 3], [3, 3, 2]],
            [[0, 0, -1], [-1, 1, -1], [-1, -1, 1]],
            classes=[1, 2, 1],
        )
    )
    assert t.mask_columns.tolist() == [[0, 1, T + 0]]  # thing 0, thing 1, stuff class 3
    assert t.mask_classes.tolist() == [[0, 1, 2]]  # semantic - 1
    assert t.mask_valid.tolist() == [[True, True, True]]
    assert t.mask_is_thing.tolist() == [[True, True, False]]
    assert t.mask_area.tolist() == [[2.0, 2.0, 4.0]]
    assert t.pixel_mask.tolist() == [[0, 0, 2, -1, 1, 2, 2, 2, 1]]
    assert t.pixel_nonvoid.tolist() == [[True, True, True, False, True, True, True, True, True]]
    assert t.pixel_thing.tolist() == [[True, True, False, False, True, False, False, False, True]]
    assert t.semantic.tolist() == [[1, 1, 3, 0, 2, 3, 3, 3, 2]]
    onehot = t.mask_onehot()
    assert onehot.shape == (1, 9, 3)
    assert onehot.sum(dim=1).tolist() == t.mask_area.tolist()
    assert onehot[0, 3].sum() == 0  # the void pixel is in no mask


def test_batch_padding_and_order() -> None:
    a = _targets([[1, 1, 3], [0, 2, 3], [3, 3, 2]], [[0, 0, -1], [-1, 1, -1], [-1, -1, 1]], [1, 2])
    b = _targets([[4, 4, 4], [4, 4, 4], [4, 4, 4]], [[-1] * 3] * 3, [])
    batch = PanopticTargets(
        *(torch.cat([getattr(a, f), getattr(b, f)]) for f in ("semantic", "thing_ids")),
        thing_classes=torch.cat([a.thing_classes, b.thing_classes]),
        pixel_weights=torch.ones(2, 9, 9),
    )
    t = _build(batch)
    assert t.mask_valid.tolist() == [[True, True, True], [True, False, False]]
    assert t.mask_columns[1].tolist() == [T + 1, -1, -1]
    assert t.mask_classes[1].tolist() == [3, -1, -1]
    assert t.mask_area[1].tolist() == [9.0, 0.0, 0.0]
    assert (t.pixel_mask[1] == 0).all()


def test_thing_ids_beyond_max_thing_id_are_dropped_not_pathological() -> None:
    # 200 instances in one image: ids >= max_thing_id (4 here) have no column and no class.
    sem = torch.ones(1, 21, 21, dtype=torch.long)
    ids = torch.arange(21 * 21).reshape(1, 21, 21) % 200
    thing_classes = torch.ones(1, T, dtype=torch.long)
    t = build_mask_targets(
        PanopticTargets(sem, ids, thing_classes, torch.ones(1, 21, 21)),
        height=6,
        width=6,
        num_classes=K,
        num_thing_classes=THINGS,
        max_thing_id=T,
    )
    kept = t.pixel_mask >= 0
    assert int(t.num_dropped_thing_pixels) == int((~kept).sum()) > 0
    assert t.pixel_mask.min() >= -1 and t.pixel_mask.max() < t.mask_valid.shape[1]
    assert (t.mask_columns[t.mask_valid] < T).all()
    assert t.mask_onehot()[~kept].sum() == 0
    assert not t.pixel_thing[~kept].any()
    assert t.pixel_nonvoid.all()  # still labelled for the semantic loss


def test_thing_with_invalid_class_is_void() -> None:
    # thing 1 has class -1 (padding entry): its column is void and its pixels are in no mask.
    t = _build(_targets([[1, 1, 1], [1, 1, 1], [1, 1, 1]], [[0, 0, 0], [1, 1, 1], [0, 0, 0]], [1]))
    assert t.mask_columns.tolist() == [[0]]
    assert (t.pixel_mask.reshape(3, 3)[1] == -1).all()


def test_strided_subsample_requires_aligned_sizes() -> None:
    labels = torch.arange(81).reshape(1, 9, 9)
    assert strided_subsample(labels, 3, 3).tolist() == [[[0, 4, 8], [36, 40, 44], [72, 76, 80]]]
    with pytest.raises(ValueError, match="cannot be strided"):
        strided_subsample(torch.zeros(1, 10, 10), 3, 3)
