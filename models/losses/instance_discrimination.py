"""Instance discrimination loss of MaX-DeepLab (deeplab2's original form, sample_k = 0).

Described in docs/deeplab2.md#instance-discrimination.

For every non-void GT mask i (things and stuff) the mask feature is the L2-normalised mean of the
L2-normalised pixel embeddings g over the mask. Each pixel then classifies itself among the GT masks
of its image with logits `g(p) . t_i / tau` (tau = 0.3; padding masks are masked with -99999). The
cross-entropy is weighted by the thing-pixel flag only (stuff pixels are contrast targets but give
no loss) and averaged over the non-zero losses. All stride-4 pixels are used, no sampling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from maxdeeplab.models.losses.reduction import mean_over_nonzero

# deeplab2 `_SOFTMAX_MASKING_CONSTANT`: the logit of masked entries.
SOFTMAX_MASKING_CONSTANT = -99999.0
# tf.math.l2_normalize divides by sqrt(max(sum x^2, 1e-12)), i.e. by max(norm, 1e-6).
L2_NORMALIZE_EPS = 1e-6


def instance_discrimination_loss(
    pixel_embed: torch.Tensor,
    mask_onehot: torch.Tensor,
    mask_area: torch.Tensor,
    mask_valid: torch.Tensor,
    pixel_mask: torch.Tensor,
    pixel_thing: torch.Tensor,
    *,
    temperature: float,
) -> torch.Tensor:
    """Per-image instance discrimination.

    Args:
        pixel_embed: B x D x L, L2-normalised pixel embeddings.
        mask_onehot: B x L x M pixel-to-GT-mask one-hot.
        mask_area: B x M pixel count of each mask.
        mask_valid: B x M, False on padding masks.
        pixel_mask: B x L, the GT mask of each pixel (-1 none).
        pixel_thing: B x L bool, the loss weight: pixels of thing masks.
        temperature: tau.

    Returns:
        B, the mean over the non-zero pixel losses.
    """
    mask_feature = torch.bmm(pixel_embed, mask_onehot) / mask_area.clamp(min=1.0).unsqueeze(1)
    mask_feature = F.normalize(mask_feature, dim=1, eps=L2_NORMALIZE_EPS)  # B x D x M
    logits = torch.einsum("bdl,bdm->blm", pixel_embed, mask_feature) / temperature
    logits = logits.masked_fill(~mask_valid.unsqueeze(1), SOFTMAX_MASKING_CONSTANT)  # B x L x M
    target_logit = logits.gather(2, pixel_mask.clamp(min=0).unsqueeze(2)).squeeze(2)
    ce = torch.logsumexp(logits, dim=2) - target_logit
    return mean_over_nonzero(torch.where(pixel_thing, ce, torch.zeros_like(ce)))
