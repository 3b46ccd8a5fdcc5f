"""The driver side of a training run: Ray, the run directory, MLflow and one `TorchTrainer`.

    prepare_experiment  normalised work_dir and cache_dir, the synthetic set, classes from the data
    start_ray           an embedded local Ray by default; `--address` / RAY_ADDRESS joins a cluster
    train               new or resumed run -> MLflow run -> TorchTrainer.fit -> one-line errors

Layout of a run (`<work_dir>/ray/<run name>/`, Ray Train's `RunConfig(name, storage_path)`):
Ray's checkpoints `checkpoint_<step>/`, our `config.yaml` (the resolved experiment), `mlflow_run_id`
and the loop's status file. Re-running a TorchTrainer with the same name and storage path makes Ray
continue from the run's latest checkpoint (docs/architecture.md#run-names-decide-resume), which is
how `--resume` works; a new run therefore always gets a new name.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from maxdeeplab.platform import tracking
from maxdeeplab.platform.config import ExperimentConfig, cache_dir, to_yaml, work_dir
from maxdeeplab.platform.errors import ConfigError, MaXDeepLabError
from maxdeeplab.platform.interrupts import Interrupted, run_interruptibly
from maxdeeplab.platform.run_lock import DriverLock
from maxdeeplab.platform.storage import Location

log = logging.getLogger(__name__)
RAY_SUBDIR = "ray"  # <work_dir>/ray is Ray Train's storage_path
CONFIG_FILE = "config.yaml"


class TrainingFailed(MaXDeepLabError):
    """The worker group failed more often than `resources.max_failures` allows."""


@dataclass
class TrainOutcome:
    """What a finished training run left behind."""

    run_name: str
    run_dir: Location
    mlflow_run_id: str | None
    metrics: dict[str, Any]  # the last report that carried a checkpoint (Ray's Result.metrics)
    checkpoint_path: str | None


# ---------------------------------------------------------------------------------------------
# Preparation


def prepare_experiment(cfg: ExperimentConfig, *, generate_data: bool = True) -> ExperimentConfig:
    """The config the workers get: normalised work_dir and cache_dir, the data's class counts.

    Generates the synthetic set into the driver's cache here, before any worker starts (workers
    on other nodes fill their own caches the same way). With `generate_data=False` (`config show`
    and `config check`) nothing is written: the synthetic set's classes are fixed.

    Raises:
        DataError: the dataset root is missing or unreadable.
        ConfigError: the batch does not split across the workers.
    """
    from maxdeeplab.platform.data.coco import CocoPanoptic, DatasetInfo
    from maxdeeplab.platform.data.loader import resolve_data_root
    from maxdeeplab.platform.data.synthetic import CATEGORIES
    from maxdeeplab.platform.training.step import micro_batching

    cache = cache_dir(cfg)
    if cfg.data.root or generate_data:
        info = CocoPanoptic(resolve_data_root(cfg.data, cache), cfg.data.train_split).info
    else:
        info = DatasetInfo.from_json_categories(CATEGORIES, "the synthetic set")
    micro_batching(cfg.train.batch_size, cfg.resources.num_workers, cfg.train.micro_batch_size)
    if cfg.eval.batch_size <= 0:
        raise ConfigError(f"bad value {cfg.eval.batch_size!r} for 'eval.batch_size': must be > 0")
    init = cfg.model.init_checkpoint
    if init and not Path(init).expanduser().exists():
        raise ConfigError(f"model.init_checkpoint: {init} not found")
    model = replace(
        cfg.model,
        num_classes=info.num_classes,
        num_thing_classes=info.num_thing_classes,
        # absolute: Ray workers and Tune trials run in other directories
        init_checkpoint=str(Path(init).expanduser().resolve()) if init else "",
    )
    return replace(cfg, work_dir=str(work_dir(cfg)), cache_dir=str(cache), model=model)


def default_run_name(cfg: ExperimentConfig) -> str:
    """`tracking.run_name`, else `<name>-<UTC time>`."""
    return cfg.tracking.run_name or f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"


def run_directory(cfg: ExperimentConfig, run_name: str) -> Location:
    return work_dir(cfg) / RAY_SUBDIR / run_name


def find_run(reference: str, work_dir_hint: str = "runs") -> Location:
    """A run directory from its path or URI, or from a run name under `<work_dir_hint>/ray/`.

    Raises:
        ConfigError: no such run (saying where it looked and that --work-dir is the way out).
        StorageError: the storage cannot be read.
    """
    by_name = Location.parse(work_dir_hint) / RAY_SUBDIR / reference
    candidates = [Location.parse(reference), by_name]
    if "/" not in reference:  # a run name, most likely
        candidates.reverse()
    for candidate in candidates:
        if (candidate / CONFIG_FILE).is_file():
            return candidate
    raise ConfigError(
        f"--resume {reference}: no run with a {CONFIG_FILE} at "
        f"{' or '.join(map(str, candidates))}; name the run's work dir with --work-dir "
        "(e.g. --work-dir s3://bucket/prefix)"
    )


# ---------------------------------------------------------------------------------------------
# Ray

DASHBOARD_PORT = 8265  # Ray's default


def free_port(preferred: int = 0) -> int:
    """`preferred` if nothing listens on it (127.0.0.1), else a free port the OS picks.

    Ray 2.60 fails to start when its dashboard port is taken (e.g. by another local Ray).
    """
    for candidate in (preferred, 0) if preferred else (0,):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("127.0.0.1", candidate))
            except OSError:
                continue
            return int(probe.getsockname()[1])
    raise OSError("no free TCP port")


def start_ray(address: str | None = None, *, quiet: bool = True) -> None:
    """Connect to Ray unless already connected: `address`, else RAY_ADDRESS, else a local instance.

    The local instance listens on 127.0.0.1 only (it has no authentication) and keeps its
    dashboard process: without it Train V2 cannot clean up a finished run's placement group and
    the next run on the same instance waits forever
    (docs/architecture.md#keep-the-dashboard-process). Local starts on one machine take turns
    (`_local_start_turn`), so that two commands started together get different dashboard ports.
    Importing and starting Ray take seconds, so a line says so first.
    """
    loaded = sys.modules.get("ray")
    if loaded is not None and loaded.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    print(
        f"joining Ray at {address}..." if address else "starting Ray (local, 127.0.0.1)...",
        flush=True,
    )
    import ray

    level = logging.ERROR if quiet else logging.INFO
    if address:
        ray.init(address=address, logging_level=level)
    else:
        _listen_on_loopback()
        with _local_start_turn():
            port = free_port(DASHBOARD_PORT)
            ray.init(include_dashboard=True, dashboard_port=port, logging_level=level)
    if quiet:
        show_only_progress_lines()


def _listen_on_loopback() -> None:
    """Make a local Ray bind every server to 127.0.0.1, not to all interfaces.

    Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER ("this machine only": the node's address is the
    loopback one) into a constant when it is imported; both are set, for this process and for the
    processes Ray starts.
    """
    import ray._private.ray_constants as ray_constants

    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


@contextlib.contextmanager
def _local_start_turn() -> Iterator[None]:
    """Hold a machine-wide file lock while choosing ports and starting a local Ray.

    A free port is only free until someone binds it: two starts in the same second both chose
    8265 and the second Ray failed after a long wait. Inside the lock the first Ray has bound its
    ports before the second one chooses.
    """
    path = Path(tempfile.gettempdir()) / "maxdeeplab-ray-start.lock"
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def show_only_progress_lines() -> None:
    """Print only the workers' progress lines, without Ray's prefixes.

    Ray forwards every worker and controller log line to the driver, including messages that
    repeat during healthy runs (PlacementGroupCleaner, PreemptionWatcher). All of it
    stays in Ray's session logs; the console shows the lines the training loop marks. This uses
    Ray's (private) log-forwarding hook; if it is missing, Ray's default printing stays.
    """
    from maxdeeplab.platform.training.progress import marked_text

    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return

    def print_marked(data: dict[str, Any]) -> None:
        for line in data.get("lines", []):
            text = marked_text(line)
            if text is not None:
                print(text, flush=True)

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", print_marked)


# ---------------------------------------------------------------------------------------------
# Training


def build_trainer(
    cfg: ExperimentConfig,
    *,
    run_name: str,
    mlflow_run_id: str | None,
    crash_at_step: int | None = None,
    callbacks: Sequence[Any] = (),
    local: bool = False,
    console_prefix: str = "",
) -> Any:
    """The Ray Train V2 `TorchTrainer` of a prepared experiment.

    Args:
        cfg: from `prepare_experiment`.
        run_name: Ray Train's run name (a directory under `<work_dir>/ray`).
        mlflow_run_id: the run world rank 0 logs into (None: no MLflow logging).
        crash_at_step: test hook: the first attempt's workers exit abruptly at this step.
        callbacks: Ray Train `UserCallback`s (e.g. Tune's `TuneReportCallback`).
        local: run the loop in this process without workers (`ScalingConfig(num_workers=0)`,
            Ray Train's local mode): for references in tests and benchmarks.
        console_prefix: put before each console line of the loop (a sweep's trial name).
    """
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from maxdeeplab.platform.training.loop import LoopOptions, train_loop_per_worker
    from maxdeeplab.platform.training.placement_groups import PlacementGroupRecorder

    res = cfg.resources
    per_worker: dict[str, float] = {"CPU": res.cpus_per_worker}
    if res.use_gpu:
        per_worker["GPU"] = 1.0
    scaling = ScalingConfig(
        num_workers=0 if local else res.num_workers,
        use_gpu=res.use_gpu,
        resources_per_worker=per_worker,
        placement_strategy=res.placement_strategy,
    )
    if not local:  # the driver removes what this records when fit() ends (placement_groups.py)
        callbacks = [*callbacks, PlacementGroupRecorder(str(run_directory(cfg, run_name)))]
    # Ray Train v2 (the default) re-exports its own RunConfig, which takes logging_config; mypy
    # only sees the older ray.air one that `ray.train` binds first.
    run_config = RunConfig(  # type: ignore[call-arg]
        name=run_name,
        storage_path=str(work_dir(cfg) / RAY_SUBDIR),
        failure_config=FailureConfig(max_failures=res.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
        logging_config=LoggingConfig(log_level="WARNING"),
        callbacks=list(callbacks),
    )
    options = LoopOptions(
        experiment=cfg,
        run_dir=str(run_directory(cfg, run_name)),
        tracking_uri=tracking.tracking_uri(cfg),
        mlflow_run_id=mlflow_run_id,
        crash_at_step=crash_at_step,
        console_prefix=console_prefix,
    )
    # Ray hands train_loop_config to the worker function whatever its type; its stubs say dict.
    return TorchTrainer(
        train_loop_per_worker,  # type: ignore[arg-type]
        train_loop_config=options,  # type: ignore[arg-type]
        scaling_config=scaling,
        run_config=run_config,
    )


def train(
    cfg: ExperimentConfig,
    *,
    run_name: str | None = None,
    resume: bool | None = False,
    address: str | None = None,
    parent_run_id: str | None = None,
    track: bool = True,
    crash_at_step: int | None = None,
    callbacks: Sequence[Any] = (),
    local: bool = False,
    quiet: bool = True,
    preflight: bool = True,
    console_prefix: str = "",
    mlflow_tags: Mapping[str, str] | None = None,
) -> TrainOutcome:
    """Train an experiment with Ray Train, tracked in MLflow.

    Args:
        cfg: the resolved experiment.
        run_name: default `default_run_name(cfg)`.
        resume: False: a new run (its directory must not exist); True: continue the existing run
            of this name from its latest checkpoint and its MLflow run; None: resume if it exists
            (Tune trials restored by `Tuner.restore`).
        address: a Ray cluster to join (default RAY_ADDRESS, else a local instance).
        parent_run_id: the MLflow parent run (a sweep), making this run its child.
        track: log to MLflow.
        crash_at_step: test hook (see `build_trainer`).
        callbacks: Ray Train `UserCallback`s.
        local: run in this process (`build_trainer`); Ray is not started.
        quiet: show only progress lines from the workers.
        preflight: check storage, tracking server and Ray address first (a sweep's trials skip
            it: their driver checked).
        console_prefix: put before each of the loop's console lines (a sweep's trial name).
        mlflow_tags: tags of a new MLflow run; `mlflow.runName` among them names it instead of
            `run_name` (a sweep's trial: its name, search point and Tune trial id).

    Raises:
        ConfigError: the run exists and `resume` is False, or does not and `resume` is True.
        TrainingFailed: the workers failed beyond `resources.max_failures` (one line, the cause).
        TrainingDiverged: the loss stayed non-finite for too long.
    """
    from maxdeeplab.platform.preflight import check_run_prerequisites

    if preflight:
        check_run_prerequisites(cfg, None if local else address)
    cfg = prepare_experiment(cfg)
    run_name = run_name or default_run_name(cfg)
    run_dir = run_directory(cfg, run_name)
    # Taken before the existence check, which makes "already exists" atomic between two drivers.
    with DriverLock(run_dir, f"run {run_name!r}", command=" ".join(sys.argv)):
        return _train_run(
            cfg,
            run_name=run_name,
            run_dir=run_dir,
            resume=resume,
            address=address,
            parent_run_id=parent_run_id,
            track=track,
            crash_at_step=crash_at_step,
            callbacks=callbacks,
            local=local,
            quiet=quiet,
            console_prefix=console_prefix,
            mlflow_tags=mlflow_tags,
        )


def _train_run(
    cfg: ExperimentConfig,
    *,
    run_name: str,
    run_dir: Location,
    resume: bool | None,
    address: str | None,
    parent_run_id: str | None,
    track: bool,
    crash_at_step: int | None,
    callbacks: Sequence[Any],
    local: bool,
    quiet: bool,
    console_prefix: str = "",
    mlflow_tags: Mapping[str, str] | None = None,
) -> TrainOutcome:
    """`train` once this driver holds the run: check, record, fit, and say how it ended."""
    from maxdeeplab.platform.training.checkpoint import latest_good_checkpoint
    from maxdeeplab.platform.training.loop import (
        PERMANENT_ERRORS,
        STATUS_FILE,
        TrainingDiverged,
        read_status,
    )
    from maxdeeplab.platform.training.placement_groups import remove_placement_groups

    exists = (run_dir / CONFIG_FILE).is_file()
    if resume is None:
        resume = exists
    if exists and not resume:
        raise ConfigError(
            f"run {run_name!r} already exists in {run_dir.parent}; continue it with "
            f"--resume {run_name} or choose another tracking.run_name"
        )
    if resume and not exists:
        raise ConfigError(f"--resume {run_name}: no run at {run_dir}")
    if resume:  # a run with no intact checkpoint fails here, once, not in every worker attempt
        latest_good_checkpoint(run_dir, hashes=False, report=log.warning)
    run_dir.mkdir()
    (run_dir / CONFIG_FILE).write_text(to_yaml(cfg))
    (run_dir / STATUS_FILE).remove_file()  # an earlier invocation's ending is not this one's
    mlflow_run_id, before = (
        _mlflow_run(cfg, run_name, run_dir, resume, parent_run_id, mlflow_tags)
        if track
        else (None, None)
    )
    # A failed attempt to extend a finished run leaves it FINISHED: its results still stand.
    failed = "FINISHED" if before == "FINISHED" else "FAILED"
    try:
        if not local:
            start_ray(address or cfg.resources.address or None, quiet=quiet)
        trainer = build_trainer(
            cfg,
            run_name=run_name,
            mlflow_run_id=mlflow_run_id,
            crash_at_step=crash_at_step,
            callbacks=callbacks,
            local=local,
            console_prefix=console_prefix,
        )
        result = run_interruptibly(trainer.fit)
    except (Interrupted, KeyboardInterrupt) as exc:
        if mlflow_run_id:  # `--resume` reopens it
            tracking.finish_run(cfg, mlflow_run_id, "KILLED")
        if not local:
            with contextlib.suppress(Exception):  # Ray itself may be going down too
                remove_placement_groups(str(run_dir))
            _shutdown_ray()
        code = exc.exit_code if isinstance(exc, Interrupted) else 130
        raise Interrupted(
            f"{exc or 'interrupted (SIGINT)'}: run {run_name} stopped"
            f"{' and marked KILLED in MLflow' if mlflow_run_id else ''}; continue it with "
            f"`maxdeeplab train --resume {run_name} --work-dir {cfg.work_dir}`",
            code,
        ) from None
    except Exception as exc:
        if mlflow_run_id:
            tracking.finish_run(cfg, mlflow_run_id, failed)
        raise _one_line_error(exc, cfg) from None
    finally:
        if not local:
            remove_placement_groups(str(run_dir))
    status = read_status(run_dir)
    if status.get("status") in ("diverged", "error"):
        if mlflow_run_id:
            tracking.finish_run(cfg, mlflow_run_id, failed)
        error = (
            TrainingDiverged
            if status["status"] == "diverged"
            else {e.__name__: e for e in PERMANENT_ERRORS}.get(status["type"], MaXDeepLabError)
        )
        raise error(f"run {run_name}: {status['message']}")
    if mlflow_run_id:
        tracking.finish_run(cfg, mlflow_run_id, "FINISHED")
    return TrainOutcome(
        run_name=run_name,
        run_dir=run_dir,
        mlflow_run_id=mlflow_run_id,
        metrics=dict(result.metrics or {}),
        checkpoint_path=result.checkpoint.path if result.checkpoint else None,
    )


def _shutdown_ray() -> None:
    """Disconnect (a cluster ends the job's actors) or stop the local instance."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


def _mlflow_run(
    cfg: ExperimentConfig,
    run_name: str,
    run_dir: Location,
    resume: bool,
    parent_run_id: str | None,
    tags: Mapping[str, str] | None = None,
) -> tuple[str, str | None]:
    """The MLflow run of this training run: created once, reopened on resume (never duplicated).

    Returns:
        The run id and its status before this invocation (None for a new run).
    """
    id_file = run_dir / tracking.MLFLOW_RUN_ID_FILE
    if resume and id_file.is_file():
        run_id = id_file.read_text().strip()
        return run_id, tracking.reopen_run(cfg, run_id)
    run_id = tracking.create_run(cfg, run_name, parent_run_id=parent_run_id, tags=tags)
    id_file.write_text(run_id)
    return run_id, None


def _one_line_error(exc: Exception, cfg: ExperimentConfig) -> MaXDeepLabError:
    """Ray's TrainingFailedError (with worker tracebacks) -> the root cause in one line."""
    failures = getattr(exc, "worker_failures", None) or {}
    if failures:
        rank, failure = sorted(failures.items())[0]
        cause = getattr(failure, "cause", None) or failure
        if isinstance(cause, MaXDeepLabError):
            return cause
        last = (str(cause).strip().splitlines() or [type(cause).__name__])[-1]
        return TrainingFailed(
            f"worker rank {rank} failed (after {cfg.resources.max_failures} restarts): "
            f"{type(cause).__name__}: {last}"
        )
    cause = getattr(exc, "controller_failure", None) or exc
    if isinstance(cause, MaXDeepLabError):
        return cause
    last = (str(cause).strip().splitlines() or [type(cause).__name__])[-1]
    return TrainingFailed(f"training failed: {type(cause).__name__}: {last}")
