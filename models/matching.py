"""PQ-style similarity and Hungarian matching of mask slots to ground-truth masks.

Described in docs/deeplab2.md#matching.

deeplab2 (`model/loss/max_deeplab_loss.py`, `matchers_ops.py`) scores every (GT mask i, slot k) pair
with the PQ-style similarity `dice(i, k) * p_k(c_i)`:
- `dice(i, k) = sum_p gt_i(p) P_k(p) / ((|gt_i| + sum_p P_k(p)) / 2 + 1e-5)` with `P` the softmax
  over slots of the mask logits, zeroed on void pixels (no smoothing, unlike the dice *loss*);
- `p_k(c_i)` the softmax over all K + 1 class logits (void included) read at the GT class.
It then minimises the negative similarity with a Hungarian solver on a matrix padded to square with
+-999. By default (`loss.matcher = 'exact'`) the void rows are simply left out and scipy's
rectangular `linear_sum_assignment` solves the same problem exactly (padding with a constant does
not change which real pairs are optimal). deeplab2's own float32 TensorFlow solver rounds
similarity differences below ~6e-5 away and then breaks the resulting ties its own way, so on weak
or ambiguous predictions it returns other, non-optimal assignments; `loss.matcher = 'deeplab2'`
reproduces them with a port of that solver (`models/deeplab2_hungarian.py`). When there are more
non-void GT masks than slots, some masks stay unmatched (mask_slot = -1); the losses leave them out
of the matched-slot terms instead of reproducing deeplab2's -99999 logits
(docs/deeplab2.md#more-masks-than-slots).

Everything here is without gradient. The similarity is built on the device of the logits; only the
small B x M x N matrix goes to the CPU for scipy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from maxdeeplab.models.config import MATCHERS
from maxdeeplab.models.deeplab2_hungarian import deeplab2_match
from maxdeeplab.models.targets import MaskTargets

# deeplab2 `_mask_similarity`: the epsilon added to the dice denominator.
DICE_SIMILARITY_EPS = 1e-5


@dataclass
class Matching:
    """The result of matching N slots to M GT masks.

    Attributes:
        mask_slot: B x M int64, the slot matched to each GT mask; -1 for padding and unmatched
        masks. slot_mask: B x N int64, the GT mask matched to each slot; -1 for negatives (unmatched
        slots). dice: B x M x N, the mask similarity (0 on padding rows).
        class_prob: B x M x N, the probability each slot gives the GT class (0 on padding rows).
    """

    mask_slot: torch.Tensor
    slot_mask: torch.Tensor
    dice: torch.Tensor
    class_prob: torch.Tensor

    @property
    def matched_dice(self) -> torch.Tensor:
        """B x N: dice(i, k) at each positive slot k matched to mask i, 0 at negatives."""
        return _at_match(self.dice.transpose(1, 2), self.slot_mask)

    @property
    def matched_class_prob(self) -> torch.Tensor:
        """B x M: p_slot(i)(c_i) at each matched mask i, 0 at padding or unmatched masks."""
        return _at_match(self.class_prob, self.mask_slot)


def _at_match(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """values: B x R x C, index: B x R (-1 = none) -> B x R, values[b, r, index[b, r]] or 0."""
    picked = values.gather(2, index.clamp(min=0).unsqueeze(2)).squeeze(2)
    return torch.where(index >= 0, picked, torch.zeros_like(picked))


@torch.no_grad()
def pq_similarity(
    intersection: torch.Tensor,
    pred_area: torch.Tensor,
    class_logits: torch.Tensor,
    targets: MaskTargets,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two factors of deeplab2's PQ-style similarity.

    Args:
        intersection: B x N x M, sum over the pixels of GT mask i of slot k's soft mask P_k.
        pred_area: B x N, sum of P_k over the non-void pixels.
        class_logits: B x N x (K+1), void last.
        targets: the stride-4 targets (mask_area, mask_classes, mask_valid: B x M).

    Returns:
        dice: B x M x N and class_prob: B x M x N, both 0 on padding rows.
    """
    B, N, M = intersection.shape
    valid = targets.mask_valid.unsqueeze(2)
    denominator = (
        targets.mask_area.unsqueeze(2) + pred_area.unsqueeze(1)
    ) / 2 + DICE_SIMILARITY_EPS
    dice = torch.where(valid, intersection.transpose(1, 2).float() / denominator, 0.0)
    probs = torch.softmax(class_logits.float(), dim=-1)  # B x N x (K+1)
    gt_class = targets.mask_classes.clamp(min=0).unsqueeze(1).expand(B, N, M)
    class_prob = torch.where(valid, probs.gather(2, gt_class).transpose(1, 2), 0.0)
    return dice, class_prob


