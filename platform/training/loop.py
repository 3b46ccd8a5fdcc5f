"""The per-worker training loop run by Ray Train.

Context: docs/architecture.md#data-flow and #exact-resume; the solver: docs/deeplab2.md#solver.

Reads top to bottom like nanoGPT's train.py: data, model, optimiser, (resume), loop. Each Ray Train
worker runs `train_loop_per_worker`; one step is `step.step_once`, evaluation
`validation.evaluate`: plain functions, usable without Ray.

Exactness. The learning rate, the data order, the augmentation and the torch RNG are functions of
(seed, step) (and the rank), so a worker group restarted from the checkpoint of step s replays steps
s, s+1, ... exactly as the first attempt did.

Distribution. The global batch `train.batch_size` is split across the workers; when a worker cannot
hold its share in one pass (`train.micro_batch_size`), gradients accumulate over several passes (DDP
synchronises only on the last). SyncBatchNorm replaces BatchNorm on multi-GPU runs; PyTorch's
SyncBatchNorm has no CPU implementation, so CPU workers normalise per worker. bf16 autocast on GPU,
fp32 on CPU. Non-finite losses: every rank skips the update together (the flag is all-reduced) and
the model stays as it was; too many in a row stop the run (`TrainingDiverged`), keeping the last
good checkpoint (only finite checkpoints are written).

Faults (docs/architecture.md#faults). A restart resumes from the newest intact checkpoint in the run
directory, skipping (and naming) corrupt ones. An error a restart cannot fix (`PERMANENT_ERRORS`:
config, data, a corrupt checkpoint) is recorded in the status file before it propagates; the next
attempt reads it and ends at once, so Ray Train's retries cost seconds and the driver reports it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from maxdeeplab.models.network import MaXDeepLab, build_model, parameter_groups
from maxdeeplab.platform import tracking
from maxdeeplab.platform.config import ExperimentConfig, cache_dir
from maxdeeplab.platform.data.coco import DatasetInfo
from maxdeeplab.platform.data.loader import (
    build_eval_dataset,
    build_loader,
    build_train_dataset,
    iterate_from,
)
from maxdeeplab.platform.errors import CheckpointError, ConfigError, DataError, MaXDeepLabError
from maxdeeplab.platform.storage import Location
from maxdeeplab.platform.training.checkpoint import (
    MODEL_FILE,
    TrainingState,
    checkpoint_dir_name,
    latest_good_checkpoint,
    load_checkpoint,
    load_initial_weights,
    local_copy,
    next_generation,
    save_checkpoint,
    unwrap,
)
from maxdeeplab.platform.training.optim import build_optimizer
from maxdeeplab.platform.training.progress import (
    CONSOLE_MARKER,
    Meter,
    console_logger,
    log_evaluation,
)
from maxdeeplab.platform.training.step import micro_batching, step_once
from maxdeeplab.platform.training.validation import evaluate

log = logging.getLogger(__name__)
STATUS_FILE = "maxdeeplab_status.json"  # in the run directory: how the loop ended
CRASH_DELAY_S = 5.0  # > 2 health-check periods of Ray Train's controller (2 s each)


class TrainingDiverged(MaXDeepLabError):
    """The loss was non-finite for more than `train.max_bad_steps` steps in a row."""


# Errors that another attempt would meet again (unlike a lost node, or storage or a tracking
# server that does not answer for a while): recorded, and not retried.
PERMANENT_ERRORS: tuple[type[MaXDeepLabError], ...] = (ConfigError, DataError, CheckpointError)


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
        console_prefix: put before each console line (a sweep's trial name: whose line it is).
    """

    experiment: ExperimentConfig
    run_dir: str
    tracking_uri: str = ""
    mlflow_run_id: str | None = None
    crash_at_step: int | None = None
    console_prefix: str = ""


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
class Resumed:
    """Where this attempt starts: the loop state and the suffix of the checkpoint names it writes
    (non-zero after skipping corrupt checkpoints, `checkpoint.checkpoint_dir_name`)."""

    state: TrainingState
    generation: int = 0


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
        console=console_logger(options.console_prefix) if rank == 0 else None,
        logger=logger,
    )
    try:
        earlier = read_status(Location(options.run_dir))
        if earlier.get("status") == "error":
            # An earlier attempt of this fit() hit an error that a restart cannot fix: end at
            # once, and the driver reports it (no collective has started, so every rank returns).
            return
        _run(ctx)
    except PERMANENT_ERRORS as exc:
        record = {"status": "error", "message": str(exc), "type": type(exc).__name__}
        (Location(options.run_dir) / STATUS_FILE).write_text(json.dumps(record))
        raise
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
    resumed = _resume(ctx, network, optimizer)
    state = resumed.state
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
            _report(
                ctx, metrics, state, model, optimizer, final=done, generation=resumed.generation
            )
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


def _resume(ctx: WorkerContext, model: nn.Module, optimizer: torch.optim.Optimizer) -> Resumed:
    """Load the run's newest intact checkpoint, if any, into `model` and `optimizer`.

    The run directory is read rather than `ray.train.get_checkpoint()` (Ray's latest), so that a
    corrupt latest checkpoint is skipped for the one before it. Every rank decides the same way.

    Raises:
        CheckpointError: the run has checkpoints but none is intact or loadable.
    """
    run_dir = Location(ctx.run_dir)
    skipped: list[str] = []
    location = latest_good_checkpoint(run_dir, report=skipped.append) if ctx.run_dir else None
    if location is None:
        return Resumed(TrainingState())
    with local_copy(location) as directory:
        state, _ = load_checkpoint(directory, model=model, optimizer=optimizer)
    if ctx.console:
        for line in skipped:
            ctx.console.warning("%s %s", CONSOLE_MARKER, line)
        ctx.console.info(
            "%s resuming at step %d from %s", CONSOLE_MARKER, state.step, location.name
        )
    return Resumed(state, next_generation(run_dir) if skipped else 0)


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
    generation: int,
) -> None:
    """`ray.train.report` with a checkpoint (a barrier: every rank calls it; rank 0 saves).

    A model or optimiser state with a non-finite tensor is not saved: the report goes without a
    checkpoint, and the previous (finite) one stays the run's latest.
    """
    import ray.train

    directory = tempfile.mkdtemp(prefix="maxdeeplab-ckpt-")
    try:
        checkpoint = None
        if ctx.rank == 0:
            try:
                save_checkpoint(
                    directory,
                    model=model,
                    optimizer=optimizer,
                    state=state,
                    extra={"mlflow_run_id": ctx.mlflow_run_id},
                )
                checkpoint = ray.train.Checkpoint.from_directory(directory)
            except CheckpointError as exc:
                if ctx.console:
                    ctx.console.warning("%s %s; the last good one is kept", CONSOLE_MARKER, exc)
        ray.train.report(
            {**metrics, "step": state.step},
            checkpoint=checkpoint,
            checkpoint_dir_name=checkpoint_dir_name(state.step, generation),
        )
        if checkpoint is not None and ctx.console:
            ctx.console.info(
                "%s checkpoint of step %d saved and verified", CONSOLE_MARKER, state.step
            )
        if final and checkpoint is not None and ctx.logger is not None:
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
