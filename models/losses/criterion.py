"""The MaX-DeepLab training criterion: targets -> matching -> the five loss terms.

Described in docs/deeplab2.md#losses.

`compute_losses` returns the terms exactly as deeplab2 logs them: each already multiplied by its
weight, each the batch mean of per-image values, plus their sum.

- `pq_class`: pq_style_weight (3.0) x PQ-style class term (deeplab2 `pq_style_loss_class_term`)
- `pq_dice`: pq_style_weight x (alpha / N) x PQ-style dice term (`pq_style_loss_mask_dice_term`)
- `mask_id`: mask_id_weight (0.3) x mask-ID cross-entropy
- `instance_discrimination`: instance_discrimination_weight (1.0) x instance discrimination
- `semantic`: semantic_weight (1.0) x semantic cross-entropy; 0 when `semantic_logits` is None
- `total`: the sum of the five

A zero weight skips the term (its key then holds 0), like a loss option missing in deeplab2.

Non-finite values: the criterion never raises on NaN / inf (matching treats a non-finite similarity
as 0). deeplab2 replaces a NaN batch mean by 0 per term; we return the values untouched so that the
training loop sees them. The loop should check `losses_are_finite(losses)` (a 0-dim bool tensor, no
host sync until read), skip the optimizer step when it is False and count the skipped steps; with
DDP, all-reduce the flag first (MIN over ranks) so that every rank skips together.

All maths runs in float32 with autocast off (bf16 logits are upcast), on the device of the outputs.
"""

from __future__ import annotations

import torch

from maxdeeplab.models.config import LossConfig
from maxdeeplab.models.losses.instance_discrimination import instance_discrimination_loss
from maxdeeplab.models.losses.mask_id import mask_id_cross_entropy
from maxdeeplab.models.losses.pq_style import (
    class_term_weights,
    pq_class_term,
    pq_dice_term,
    void_ratio,
)
from maxdeeplab.models.losses.semantic import semantic_cross_entropy
from maxdeeplab.models.matching import Matching, match_slots
from maxdeeplab.models.structures import MaXDeepLabOutput, PanopticTargets
from maxdeeplab.models.targets import MaskTargets, build_mask_targets

LOSS_KEYS = ("pq_class", "pq_dice", "mask_id", "instance_discrimination", "semantic", "total")


def compute_losses(
    output: MaXDeepLabOutput,
    targets: PanopticTargets,
    *,
    loss_cfg: LossConfig,
    num_thing_classes: int,
) -> dict[str, torch.Tensor]:
    """All MaX-DeepLab losses for a batch (see the module docstring for the keys).

    Args:
        output: class_logits B x N x (K+1), mask_logits B x N x H x W, pixel_embed B x D x H x W,
            semantic_logits B x (K+1) x H x W or None.
        targets: full-crop labels (B x S x S with S = 4 (H - 1) + 1).
        loss_cfg: weights, alpha, temperature, negative weighting, matcher, max_thing_id.
        num_thing_classes: semantic ids 1..num_thing_classes are things.

    Returns:
        Scalar tensors keyed by `LOSS_KEYS`, differentiable w.r.t. the outputs.
    """
    losses, _ = compute_losses_and_matching(
        output, targets, loss_cfg=loss_cfg, num_thing_classes=num_thing_classes
    )
    return losses


def losses_are_finite(losses: dict[str, torch.Tensor]) -> torch.Tensor:
    """0-dim bool tensor: the total loss is finite (the step may be applied)."""
    return torch.isfinite(losses["total"])


def compute_losses_and_matching(
    output: MaXDeepLabOutput,
    targets: PanopticTargets,
    *,
    loss_cfg: LossConfig,
    num_thing_classes: int,
) -> tuple[dict[str, torch.Tensor], Matching]:
    """`compute_losses`, also returning the matching (for logging and tests)."""
    B, N, H, W = output.mask_logits.shape
    num_classes = output.class_logits.shape[-1] - 1
    mask_targets = build_mask_targets(
        targets.to(output.mask_logits.device),
        height=H,
        width=W,
        num_classes=num_classes,
        num_thing_classes=num_thing_classes,
        max_thing_id=loss_cfg.max_thing_id,
    )
    with torch.autocast(device_type=output.mask_logits.device.type, enabled=False):
        return _criterion(output, mask_targets, loss_cfg)


