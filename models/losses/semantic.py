"""Auxiliary semantic cross-entropy of MaX-DeepLab (deeplab2 `TopKCrossEntropyLoss`).

Described in docs/deeplab2.md#semantic-loss.

Softmax cross-entropy over the K + 1 semantic channels (channel 0 = void) at stride 4 against the
subsampled labels, ignore label 0, per-pixel weights from the data (1.0 for S; the L variant raises
small instances to 3.0), averaged per image over the pixels with a non-zero weighted loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from maxdeeplab.models.losses.reduction import mean_over_nonzero

# The ignore label of the semantic maps (semantic 0 = void, docs/deeplab2.md#coco-panoptic-ids).
IGNORE_LABEL = 0


def semantic_cross_entropy(
    semantic_logits: torch.Tensor, semantic: torch.Tensor, pixel_weights: torch.Tensor
) -> torch.Tensor:
    """Per-image semantic cross-entropy with ignore label 0.

    Args:
        semantic_logits: B x (K+1) x L.
        semantic: B x L int64 labels, 0 = void.
        pixel_weights: B x L float weights.

    Returns:
        B, the mean over the non-zero weighted pixel losses.
    """
    ce = F.cross_entropy(semantic_logits, semantic, reduction="none")  # B x L
    weights = torch.where(semantic == IGNORE_LABEL, 0.0, pixel_weights)
    return mean_over_nonzero(ce * weights)
