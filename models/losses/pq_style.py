"""The PQ-style loss of MaX-DeepLab as deeplab2 computes it (docs/deeplab2.md#pq-style-loss).

deeplab2 splits the loss into two terms (`max_deeplab_loss.py`, `base_loss.FocalCrossEntropyLoss`
and `base_loss.MaskDiceLoss`), both after Hungarian matching:

- **class term**: for every slot k, `alpha_k * w_k * CE(class_logits_k, target_k)`, where the target
  is the matched GT class for a positive slot and void (the last class) for a negative one;
  `alpha_k = alpha` (0.75) for a non-void target, `1 - alpha` for void; the stop-gradient dynamic
  weight `w_k` is `max(dice(i, k), 1e-5)` for a positive slot and, for a negative one,
  `max(void_ratio_k, 1e-5)` (deeplab2's code) or 1 (`negative_weighting='constant'`, the paper's
  form). Per image: the sum over slots divided by the number of non-zero terms (in practice N).
- **dice term**: for every matched GT mask i, `w_i * (1 - (2 sum m_hat m + 1) / (sum m_hat + sum m +
  1))` with `m_hat` the softmax-over-slots probability of slot sigma(i) restricted to pixels that
  belong to some GT mask, and the stop-gradient weight `w_i = max(p_sigma(i)(c_i), 1e-5)`. Per
  image: the sum over masks. deeplab2 then multiplies it by alpha / N so both terms share alpha and
  the 1 / N normalisation; that factor is applied by the criterion.

The void ratio `sum_p void(p) P_k(p) / (sum_p P_k(p) + 1e-5)` equals the share of slot k's soft mask
lying on void pixels. deeplab2's comment says it *reduces* the penalty of slots on void; the
arithmetic makes negatives on labelled pixels nearly free instead
(docs/deeplab2.md#pq-style-loss-code-versus-paper). We copy the code by default.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from maxdeeplab.models.config import NEGATIVE_WEIGHTINGS
from maxdeeplab.models.losses.reduction import mean_over_nonzero

# deeplab2: lower bound of both dynamic weights, so that a zero weight never marks a term as void.
DYNAMIC_WEIGHT_FLOOR = 1e-5
# deeplab2 `_mask_similarity(..., 'intersection_over_prediction')` epsilon.
VOID_RATIO_EPS = 1e-5
# deeplab2 `compute_mask_dice_loss`: smooth = 1.
DICE_SMOOTH = 1.0


def void_ratio(void_area: torch.Tensor, total_area: torch.Tensor) -> torch.Tensor:
    """Share of each slot's soft mask on void pixels (stop-gradient).

    Args:
        void_area: B x N, sum of P_k over void pixels.
        total_area: B x N, sum of P_k over all pixels.
    """
    return (void_area / (total_area + VOID_RATIO_EPS)).detach()


def class_term_weights(
    slot_mask: torch.Tensor,
    matched_dice: torch.Tensor,
    slot_void_ratio: torch.Tensor,
    *,
    negative_weighting: str,
) -> torch.Tensor:
    """Dynamic (stop-gradient) weight of each slot's class cross-entropy.

    Args:
        slot_mask: B x N, the matched GT mask of each slot, -1 for negatives.
        matched_dice: B x N, dice(i, k) of each positive slot.
        slot_void_ratio: B x N, see `void_ratio`.
        negative_weighting: 'void_ratio' (deeplab2) or 'constant' (paper: weight 1).

    Returns:
        B x N weights.
    """
    if negative_weighting == "void_ratio":
        negative = slot_void_ratio.clamp(min=DYNAMIC_WEIGHT_FLOOR)
    elif negative_weighting == "constant":
        negative = torch.ones_like(slot_void_ratio)
    else:
        raise ValueError(
            f"loss.negative_weighting must be one of {NEGATIVE_WEIGHTINGS}, "
            f"got {negative_weighting!r}"
        )
    positive = matched_dice.clamp(min=DYNAMIC_WEIGHT_FLOOR)
    return torch.where(slot_mask >= 0, positive, negative).detach()


def pq_class_term(
    class_logits: torch.Tensor,
    target_class: torch.Tensor,
    weights: torch.Tensor,
    *,
    alpha: float,
) -> torch.Tensor:
    """The PQ-style loss class term per image (before the loss weight).

    Args:
        class_logits: B x N x (K+1), void last.
        target_class: B x N int64, the matched class for positives, K (void) for negatives.
        weights: B x N dynamic weights (see `class_term_weights`); gradient is stopped.
        alpha: focal_loss_alpha, the weight of non-void targets (void targets get 1 - alpha).

    Returns:
        B, the mean over the non-zero slot terms.
    """
    void_index = class_logits.shape[-1] - 1
    ce = F.cross_entropy(class_logits.transpose(1, 2), target_class, reduction="none")  # B x N
    alpha_weights = torch.where(target_class == void_index, 1.0 - alpha, alpha)
    return mean_over_nonzero(alpha_weights * ce * weights.detach())


def pq_dice_term(
    intersection: torch.Tensor,
    pred_area: torch.Tensor,
    gt_area: torch.Tensor,
    mask_slot: torch.Tensor,
    matched_class_prob: torch.Tensor,
) -> torch.Tensor:
    """The PQ-style loss dice term per image (before the alpha / N modifier and the loss weight).

    Args:
        intersection: B x N x M, sum over GT mask i's pixels of slot k's probability.
        pred_area: B x N, sum of slot k's probability over the pixels that belong to any GT mask.
        gt_area: B x M, GT mask areas.
        mask_slot: B x M, the matched slot of each GT mask, -1 if none (padding, unmatched).
        matched_class_prob: B x M, p_sigma(i)(c_i); gradient is stopped.

    Returns:
        B, the weighted sum over the matched GT masks.
    """
    matched = mask_slot >= 0
    slot = mask_slot.clamp(min=0)
    inter = intersection.gather(1, slot.unsqueeze(1)).squeeze(
        1
    )  # B x M: intersection[b, slot(i), i]
    area = pred_area.gather(1, slot)  # B x M
    dice_loss = 1.0 - (2.0 * inter + DICE_SMOOTH) / (area + gt_area + DICE_SMOOTH)
    weights = torch.where(matched, matched_class_prob.clamp(min=DYNAMIC_WEIGHT_FLOOR), 0.0).detach()
    return (dice_loss * weights).sum(dim=1)