def _criterion(
    output: MaXDeepLabOutput, t: MaskTargets, cfg: LossConfig
) -> tuple[dict[str, torch.Tensor], Matching]:
    B, N, H, W = output.mask_logits.shape
    M = t.mask_valid.shape[1]
    mask_logits = output.mask_logits.float().reshape(B, N, H * W)  # B x N x L
    class_logits = output.class_logits.float()
    # One log-softmax over the slots serves the mask-ID cross-entropy; its exp is the soft masks.
    mask_log_probs = torch.log_softmax(mask_logits, dim=1)
    mask_probs = mask_log_probs.exp()

    # One matmul gives every per-slot pixel sum the losses need: the intersection with each GT mask
    # and the soft area on non-void and on void pixels.
    onehot = t.mask_onehot()  # B x L x M
    nonvoid = t.pixel_nonvoid.float()
    sums = torch.bmm(
        mask_probs, torch.cat([onehot, nonvoid[..., None], 1.0 - nonvoid[..., None]], 2)
    )
    intersection, nonvoid_area, void_area = sums[..., :M], sums[..., M], sums[..., M + 1]

    matching = match_slots(
        intersection.detach(),
        nonvoid_area.detach(),
        class_logits.detach(),
        t,
        matcher=cfg.matcher,
    )
    zero = mask_logits.new_zeros(())
    losses: dict[str, torch.Tensor] = {}

    if cfg.pq_style_weight:
        positive = matching.slot_mask >= 0
        slot_class = t.mask_classes.gather(1, matching.slot_mask.clamp(min=0))
        target_class = torch.where(positive, slot_class, class_logits.shape[-1] - 1)  # void last
        weights = class_term_weights(
            matching.slot_mask,
            matching.matched_dice,
            void_ratio(void_area, nonvoid_area + void_area),
            negative_weighting=cfg.negative_weighting,
        )
        class_term = pq_class_term(class_logits, target_class, weights, alpha=cfg.alpha)
        # Dice over pixels that belong to some GT mask (deeplab2 multiplies m_hat by that flag).
        dice_term = pq_dice_term(
            intersection,
            intersection.sum(dim=2),
            t.mask_area,
            matching.mask_slot,
            matching.matched_class_prob,
        )
        losses["pq_class"] = cfg.pq_style_weight * class_term.mean()
        losses["pq_dice"] = cfg.pq_style_weight * (cfg.alpha / N) * dice_term.mean()
    else:
        losses["pq_class"] = losses["pq_dice"] = zero

    if cfg.mask_id_weight:
        target_slot = matching.mask_slot.gather(1, t.pixel_mask.clamp(min=0))
        target_slot = torch.where(t.pixel_mask >= 0, target_slot, -1)  # B x L
        losses["mask_id"] = (
            cfg.mask_id_weight * mask_id_cross_entropy(mask_log_probs, target_slot).mean()
        )
    else:
        losses["mask_id"] = zero

    if cfg.instance_discrimination_weight:
        embed = output.pixel_embed.float().reshape(B, -1, H * W)  # B x D x L
        inst = instance_discrimination_loss(
            embed,
            onehot,
            t.mask_area,
            t.mask_valid,
            t.pixel_mask,
            t.pixel_thing,
            temperature=cfg.temperature,
        )
        losses["instance_discrimination"] = cfg.instance_discrimination_weight * inst.mean()
    else:
        losses["instance_discrimination"] = zero

    if cfg.semantic_weight and output.semantic_logits is not None:
        sem_logits = output.semantic_logits.float().reshape(B, -1, H * W)
        sem = semantic_cross_entropy(sem_logits, t.semantic, t.pixel_weights)
        losses["semantic"] = cfg.semantic_weight * sem.mean()
    else:
        losses["semantic"] = zero

    losses["total"] = sum((losses[k] for k in LOSS_KEYS[:-1]), zero)
    return losses, matching
