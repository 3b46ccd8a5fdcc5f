"""One training step: micro-batches -> forward -> losses -> backward -> (skipped or) update.

Plain functions of a model, an optimiser and batches, usable without Ray: every loop that trains
(the Ray Train worker in loop.py, the benchmarks', the tests') steps through `step_once`.
Exactness: the learning rate and the torch RNG (drop path) are functions of (seed, step, rank),
so a run resumed at step s replays the first attempt's steps (docs/architecture.md#exact-resume).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from maxdeeplab.models.losses.criterion import LOSS_KEYS, compute_losses
from maxdeeplab.models.structures import PanopticTargets
from maxdeeplab.platform.config import ExperimentConfig
from maxdeeplab.platform.data.dataset import batch_targets
from maxdeeplab.platform.errors import ConfigError
from maxdeeplab.platform.training.optim import set_learning_rate
from maxdeeplab.platform.training.validation import autocast


@dataclass
class StepResult:
    """One optimiser step: per-term losses (this rank's mean over its passes) and whether it ran."""

    losses: dict[str, torch.Tensor]
    applied: bool
    lr: float


def micro_batching(batch_size: int, world_size: int, micro_batch_size: int) -> tuple[int, int]:
    """(images per worker per pass, passes per step) for a global batch split across workers.

    Raises:
        ConfigError: the batch does not split evenly.
    """
    if batch_size % world_size:
        raise ConfigError(
            f"train.batch_size={batch_size} is not divisible by resources.num_workers={world_size}"
        )
    per_worker = batch_size // world_size
    micro = micro_batch_size or per_worker
    if micro > per_worker or per_worker % micro:
        raise ConfigError(
            f"train.micro_batch_size={micro_batch_size} must divide the per-worker batch "
            f"{per_worker} (train.batch_size / resources.num_workers)"
        )
    return micro, per_worker // micro


def seed_step(seed: int, step: int, rank: int) -> None:
    """Seed torch's RNG (drop path) from (seed, step, rank): a resumed run redraws the same."""
    torch.manual_seed(int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0]))


def _to_device(
    batch: dict[str, torch.Tensor], device: torch.device, channels_last: bool
) -> tuple[torch.Tensor, PanopticTargets]:
    images = batch["image"].to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    targets: PanopticTargets = batch_targets(batch).to(device, non_blocking=True)
    return images, targets


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: Sequence[dict[str, torch.Tensor]],
    *,
    step: int,
    cfg: ExperimentConfig,
    num_thing_classes: int,
    device: torch.device,
) -> StepResult:
    """One optimiser update at global step `step` over gradient-accumulated passes.

    Args:
        model: the model (DDP-wrapped on multi-worker runs; then only the last pass synchronises).
        optimizer: from `optim.build_optimizer`; its learning rates are set here from the step.
        micro_batches: this rank's passes; each a `collate_train` dict (image B x 3 x S x S, ...).
        step: the global step (0-based) whose learning rate applies.
        cfg: the experiment (loss, optim, train.steps, train.amp, train.channels_last).
        num_thing_classes: semantic ids 1..T are things.
        device: where the model lives.

    Returns:
        The per-term losses (detached, on `device`) and whether the update was applied: it is
        skipped on every rank when any rank's loss is not finite, and then the model (parameters
        and buffers) is exactly as it was before the step.
    """
    lr = set_learning_rate(optimizer, step, cfg.optim, cfg.train.steps)
    optimizer.zero_grad(set_to_none=True)
    # The forward pass in train mode updates BatchNorm's running statistics before the loss is
    # known; a skipped step must leave them as they were, or one NaN batch poisons them for good.
    buffers_before = {name: b.detach().clone() for name, b in model.named_buffers()}
    channels_last = cfg.train.channels_last and device.type == "cuda"
    sums = {key: torch.zeros((), device=device) for key in LOSS_KEYS}
    passes = len(micro_batches)
    for index, batch in enumerate(micro_batches):
        images, targets = _to_device(batch, device, channels_last)
        last = index == passes - 1
        no_sync = getattr(model, "no_sync", None)
        sync_context = no_sync() if (no_sync is not None and not last) else contextlib.nullcontext()
        with sync_context:
            with autocast(device, cfg.train.amp):
                output = model(images)
            losses = compute_losses(
                output, targets, loss_cfg=cfg.loss, num_thing_classes=num_thing_classes
            )
            (losses["total"] / passes).backward()
        for key in LOSS_KEYS:
            sums[key] += losses[key].detach() / passes
    finite = torch.isfinite(sums["total"]).to(torch.int32)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    applied = bool(finite.item())
    if applied:
        optimizer.step()
    else:
        restore_buffers(model, buffers_before)
    optimizer.zero_grad(set_to_none=True)
    return StepResult(losses=sums, applied=applied, lr=lr)


@torch.no_grad()
def restore_buffers(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Copy `saved` (from `named_buffers`) back into the model's buffers, in place."""
    for name, buffer in model.named_buffers():
        buffer.copy_(saved[name])


def step_once(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterator[dict[str, torch.Tensor]],
    *,
    step: int,
    passes: int,
    rank: int,
    cfg: ExperimentConfig,
    num_thing_classes: int,
    device: torch.device,
) -> StepResult:
    """Global step `step` from the batch stream: fetch its passes, seed it, run `train_step`.

    Every loop that trains (the Ray Train worker, the benchmark's plain loop, the tests) steps
    through here, so a run resumed at step s with `iterate_from(loader, s * passes)` replays the
    first attempt's data and random draws exactly.

    Args:
        batches: this rank's micro-batches in order (`data.loader.iterate_from`); `passes` of
            them are taken.
        step: the global step (0-based).
        passes: micro-batches per step (`micro_batching`); gradients accumulate over them.
        rank: this worker's world rank (each rank draws its own drop path).
        model, optimizer, cfg, num_thing_classes, device: as in `train_step`.

    Returns:
        `train_step`'s result; a non-finite step is skipped there on every rank.
    """
    micro_batches = [next(batches) for _ in range(passes)]
    # Seed after fetching: a new DataLoader iterator (each epoch) draws from torch's RNG.
    seed_step(cfg.seed, step, rank)
    return train_step(
        model,
        optimizer,
        micro_batches,
        step=step,
        cfg=cfg,
        num_thing_classes=num_thing_classes,
        device=device,
    )
