"""deeplab2's per-image loss reduction (`base_loss.compute_average_top_k_loss` with top_k = 1.0).

Every per-pixel / per-slot loss of MaX-DeepLab is summed per image and divided by the number of
entries whose weighted loss is not exactly zero (`divide_no_nan`: 0 when there are none). Entries
with weight 0 (void pixels, stuff pixels in instance discrimination, ...) therefore drop out of the
denominator.
"""

from __future__ import annotations

import torch


def mean_over_nonzero(losses: torch.Tensor) -> torch.Tensor:
    """Per-image mean over the non-zero entries.

    Args:
        losses: B x ... weighted losses.

    Returns:
        B, the sum over each image divided by its count of non-zero entries (0 if there are none).
    """
    flat = losses.reshape(losses.shape[0], -1)
    count = (flat != 0).sum(dim=1).to(flat.dtype)
    total = flat.sum(dim=1)
    return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))
