"""Hungarian matching and the PQ-style similarity, on hand-computed cases.

See docs/deeplab2.md#matching.
"""

from __future__ import annotations

import math

import pytest
import torch

from maxdeeplab.models.config import MATCHERS
from maxdeeplab.models.matching import (
    hungarian_match,
    invert_assignment,
    match_predictions,
    pq_similarity,
)
from maxdeeplab.models.structures import PanopticTargets
from maxdeeplab.models.targets import MaskTargets, build_mask_targets


def test_hungarian_on_hand_made_matrix() -> None:
    # Greedy (row by row) would take 0->0 (0.9) then 1->1 (0.1): 1.0. The optimum is 0->1, 1->0:
    # 1.6.
    sim = torch.tensor([[[0.9, 0.8, 0.0], [0.8, 0.1, 0.0]]])
    assert hungarian_match(sim, torch.tensor([[True, True]])).tolist() == [[1, 0]]


def test_invalid_rows_are_not_matched() -> None:
    sim = torch.tensor([[[0.9, 0.1], [5.0, 5.0], [0.2, 0.7]]])
    mask_slot = hungarian_match(sim, torch.tensor([[True, False, True]]))
    assert mask_slot.tolist() == [[0, -1, 1]]
    assert invert_assignment(mask_slot, 3).tolist() == [[0, 2, -1]]


def test_more_masks_than_slots_leaves_the_cheapest_unmatched() -> None:
    sim = torch.tensor([[[0.9, 0.0], [0.5, 0.4], [0.1, 0.8]]])
    assert hungarian_match(sim, torch.ones(1, 3, dtype=torch.bool)).tolist() == [[0, -1, 1]]


def test_non_finite_similarity_does_not_raise() -> None:
    sim = torch.tensor([[[float("nan"), 1.0], [float("inf"), 0.5]]])
    mask_slot = hungarian_match(sim, torch.ones(1, 2, dtype=torch.bool))
    assert sorted(mask_slot[0].tolist()) == [0, 1]


def _two_mask_targets() -> MaskTargets:
    # 1 x 4 stride-4 pixels: mask A (thing, class 1) on pixels 0-1, stuff class 2 on pixel 2, pixel
    # 3 void.
    sem = torch.tensor([[[1, 1, 2, 0]]])
    ids = torch.tensor([[[0, 0, -1, -1]]])
    return build_mask_targets(
        PanopticTargets(sem, ids, torch.tensor([[1]]), torch.ones(1, 1, 4)),
        height=1,
        width=4,
        num_classes=2,
        num_thing_classes=1,
        max_thing_id=1,
    )


def test_pq_similarity_by_hand() -> None:
    t = _two_mask_targets()
    # Slot soft masks P (2 slots x 4 pixels); the void pixel's mass is ignored by the similarity.
    P = torch.tensor([[0.8, 0.6, 0.1, 0.5], [0.2, 0.4, 0.9, 0.5]])
    nonvoid = torch.tensor([1.0, 1.0, 1.0, 0.0])
    onehot = t.mask_onehot()[0]  # 4 x 2
    intersection = ((P * nonvoid) @ onehot)[None]  # 1 x N x M
    pred_area = (P * nonvoid).sum(1)[None]
    class_logits = torch.log(torch.tensor([[[0.6, 0.3, 0.1], [0.2, 0.5, 0.3]]]))
    dice, class_prob = pq_similarity(intersection, pred_area, class_logits, t)
    # dice(A, slot0) = 1.4 / ((2 + 1.5) / 2 + 1e-5); dice(stuff, slot1) = 0.9 / ((1 + 1.5) / 2 +
    # 1e-5).
    expected_dice = [[1.4 / 1.75001, 0.6 / 1.75001], [0.1 / 1.25001, 0.9 / 1.25001]]
    assert torch.allclose(dice[0], torch.tensor(expected_dice), atol=1e-6)
    # class_prob: softmax over all 3 (void included), read at class 0 for A and class 1 for stuff.
    assert torch.allclose(class_prob[0], torch.tensor([[0.6, 0.2], [0.3, 0.5]]), atol=1e-6)


@pytest.mark.parametrize("matcher", MATCHERS)
def test_match_predictions_recovers_a_permuted_perfect_prediction(matcher: str) -> None:
    t = _two_mask_targets()
    mask_logits = torch.full((1, 3, 1, 4), -10.0)
    mask_logits[0, 2, 0, :2] = 10.0  # slot 2 = mask A
    mask_logits[0, 0, 0, 2] = 10.0  # slot 0 = the stuff region
    class_logits = torch.full((1, 3, 3), -5.0)
    class_logits[0, 2, 0] = 5.0
    class_logits[0, 0, 1] = 5.0
    class_logits[0, 1, 2] = 5.0  # slot 1 predicts void
    matching = match_predictions(mask_logits, class_logits, t, matcher=matcher)
    assert matching.mask_slot.tolist() == [[2, 0]]
    assert matching.slot_mask.tolist() == [[1, -1, 0]]
    assert math.isclose(float(matching.matched_dice[0, 2]), 1.0, abs_tol=1e-3)
    assert float(matching.matched_dice[0, 1]) == 0.0
    assert matching.matched_class_prob[0].min() > 0.99
