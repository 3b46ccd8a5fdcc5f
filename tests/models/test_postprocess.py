"""Panoptic post-processing (docs/deeplab2.md#post-processing) on hand-built logits."""

from __future__ import annotations

import math

import pytest
import torch

from maxdeeplab.models.config import PostprocessConfig
from maxdeeplab.models.postprocess import (
    batch_panoptic_inference,
    panoptic_inference,
    resize_nearest_align_corners,
)
from maxdeeplab.models.structures import MaXDeepLabOutput

THINGS = 1  # class index 0 (semantic 1) is a thing; 1, 2 (semantic 2, 3) are stuff
NO_LIMITS = PostprocessConfig(thing_area_limit=0, stuff_area_limit=0)


def _class_logits(rows: list[list[float]]) -> torch.Tensor:
    """Probabilities over [class 0, class 1, class 2, void] -> logits."""
    return torch.log(torch.tensor(rows))


def _scene() -> tuple[torch.Tensor, torch.Tensor]:
    """Five slots on a 5 x 5 grid: two things, one stuff class on two slots, a void slot, and a
    low-confidence corner where four kept slots tie."""
    class_logits = _class_logits(
        [
            [0.90, 0.04, 0.03, 0.03],  # slot 0: thing
            [0.80, 0.05, 0.05, 0.10],  # slot 1: thing
            [0.05, 0.85, 0.05, 0.05],  # slot 2: stuff class 1 (semantic 2)
            [0.05, 0.75, 0.10, 0.10],  # slot 3: stuff class 1 as well
            [0.05, 0.05, 0.05, 0.85],  # slot 4: void, not kept
        ]
    )
    owner = [
        [0, 0, 1, 1, 1],
        [0, 0, 1, 1, 1],
        [2, 2, 2, 4, 4],
        [3, 3, 3, -1, -1],
        [3, 3, 3, -1, -1],
    ]
    mask_logits = torch.full((5, 5, 5), -10.0)
    for y, row in enumerate(owner):
        for x, slot in enumerate(row):
            if slot >= 0:
                mask_logits[slot, y, x] = 10.0
            else:
                mask_logits[:4, y, x] = 0.0  # four kept slots tie: confidence 1/4
    return class_logits, mask_logits


def _infer(class_logits, mask_logits, cfg=NO_LIMITS, **sizes):
    sizes.setdefault("crop_size", tuple(mask_logits.shape[1:]))
    return panoptic_inference(class_logits, mask_logits, cfg=cfg, num_thing_classes=THINGS, **sizes)


def test_hand_built_scene() -> None:
    pred = _infer(*_scene())
    assert pred.panoptic.tolist() == [
        [257, 257, 258, 258, 258],
        [257, 257, 258, 258, 258],
        [512, 512, 512, 0, 0],  # slot 4 is best here but not kept: void (agreement rule)
        [512, 512, 512, 0, 0],  # low pixel confidence: void
        [512, 512, 512, 0, 0],
    ]
    assert pred.segments_info == [
        {"id": 257, "category_id": 1, "isthing": True, "area": 4},
        {"id": 258, "category_id": 1, "isthing": True, "area": 6},
        {"id": 512, "category_id": 2, "isthing": False, "area": 9},
    ]


def test_area_limits() -> None:
    cfg = PostprocessConfig(thing_area_limit=5, stuff_area_limit=7)
    pred = _infer(*_scene(), cfg=cfg)
    ids = {s["id"] for s in pred.segments_info}
    # Thing slot 0 (4 px) < 5 is dropped; slot 1 (6 px) stays; the stuff class is counted over both
    # of its slots (3 + 6 = 9 px >= 7) and stays although each slot alone is smaller than 7.
    assert ids == {258, 512}
    assert (pred.panoptic[:2, :2] == 0).all()
    pred = _infer(*_scene(), cfg=PostprocessConfig(thing_area_limit=6, stuff_area_limit=10))
    assert {s["id"] for s in pred.segments_info} == {258}  # a limit is inclusive (>= keeps)


