"""Adam, linear warmup then poly decay, backbone at 0.1x (deeplab2 trainer_utils.py).

Described in docs/deeplab2.md#solver and #backbone-learning-rate.

deeplab2 trains with tf.keras Adam (eps 1e-7, no weight decay). Its learning rate is a pure function
of the global step: linear warmup from exactly 0 (`base * step / warmup`) for `step < warmup`, then
`PolynomialDecay(base, T, end, power 0.9)` evaluated at the *unshifted* step, so the warmup ends at
`base * (1 - warmup / T) ** 0.9` rather than at `base`. The backbone (ImageNet-pretrained encoder
variables) uses a second Adam on the same schedule scaled by 0.1; Adam's update is per parameter, so
one Adam with two parameter groups whose learning rates differ by that factor is the same optimiser.

The learning rate is set from the step before every update instead of through a stateful scheduler,
so a run restored from a checkpoint at step s continues with exactly the rate an uninterrupted run
would use.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from maxdeeplab.platform.config import OptimConfig

LR_MULTIPLIER_KEY = "lr_multiplier"  # stored in each param group; the schedule scales it


def learning_rate(
    step: int,
    *,
    base_lr: float,
    total_steps: int,
    warmup_steps: int,
    power: float,
    end_lr: float = 0.0,
) -> float:
    """The learning rate of the update made at global step `step` (0-based).

    Args:
        step: the global step (0 for the first update).
        base_lr: the peak learning rate.
        total_steps: the poly decay horizon (deeplab2's `training_number_of_steps`).
        warmup_steps: linear warmup length; 0 disables the warmup.
        power: the poly exponent (0.9).
        end_lr: the learning rate reached at `total_steps`.

    Returns:
        `base * step / warmup` during the warmup, else
        `(base - end) * (1 - min(step, T) / T) ** power + end`.
    """
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    progress = min(step, total_steps) / total_steps
    return (base_lr - end_lr) * (1.0 - progress) ** power + end_lr


def schedule_learning_rate(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """`learning_rate` with the hyper-parameters of an `OptimConfig`."""
    return learning_rate(
        step,
        base_lr=cfg.lr,
        total_steps=total_steps,
        warmup_steps=cfg.warmup_steps,
        power=cfg.poly_power,
        end_lr=cfg.end_lr,
    )


def build_optimizer(
    backbone_params: Iterable[nn.Parameter],
    other_params: Iterable[nn.Parameter],
    cfg: OptimConfig,
) -> torch.optim.Adam:
    """Adam over two parameter groups: the backbone at `cfg.backbone_lr_multiplier`, the rest at 1x.

    Args:
        backbone_params: the ImageNet-pretrained encoder parameters (the model's `parameter_groups`
            applies deeplab2's naming rule).
        other_params: every other trainable parameter.
        cfg: the optimiser settings.

    Returns:
        An Adam whose groups carry `lr_multiplier`; call `set_learning_rate` before each step.
    """
    groups = [
        {"params": list(backbone_params), LR_MULTIPLIER_KEY: cfg.backbone_lr_multiplier},
        {"params": list(other_params), LR_MULTIPLIER_KEY: 1.0},
    ]
    groups = [g for g in groups if g["params"]]
    return torch.optim.Adam(
        groups,
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
    )


def set_learning_rate(
    optimizer: torch.optim.Optimizer, step: int, cfg: OptimConfig, total_steps: int
) -> float:
    """Set every group's rate for the update at `step`; returns the base (1x) rate."""
    lr = schedule_learning_rate(step, cfg, total_steps)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get(LR_MULTIPLIER_KEY, 1.0)
    return lr
