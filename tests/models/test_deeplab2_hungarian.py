"""The port of deeplab2's float32 Hungarian solver (`loss.matcher = 'deeplab2'`).

See docs/deeplab2.md#matching. The assignments deeplab2 makes here were derived by hand from its
algorithm (`model/loss/matchers_ops.py`) and checked against it; tests/parity/ compares with
deeplab2 itself on random costs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from maxdeeplab.models.config import LossConfig, loss_config_problem
from maxdeeplab.models.deeplab2_hungarian import (
    MATCHING_NEGATIVE_CONSTANT,
    MATCHING_POSITIVE_CONSTANT,
    deeplab2_hungarian,
    deeplab2_match,
)
from maxdeeplab.models.losses.criterion import compute_losses_and_matching
from maxdeeplab.models.matching import Matching, hungarian_match, match_slots
from maxdeeplab.models.structures import MaXDeepLabOutput, PanopticTargets
from maxdeeplab.models.targets import build_mask_targets

HAND_MADE = [
    [[7.0]],
    [[4.0, 1.0, 3.0], [2.0, 0.0, 5.0], [3.0, 2.0, 2.0]],
    [[-0.9, -0.8], [-0.8, -0.1]],
    [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]],
    [[0.0, 5.0, 9.0, 2.0], [6.0, 0.0, 3.0, 8.0], [4.0, 4.0, 4.0, 0.0], [1.0, 7.0, 0.0, 6.0]],
    [[-3.0, 2.5, 0.5], [0.25, -1.0, 4.0], [2.0, 2.0, -2.0]],
]


def _is_permutation(permutation: torch.Tensor) -> bool:
    return bool((permutation.sum(dim=1) == 1).all() and (permutation.sum(dim=2) == 1).all())


@pytest.mark.parametrize("costs", HAND_MADE)
def test_hand_made_costs_give_an_optimal_permutation(costs: list[list[float]]) -> None:
    weights = torch.tensor([costs])
    permutation = deeplab2_hungarian(weights)
    assert permutation.dtype == torch.bool and _is_permutation(permutation)
    rows, cols = linear_sum_assignment(np.array(costs))
    assert float(weights[permutation].sum()) == pytest.approx(np.array(costs)[rows, cols].sum())


def test_random_costs_give_optimal_permutations() -> None:
    # Small integers: float32 is exact on them, so deeplab2's algorithm finds an exact optimum.
    g = torch.Generator().manual_seed(0)
    for size in (2, 5, 9, 16):
        weights = torch.randint(-4, 5, (6, size, size), generator=g).float()
        permutation = deeplab2_hungarian(weights)
        assert _is_permutation(permutation)
        for costs, chosen in zip(weights.numpy(), permutation, strict=True):
            rows, cols = linear_sum_assignment(costs)
            assert costs[chosen.numpy()].sum() == costs[rows, cols].sum()


def test_ties_follow_deeplab2_search_order() -> None:
    # Both matrices have two optimal assignments; scipy returns the other one of each.
    # (a) Greedy: row 0 takes job 0, rows 1 and 2 stay free. Both free rows reach job 0 at once;
    #     the search keeps the larger row id, 2, so the first augmentation gives row 2 job 0 and
    #     row 0 job 1; after one cover update row 1 takes job 2.
    # (b) Greedy: 0 -> 0, 1 -> 1, row 2 free. Row 2 reaches jobs 0 and 1, i.e. rows 0 and 1 with the
    #     same origin; both reach the free job 2 and the lower index, row 0, takes it.
    weights = torch.tensor(
        [
            [[0.0, 0.0, 0.0], [0.0, 1.0, 1.0], [0.0, 1.0, 1.0]],
            [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]],
        ]
    )
    assert deeplab2_hungarian(weights).int().argmax(dim=2).tolist() == [[1, 2, 0], [2, 1, 0]]
    assert [linear_sum_assignment(w)[1].tolist() for w in weights.numpy()] == [[1, 0, 2], [0, 2, 1]]


def _match_both(similarity: list[list[float]], num_columns: int) -> tuple[list[int], list[int]]:
    sim = torch.tensor([similarity])
    valid = torch.ones(sim.shape[:2], dtype=torch.bool)
    columns = torch.arange(sim.shape[1]).unsqueeze(0)
    exact = hungarian_match(sim, valid)[0].tolist()
    return exact, deeplab2_match(sim, valid, columns, num_columns=num_columns)[0].tolist()


def test_float32_rounding_at_999_picks_a_worse_assignment() -> None:
    # Two masks, two slots, one void row (+999), one padded column (-999). Shifting the rows by
    # their -999 minimum gives 999 - s in float32, spaced 2^-14 ~ 6.1e-5 there: 999 - 3e-5 rounds
    # to 999, 999 - 5e-5 to 999 - 2^-14. deeplab2 thus only sees slot 1 being better for mask 0
    # and takes the anti-diagonal (similarity 5e-5) over the exact optimum (6e-5).
    exact, deeplab2 = _match_both([[3e-5, 5e-5], [0.0, 3e-5]], num_columns=3)
    assert exact == [0, 1]
    assert deeplab2 == [1, 0]


def test_weak_predictions_fall_back_to_index_order() -> None:
    # Every similarity rounds away (999 - s == 999): all assignments tie and the greedy start,
    # row by row to the lowest free zero, is kept.
    exact, deeplab2 = _match_both([[1e-6, 2e-5], [2e-5, 1e-6]], num_columns=3)
    assert exact == [1, 0]
    assert deeplab2 == [0, 1]


def test_deeplab2_layout_padding_rows_and_more_masks_than_slots() -> None:
    # Compact rows 0, 1, 3 sit at deeplab2 columns 4, 1, 0; row 2 is padding. Clear similarities,
    # three masks for two slots: the weakest mask lands on a padded slot and stays unmatched.
    sim = torch.tensor([[[0.9, 0.1], [0.2, 0.8], [0.7, 0.7], [0.3, 0.3]]])
    valid = torch.tensor([[True, True, False, True]])
    columns = torch.tensor([[4, 1, -1, 0]])
    mask_slot = deeplab2_match(sim, valid, columns, num_columns=6)
    assert mask_slot.tolist() == [[0, 1, -1, -1]]
    assert hungarian_match(sim, valid).tolist() == [[0, 1, -1, -1]]


def test_more_slots_than_rows_fills_void_rows_with_the_negative_constant() -> None:
    # num_columns <= slots: deeplab2 fills void rows with -999 (not +999) and pads rows instead.
    assert MATCHING_NEGATIVE_CONSTANT == -MATCHING_POSITIVE_CONSTANT == -999.0
    sim = torch.tensor([[[0.1, 0.6, 0.2, 0.0], [0.5, 0.4, 0.0, 0.3]]])
    valid = torch.ones(1, 2, dtype=torch.bool)
    columns = torch.tensor([[0, 2]])
    assert deeplab2_match(sim, valid, columns, num_columns=3).tolist() == [[1, 0]]


def test_non_finite_similarity_does_not_hang() -> None:
    sim = torch.tensor([[[float("nan"), 1.0], [float("inf"), 0.5]]])
    valid = torch.ones(1, 2, dtype=torch.bool)
    mask_slot = deeplab2_match(sim, valid, torch.tensor([[0, 1]]), num_columns=4)
    assert sorted(mask_slot[0].tolist()) == [0, 1]


def test_assignment_is_optimal_for_the_rounded_costs() -> None:
    # deeplab2's layout on COCO (181 rows, 128 slots) with weak similarities: the port's choice
    # is an optimum of the float32 costs 999 - s it actually sees, and on some images not an
    # optimum of the exact similarities.
    g = torch.Generator().manual_seed(0)
    rows, slots, masks = 181, 128, 12
    worse = 0
    for _ in range(3):
        sim = torch.rand(1, masks, slots, generator=g) * 3e-4
        columns = torch.randperm(rows, generator=g)[:masks].sort().values.unsqueeze(0)
        valid = torch.ones(1, masks, dtype=torch.bool)
        chosen = deeplab2_match(sim, valid, columns, num_columns=rows)[0]
        rounded = (-sim[0] - torch.tensor(MATCHING_NEGATIVE_CONSTANT)).double().numpy()
        best = rounded[linear_sum_assignment(rounded)].sum()
        assert rounded[np.arange(masks), chosen.numpy()].sum() == best
        exact = hungarian_match(sim, valid)[0]
        ours, optimum = (float(sim[0, np.arange(masks), m].sum()) for m in (chosen, exact))
        assert ours <= optimum
        worse += ours < optimum
    assert worse > 0


# ------------------------------------------------------------------- through the loss

K, THINGS, CROP = 5, 3, 21  # semantic 1-3 things, 4-5 stuff; stride 4 -> 6 x 6


def _scene() -> PanopticTargets:
    sem = torch.full((1, CROP, CROP), 4, dtype=torch.long)
    sem[:, 11:] = 5
    ids = torch.full((1, CROP, CROP), -1, dtype=torch.long)
    sem[:, 1:9, 1:9], ids[:, 1:9, 1:9] = 1, 0
    sem[:, 8:17, 12:21], ids[:, 8:17, 12:21] = 3, 1
    sem[:, 17:, 0:4] = 0
    classes = torch.full((1, 128), -1, dtype=torch.long)
    classes[:, 0], classes[:, 1] = 1, 3
    return PanopticTargets(sem, ids, classes, torch.ones(1, CROP, CROP))


def _weak_output(seed: int) -> MaXDeepLabOutput:
    g = torch.Generator().manual_seed(seed)
    return MaXDeepLabOutput(
        0.01 * torch.randn(1, 8, K + 1, generator=g),
        0.01 * torch.randn(1, 8, 6, 6, generator=g),
        F.normalize(torch.randn(1, 4, 6, 6, generator=g), dim=1),
        torch.randn(1, K + 1, 6, 6, generator=g),
    )


def _matched_similarity(matching: Matching) -> float:
    similarity = matching.dice * matching.class_prob  # B x M x N
    return float(similarity.gather(2, matching.mask_slot.clamp(min=0).unsqueeze(2)).sum())


def test_loss_switch_changes_matching_on_weak_predictions_only() -> None:
    targets = _scene()
    differ = 0
    for seed in range(6):
        output = _weak_output(seed)
        exact, by_exact = compute_losses_and_matching(
            output, targets, loss_cfg=LossConfig(), num_thing_classes=THINGS
        )
        ported, by_deeplab2 = compute_losses_and_matching(
            output, targets, loss_cfg=LossConfig(matcher="deeplab2"), num_thing_classes=THINGS
        )
        assert _matched_similarity(by_deeplab2) <= _matched_similarity(by_exact)
        for key in ("instance_discrimination", "semantic"):  # matching-free terms
            assert torch.equal(exact[key], ported[key])
        if not torch.equal(by_exact.mask_slot, by_deeplab2.mask_slot):
            differ += 1
            assert exact["pq_class"] != ported["pq_class"]
    assert differ > 0
    assert LossConfig().matcher == "exact"


def test_unknown_matcher_is_rejected() -> None:
    assert loss_config_problem(LossConfig(matcher="scipy")) == (
        "matcher",
        "scipy",
        "expected one of exact, deeplab2",
    )
    assert loss_config_problem(LossConfig()) is None
    t = build_mask_targets(
        _scene(), height=6, width=6, num_classes=K, num_thing_classes=THINGS, max_thing_id=128
    )
    B, M = t.mask_valid.shape
    with pytest.raises(ValueError, match="loss.matcher"):
        match_slots(torch.rand(B, 8, M), torch.rand(B, 8), torch.rand(B, 8, K + 1), t, matcher="x")