def test_class_threshold_is_inclusive_and_drops_unconfident_slots() -> None:
    class_logits, mask_logits = _scene()
    class_logits[1] = torch.log(torch.tensor([0.69, 0.11, 0.1, 0.1]))
    pred = _infer(class_logits, mask_logits)
    assert (pred.panoptic[:2, 2:] == 0).all()  # slot 1 dropped; its pixels fail the agreement rule
    class_logits[1] = torch.log(torch.tensor([0.71, 0.09, 0.1, 0.1]))
    assert (_infer(class_logits, mask_logits).panoptic[:2, 2:] == 258).all()


def test_no_kept_slot_gives_an_all_void_image() -> None:
    class_logits, mask_logits = _scene()
    class_logits[:] = torch.log(torch.tensor([0.3, 0.3, 0.1, 0.3]))
    pred = _infer(class_logits, mask_logits)
    assert (pred.panoptic == 0).all() and pred.segments_info == []


def test_upsampling_is_corner_aligned_and_padding_is_undone() -> None:
    class_logits, mask_logits = _scene()
    pred_crop = _infer(class_logits, mask_logits, crop_size=(17, 17))
    # align_corners: the stride-4 samples of the 17 x 17 map see the 5 x 5 logits exactly.
    assert torch.equal(pred_crop.panoptic[::4, ::4], _infer(class_logits, mask_logits).panoptic)
    pred = _infer(
        class_logits, mask_logits, crop_size=(17, 17), resized_size=(9, 17), raw_size=(4, 9)
    )
    rows = [
        round(i * 8 / 3) for i in range(4)
    ]  # TF1 align_corners nearest: round(i (in-1)/(out-1))
    cols = [math.floor(i * 16 / 8 + 0.5) for i in range(9)]
    assert pred.panoptic.tolist() == [[pred_crop.panoptic[r, c].item() for c in cols] for r in rows]
    assert sum(s["area"] for s in pred.segments_info) == int((pred.panoptic > 0).sum())


def test_resize_nearest_align_corners_indices() -> None:
    labels = torch.arange(5)[None].repeat(2, 1)
    assert resize_nearest_align_corners(labels, (2, 10))[0].tolist() == [
        0,
        0,
        1,
        1,
        2,
        2,
        3,
        3,
        4,
        4,
    ]
    assert resize_nearest_align_corners(labels, (1, 3))[0].tolist() == [0, 2, 4]


def test_maskwise_pastes_by_confidence_and_drops_overlapping_masks() -> None:
    cfg = PostprocessConfig(mode="maskwise", thing_area_limit=0, stuff_area_limit=0)
    class_logits = _class_logits(
        [[0.95, 0.02, 0.02, 0.01], [0.80, 0.1, 0.05, 0.05], [0.6, 0.1, 0.1, 0.2]]
    )
    mask_logits = torch.full((3, 5, 5), -10.0)
    mask_logits[0, :2] = 0.0  # A: rows 0-1
    mask_logits[1, :2] = 0.0  # B overlaps A on rows 0-1 (both get probability ~0.5)...
    mask_logits[1, 2:] = 5.0  # ... and owns rows 2-4 alone: 15 of its 25 pixels stay free
    mask_logits[2, 2:] = 0.0  # C is not class-confident: never pasted
    pred = _infer(class_logits, mask_logits, cfg=cfg)
    assert pred.panoptic[:2].unique().tolist() == [257]  # A, rank 1
    assert pred.panoptic[2:].unique().tolist() == [258]  # B, rank 2
    mask_logits[1, 2:4] = -10.0  # now B keeps only 5 free pixels of 15: <= half, dropped
    pred = _infer(class_logits, mask_logits, cfg=cfg)
    assert pred.panoptic[2:].unique().tolist() == [0]


def test_batch_inference_and_errors() -> None:
    class_logits, mask_logits = _scene()
    out = MaXDeepLabOutput(
        class_logits[None].repeat(2, 1, 1), mask_logits[None].repeat(2, 1, 1, 1), torch.zeros(1)
    )
    preds = batch_panoptic_inference(
        out, cfg=NO_LIMITS, num_thing_classes=THINGS, raw_sizes=[(17, 17), (8, 8)]
    )
    assert [p.panoptic.shape for p in preds] == [(17, 17), (8, 8)]
    with pytest.raises(ValueError, match="mode"):
        _infer(*_scene(), cfg=PostprocessConfig(mode="boxes"))
    with pytest.raises(ValueError, match="label_divisor"):
        _infer(*_scene(), cfg=PostprocessConfig(label_divisor=4))
