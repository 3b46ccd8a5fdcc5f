"""Mask-ID cross-entropy of MaX-DeepLab (deeplab2 `TopKCrossEntropyLoss`, top_k = 1).

Described in docs/deeplab2.md#mask-id-cross-entropy.

Each pixel's softmax over the N slots is scored against the slot that the Hungarian matching gave to
the pixel's GT mask. (The earlier PyTorch port compared against the GT mask index itself, with no
permutation: that is the bug this module does not reproduce.) deeplab2 weights by the pixel non-void
flag and averages over the non-zero losses, so pixels that belong to no GT mask (their one-hot
target is all zeros) drop out; here they are the pixels with target -1. Pixels of GT masks left
unmatched because there are more masks than slots are also left out (deeplab2 would score them
against a -99999 padded logit, docs/deeplab2.md#more-masks-than-slots).
"""

from __future__ import annotations

import torch

from maxdeeplab.models.losses.reduction import mean_over_nonzero


def mask_id_cross_entropy(mask_log_probs: torch.Tensor, target_slot: torch.Tensor) -> torch.Tensor:
    """Per-image mask-ID cross-entropy.

    Args:
        mask_log_probs: B x N x L, log-softmax over the N slots of each pixel's mask logits (the
            criterion computes it once and also uses its exp as the soft masks).
        target_slot: B x L int64, the matched slot of each pixel's GT mask, -1 for no target.

    Returns:
        B, the mean over the pixels with a non-zero loss.
    """
    has_target = target_slot >= 0
    target = mask_log_probs.gather(1, target_slot.clamp(min=0).unsqueeze(1)).squeeze(1)  # B x L
    return mean_over_nonzero(torch.where(has_target, -target, torch.zeros_like(target)))
