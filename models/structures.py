"""Typed containers shared by the network, the losses, the data pipeline and post-processing.

Shape letters (docs/architecture.md#conventions): B batch, N mask slots, M ground-truth masks
(padded), K real classes (K + 1 with void), D pixel-embedding dim, H x W the stride-4 output size,
S the crop side.

Label conventions (docs/deeplab2.md#coco-panoptic-ids): semantic ids are contiguous, 0 = void,
1..K = real classes with the things first, then the stuff. The transformer class head indexes
real classes as `semantic - 1` and puts void last (index K); the auxiliary semantic head keeps the
semantic ids (channel 0 = void).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class MaXDeepLabOutput:
    """What `MaXDeepLab.forward` returns.

    Attributes:
        class_logits: B x N x (K+1), void last.
        mask_logits: B x N x H x W at stride 4 (H = (S - 1) / 4 + 1).
        pixel_embed: B x D x H x W, L2-normalised over D.
        semantic_logits: B x (K+1) x H x W (channel 0 = void), or None when the auxiliary semantic
            branch is switched off.
    """

    class_logits: torch.Tensor
    mask_logits: torch.Tensor
    pixel_embed: torch.Tensor
    semantic_logits: torch.Tensor | None = None


@dataclass
class PanopticTargets:
    """Ground truth for one batch at the full crop resolution (the losses subsample it to stride 4).

    Built by the data pipeline (deeplab2's sample_generator,
    docs/deeplab2.md#ground-truth-at-stride-4): crowd and padding pixels are already void
    (semantic 0, thing id -1).

    Attributes:
        semantic: B x S x S int64, contiguous class ids, 0 = void.
        thing_ids: B x S x S int64, non-crowd thing instances numbered 0, 1, ... in order of first
            occurrence in the flattened crop, -1 elsewhere.
        thing_classes: B x T int64, the semantic class of each thing id, -1 for padding
            (T = max_thing_id, 128 as in deeplab2).
        pixel_weights: B x S x S float32, the per-pixel semantic-loss weight (1.0; the L variant's
            small-instance weighting raises it on small instances).
    """

    semantic: torch.Tensor
    thing_ids: torch.Tensor
    thing_classes: torch.Tensor
    pixel_weights: torch.Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PanopticTargets:
        return PanopticTargets(
            semantic=self.semantic.to(device, non_blocking=non_blocking),
            thing_ids=self.thing_ids.to(device, non_blocking=non_blocking),
            thing_classes=self.thing_classes.to(device, non_blocking=non_blocking),
            pixel_weights=self.pixel_weights.to(device, non_blocking=non_blocking),
        )
