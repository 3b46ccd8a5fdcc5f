"""The per-worker training loop run by Ray Train.

Context: docs/architecture.md#data-flow and #exact-resume; the solver: docs/deeplab2.md#solver.

Reads top to bottom like nanoGPT's train.py: data, model, optimiser, (resume), loop. Each Ray Train
worker runs `train_loop_per_worker`; `step_once`, `train_step` (here) and `evaluate`
(validation.py) are plain functions of a model, an optimiser and batches, usable without Ray:
every loop that trains (this one, the benchmark's, the tests') steps through `step_once`.

Exactness. The learning rate, the data order, the augmentation and the torch RNG are functions of
(seed, step) (and the rank), so a worker group restarted from the checkpoint of step s replays steps
s, s+1, ... exactly as the first attempt did.

Distribution. The global batch `train.batch_size` is split across the workers; when a worker cannot
hold its share in one pass (`train.micro_batch_size`), gradients accumulate over several passes (DDP
synchronises only on the last). SyncBatchNorm replaces BatchNorm on multi-GPU runs; PyTorch's
SyncBatchNorm has no CPU implementation, so CPU workers normalise per worker. bf16 autocast on GPU,
fp32 on CPU. Non-finite losses: every rank skips the update together (the flag is all-reduced); too
many in a row stop the run (`TrainingDiverged`), keeping the last good checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from maxdeeplab.models.losses.criterion import LOSS_KEYS, compute_losses
from maxdeeplab.models.network import MaXDeepLab, build_model, parameter_groups
from maxdeeplab.models.structures import PanopticTargets
from maxdeeplab.platform import tracking
from maxdeeplab.platform.config import ExperimentConfig, cache_dir
from maxdeeplab.platform.data.coco import DatasetInfo
from maxdeeplab.platform.data.dataset import batch_targets
from maxdeeplab.platform.data.loader import (
    build_eval_dataset,
    build_loader,
    build_train_dataset,
    iterate_from,
)
from maxdeeplab.platform.errors import ConfigError, MaXDeepLabError
from maxdeeplab.platform.storage import Location
from maxdeeplab.platform.training.checkpoint import (
    MODEL_FILE,
    TrainingState,
    load_checkpoint,
    load_initial_weights,
    save_checkpoint,
    unwrap,
)
from maxdeeplab.platform.training.optim import build_optimizer, set_learning_rate
from maxdeeplab.platform.training.progress import (
    CONSOLE_MARKER,
    Meter,
    console_logger,
    log_evaluation,
)
from maxdeeplab.platform.training.validation import autocast, evaluate

log = logging.getLogger(__name__)
STATUS_FILE = "maxdeeplab_status.json"  # in the run directory: how the loop ended
CRASH_DELAY_S = 5.0  # > 2 health-check periods of Ray Train's controller (2 s each)


class TrainingDiverged(MaXDeepLabError):
    """The loss was non-finite for more than `train.max_bad_steps` steps in a row."""


@dataclass
class LoopOptions:
    """What the launcher passes to every worker besides the experiment config.

    Attributes:
        experiment: the resolved config (absolute work_dir, model.num_classes set from the data).
        run_dir: the run's directory on storage every node reaches (a path or a URI, as
            `storage.Location.uri`): the status file.
        tracking_uri: MLflow store; rank 0 logs into `mlflow_run_id` (None: no tracking).
        crash_at_step: fault injection for tests: the first worker group to reach this step
            exits abruptly (a marker file in `run_dir` keeps the restarted group alive).
    """

    experiment: ExperimentConfig
    run_dir: str
    tracking_uri: str = ""
    mlflow_run_id: str | None = None
    crash_at_step: int | None = None


@dataclass(frozen=True)
class WorkerContext:
    """One Ray Train worker's place in the run, fixed for the worker's lifetime.

    Attributes:
        rank: this worker's world rank; rank 0 prints, logs to MLflow and saves checkpoints.
        world_size: the number of workers sharing the global batch.
        device: where this worker's model and batches live.
        cfg: the experiment (`LoopOptions.experiment`).
        run_dir, mlflow_run_id, crash_at_step: as in `LoopOptions`.
        console: rank 0's progress logger (None on the other ranks).
        logger: rank 0's MLflow logger (None on the other ranks and in untracked runs).
    """

    rank: int
    world_size: int
    device: torch.device
    cfg: ExperimentConfig
    run_dir: str
    mlflow_run_id: str | None = None
    crash_at_step: int | None = None
    console: logging.Logger | None = None
    logger: tracking.RunLogger | None = None


@dataclass
class StepResult:
    """One optimiser step: per-term losses (this rank's mean over its passes) and whether it ran."""

    losses: dict[str, torch.Tensor]
    applied: bool
    lr: float


# ---------------------------------------------------------------------------------------------
# Pieces usable without Ray


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
        skipped on every rank when any rank's loss is not finite.
    """
    lr = set_learning_rate(optimizer, step, cfg.optim, cfg.train.steps)
    optimizer.zero_grad(set_to_none=True)
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
    optimizer.zero_grad(set_to_none=True)
    return StepResult(losses=sums, applied=applied, lr=lr)


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


# ---------------------------------------------------------------------------------------------
# The Ray Train worker


def train_loop_per_worker(options: LoopOptions) -> None:
    """The Ray Train worker function (`TorchTrainer(train_loop_per_worker, ...)`)."""
    import ray.train
    import ray.train.torch

    cfg = options.experiment
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        # Ray sets OMP_NUM_THREADS from the worker's CPUs; torch must agree, also in local mode.
        torch.set_num_threads(max(1, int(cfg.resources.cpus_per_worker)))
    logger = (
        tracking.RunLogger(options.tracking_uri, options.mlflow_run_id)
        if rank == 0 and options.mlflow_run_id
        else None
    )
    ctx = WorkerContext(
        rank=rank,
        world_size=world_size,
        device=device,
        cfg=cfg,
        run_dir=options.run_dir,
        mlflow_run_id=options.mlflow_run_id,
        crash_at_step=options.crash_at_step,
        console=console_logger() if rank == 0 else None,
        logger=logger,
    )
    try:
        _run(ctx)
    finally:
        if logger is not None:
            logger.close()


def _run(ctx: WorkerContext) -> None:
    import ray.train
    import ray.train.torch

    cfg = ctx.cfg
    # --- data
    info, train_loader, eval_loader, passes = _build_data(ctx)
    # --- model and optimiser
    network = _build_network(ctx, info.num_classes)
    optimizer = build_optimizer(*parameter_groups(network), cfg.optim)
    state = _resume(ctx, network, optimizer)
    model: nn.Module = network
    if ctx.world_size > 1:
        model = ray.train.torch.prepare_model(network, move_to_device=False)
    # --- loop
    total = cfg.train.steps
    batches = iterate_from(train_loader, state.step * passes)
    meter = Meter(time.perf_counter(), state.step)
    metrics: dict[str, float] = {}
    while state.step < total:
        if state.step == ctx.crash_at_step:
            _inject_crash(ctx.run_dir)
        result = step_once(
            model,
            optimizer,
            batches,
            step=state.step,
            passes=passes,
            rank=ctx.rank,
            cfg=cfg,
            num_thing_classes=info.num_thing_classes,
            device=ctx.device,
        )
        state.step += 1
        meter.add(result)
        if result.applied:
            state.bad_steps_in_a_row = 0
        else:
            state.bad_steps_in_a_row += 1
            state.bad_steps_total += 1
            if state.bad_steps_in_a_row > cfg.train.max_bad_steps:
                _stop_diverged(ctx, state)
                return
        done = state.step == total
        if state.step % cfg.train.log_interval == 0 or done:
            metrics = meter.flush(state, cfg.train.batch_size, total, ctx.console)
            if ctx.logger is not None:
                ctx.logger.log_metrics(metrics, step=state.step)
        paused = time.perf_counter()
        if state.step % cfg.eval.interval == 0 or done:
            metrics.update(_evaluate(ctx, model, eval_loader, info, state.step, final=done))
        if state.step % cfg.train.checkpoint_interval == 0 or done:
            _report(ctx, metrics, state, model, optimizer, final=done)
        elif state.step % cfg.eval.interval == 0:
            ray.train.report({**metrics, "step": state.step})  # for Tune schedulers
        meter.exclude(time.perf_counter() - paused)
    _write_status(ctx.run_dir, ctx.rank, {"status": "finished", "step": state.step})


def _build_data(ctx: WorkerContext) -> tuple[DatasetInfo, DataLoader, DataLoader, int]:
    """(the dataset's info, this rank's train and eval loaders, micro-batches per step)."""
    cfg = ctx.cfg
    train_set = build_train_dataset(cfg.data, cfg.loss, cache_dir=cache_dir(cfg), seed=cfg.seed)
    full_eval_set = build_eval_dataset(cfg.data, cache_dir=cache_dir(cfg))
    eval_set: Dataset = full_eval_set
    if cfg.eval.max_images:
        eval_set = Subset(full_eval_set, range(min(cfg.eval.max_images, len(full_eval_set))))
    micro, passes = micro_batching(cfg.train.batch_size, ctx.world_size, cfg.train.micro_batch_size)
    train_loader = build_loader(
        train_set,
        batch_size=micro,
        num_workers=cfg.data.num_workers,
        seed=cfg.seed,
        num_replicas=ctx.world_size,
        rank=ctx.rank,
    )
    eval_loader = build_loader(
        eval_set,
        batch_size=cfg.eval.batch_size,
        num_workers=0,
        train=False,
        num_replicas=ctx.world_size,
        rank=ctx.rank,
    )
    return train_set.split.info, train_loader, eval_loader, passes


def _build_network(ctx: WorkerContext, num_classes: int) -> MaXDeepLab:
    """The model on `ctx.device`, with the same initial weights on every rank and every attempt."""
    cfg = ctx.cfg
    torch.manual_seed(cfg.seed)
    network = build_model(replace(cfg.model, num_classes=num_classes))
    if cfg.model.init_checkpoint:  # a resumed run overwrites these with its own checkpoint
        loaded = load_initial_weights(network, cfg.model.init_checkpoint)
        if ctx.console:
            ctx.console.info(
                "%s initialised %d tensors from %s",
                CONSOLE_MARKER,
                loaded,
                cfg.model.init_checkpoint,
            )
    if ctx.world_size > 1 and ctx.device.type == "cuda":
        # Replaces the BatchNorm layers inside; the top module, not a BatchNorm, comes back as is.
        network = cast(MaXDeepLab, nn.SyncBatchNorm.convert_sync_batchnorm(network))
    network.to(ctx.device)
    if cfg.train.channels_last and ctx.device.type == "cuda":
        # Module.to takes memory_format at run time; torch's type stubs leave it out.
        network.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return network


def _resume(
    ctx: WorkerContext, model: nn.Module, optimizer: torch.optim.Optimizer
) -> TrainingState:
    """Load Ray Train's latest checkpoint, if any, into `model` and `optimizer`; its position."""
    import ray.train

    resumed = ray.train.get_checkpoint()
    if resumed is None:
        return TrainingState()
    with resumed.as_directory() as directory:
        state, _ = load_checkpoint(directory, model=model, optimizer=optimizer)
    if ctx.console:
        ctx.console.info("%s resuming at step %d", CONSOLE_MARKER, state.step)
    return state


def _evaluate(
    ctx: WorkerContext,
    model: nn.Module,
    eval_loader: DataLoader,
    info: DatasetInfo,
    step: int,
    *,
    final: bool,
) -> dict[str, float]:
    """Validation metrics at `step` (every rank evaluates its shard; rank 0 shows and logs)."""
    evaluation = evaluate(
        unwrap(model),
        eval_loader,
        cfg=ctx.cfg,
        info=info,
        device=ctx.device,
        num_visualizations=ctx.cfg.eval.num_visualizations if ctx.rank == 0 else 0,
    )
    metrics = evaluation.metrics(info)
    log_evaluation(evaluation, step, info, ctx.console, ctx.logger, final=final)
    return metrics


def _inject_crash(run_dir: str) -> None:
    """Test hook: the first time only, exit abruptly like a lost node (no cleanup, no exception).

    It waits a few seconds first so that Ray Train's controller, which collects reports by polling
    the workers, has registered the checkpoints reported before the crash.
    """
    marker = Location(run_dir) / "crash_injected"
    if marker.exists():
        return
    marker.write_text("")
    time.sleep(CRASH_DELAY_S)
    os._exit(1)


def _report(
    ctx: WorkerContext,
    metrics: dict[str, float],
    state: TrainingState,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    final: bool,
) -> None:
    """`ray.train.report` with a checkpoint (a barrier: every rank calls it; rank 0 saves)."""
    import ray.train

    directory = tempfile.mkdtemp(prefix="maxdeeplab-ckpt-")
    try:
        checkpoint = None
        if ctx.rank == 0:
            save_checkpoint(
                directory,
                model=model,
                optimizer=optimizer,
                state=state,
                extra={"mlflow_run_id": ctx.mlflow_run_id},
            )
            checkpoint = ray.train.Checkpoint.from_directory(directory)
        ray.train.report(
            {**metrics, "step": state.step},
            checkpoint=checkpoint,
            checkpoint_dir_name=f"checkpoint_{state.step:09d}",
        )
        if final and ctx.logger is not None:
            ctx.logger.log_artifact(Path(directory) / MODEL_FILE, "checkpoint")
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _stop_diverged(ctx: WorkerContext, state: TrainingState) -> None:
    """Say why the run stops (console, MLflow, the status file the launcher reads)."""
    message = (
        f"the loss was NaN/inf for {state.bad_steps_in_a_row} steps in a row (last at step "
        f"{state.step - 1}; train.max_bad_steps={ctx.cfg.train.max_bad_steps}); "
        "stopped, the last good checkpoint is kept"
    )
    if ctx.console:
        ctx.console.error("%s %s", CONSOLE_MARKER, message)
    if ctx.logger is not None:
        ctx.logger.log_metrics({tracking.TRAIN_BAD_STEPS: state.bad_steps_total}, step=state.step)
    _write_status(
        ctx.run_dir, ctx.rank, {"status": "diverged", "step": state.step, "message": message}
    )


def _write_status(run_dir: str, rank: int, status: dict[str, Any]) -> None:
    if rank == 0 and run_dir:
        (Location(run_dir) / STATUS_FILE).write_text(json.dumps(status))


def read_status(run_dir: Location) -> dict[str, Any]:
    """How the loop of a run ended ({} if it never got there)."""
    path = run_dir / STATUS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}