def hungarian_match(similarity: torch.Tensor, mask_valid: torch.Tensor) -> torch.Tensor:
    """Maximise the total similarity of a one-to-one GT-mask-to-slot assignment, per image.

    Non-finite similarities (a diverged model) are treated as 0 so that scipy never raises; the
    losses then carry the NaN to the training loop, which skips the step.

    Args:
        similarity: B x M x N (any device; copied to the CPU).
        mask_valid: B x M bool, rows to match.

    Returns:
        mask_slot: B x M int64 on the device of `similarity`: the slot of each valid mask, -1 for
            invalid rows and for the masks left over when there are more than N.
    """
    sim = torch.nan_to_num(similarity.detach().float(), nan=0.0, posinf=0.0, neginf=0.0)
    sim_np = sim.cpu().numpy()
    valid_np = mask_valid.cpu().numpy()
    mask_slot = np.full(valid_np.shape, -1, dtype=np.int64)
    for b in range(sim_np.shape[0]):
        rows = np.flatnonzero(valid_np[b])
        if rows.size == 0:
            continue
        row_ind, col_ind = linear_sum_assignment(sim_np[b, rows], maximize=True)
        mask_slot[b, rows[row_ind]] = col_ind
    return torch.from_numpy(mask_slot).to(similarity.device)


def invert_assignment(mask_slot: torch.Tensor, num_slots: int) -> torch.Tensor:
    """mask_slot: B x M (-1 = none) -> slot_mask: B x N, the mask of each slot (-1 = negative)."""
    B, M = mask_slot.shape
    slot_mask = torch.full((B, num_slots + 1), -1, dtype=torch.long, device=mask_slot.device)
    index = torch.where(mask_slot >= 0, mask_slot, num_slots)
    slot_mask.scatter_(1, index, torch.arange(M, device=mask_slot.device).expand(B, M))
    return slot_mask[:, :num_slots]


@torch.no_grad()
def match_slots(
    intersection: torch.Tensor,
    pred_area: torch.Tensor,
    class_logits: torch.Tensor,
    targets: MaskTargets,
    *,
    matcher: str,
) -> Matching:
    """PQ-style similarity, then Hungarian matching (see `pq_similarity` for the arguments).

    Args:
        matcher: 'exact' (`hungarian_match`, the optimum) or 'deeplab2' (`deeplab2_match`, the
            assignment of deeplab2's float32 solver); `LossConfig.matcher`.

    Raises:
        ValueError: an unknown matcher.
    """
    dice, class_prob = pq_similarity(intersection, pred_area, class_logits, targets)
    similarity = dice * class_prob
    if matcher == "exact":
        mask_slot = hungarian_match(similarity, targets.mask_valid)
    elif matcher == "deeplab2":
        mask_slot = deeplab2_match(
            similarity, targets.mask_valid, targets.mask_columns, num_columns=targets.num_columns
        )
    else:
        raise ValueError(f"loss.matcher must be one of {MATCHERS}, got {matcher!r}")
    slot_mask = invert_assignment(mask_slot, intersection.shape[1])
    return Matching(mask_slot=mask_slot, slot_mask=slot_mask, dice=dice, class_prob=class_prob)


@torch.no_grad()
def match_predictions(
    mask_logits: torch.Tensor, class_logits: torch.Tensor, targets: MaskTargets, *, matcher: str
) -> Matching:
    """Match from raw outputs: mask_logits B x N x H x W, class_logits B x N x (K+1)."""
    B, N = mask_logits.shape[:2]
    probs = torch.softmax(mask_logits.float().reshape(B, N, -1), dim=1)  # B x N x L
    probs = probs * targets.pixel_nonvoid.unsqueeze(1)
    intersection = torch.bmm(probs, targets.mask_onehot())  # B x N x M
    return match_slots(intersection, probs.sum(dim=2), class_logits, targets, matcher=matcher)
