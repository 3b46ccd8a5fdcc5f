"""Ray Tune sweeps: one Ray Train run per trial, a parent MLflow run per sweep.

The Ray behaviour this relies on: docs/architecture.md#ray-facts.

The current Ray pattern (Train V2): a Tune *function* trainable builds and fits one `TorchTrainer`
per trial; the trial function itself holds no CPU (`{"cpu": 0, "memory": ...}`,
docs/architecture.md#trial-resources), the Train workers get their own placement group. Train
reports reach Tune through `TuneReportCallback`, filtered to the evaluation reports (those
carrying `val/pq`), so each Tune result is one evaluation and ASHA compares trials on `val/pq` at
equal training steps (`time_attr="step"`: Tune's own iteration counter restarts at 0 after a
restore).

Resume: the sweep directory `<work_dir>/sweeps/<name>` holds Tune's experiment state and the sweep's
resolved definition (search space, Tune settings, base experiment). Running the same sweep again
(or `--resume`) restores it with `Tuner.restore`: finished trials are kept,
interrupted ones continue from their Ray Train checkpoint and their own MLflow child run (the Train
run is named `<sweep>-<trial id>` and keeps its MLflow run id in its run directory), so no trial
is rerun and no child run is created twice. A sweep whose definition changed is never restored
under its old state: it is refused, or with `--fresh` started anew in `<name>-2`, `<name>-3`, ...
(the old one kept); a later run of the same definition finds its directory again.

Console: a trial is named by what it tries (`sweep_config.trial_name`); its lines, its MLflow run
and its row of the summary table carry that name. Whatever else Ray and Tune print goes to
`sweep.log` in the sweep directory (`platform/console.py`), and failed trials end the sweep with
one line each giving their cause.
"""

from __future__ import annotations

import json
import logging
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from maxdeeplab.platform import provenance, tracking
from maxdeeplab.platform.config import ExperimentConfig, cache_dir, work_dir
from maxdeeplab.platform.console import own_lines_only
from maxdeeplab.platform.errors import ConfigError, MaXDeepLabError
from maxdeeplab.platform.interrupts import Interrupted, run_interruptibly
from maxdeeplab.platform.preflight import check_run_prerequisites
from maxdeeplab.platform.run_lock import DriverLock
from maxdeeplab.platform.storage import Location
from maxdeeplab.platform.sweep_config import Sweep, expand_bundles, load_sweep, trial_name
from maxdeeplab.platform.sweep_dirs import (
    DEFINITION_FILE,
    choose_sweep_dir,
    sweep_definition,
)
from maxdeeplab.platform.sweep_summary import TrialSummary, format_table, trial_id_from_path
from maxdeeplab.platform.training.launch import prepare_experiment, run_directory, start_ray, train
from maxdeeplab.platform.training.placement_groups import remove_placement_groups

log = logging.getLogger(__name__)

TRIAL_RESOURCES: dict[str, float] = {
    "cpu": 0,
    "memory": 64 * 2**20,
}  # the trial driver; Train workers bring their own
PARENT_RUN_FILE = "mlflow_parent_run_id"
LOG_FILE = "sweep.log"  # what Ray, Tune and MLflow printed (the console keeps our lines)


@dataclass
class SweepResult:
    sweep: Sweep
    config: ExperimentConfig  # the base experiment, tracked under the sweep's name
    directory: Location
    parent_run_id: str
    trials: list[TrialSummary]
    table: str

    @property
    def best(self) -> TrialSummary:
        return max(self.trials, key=lambda t: t.metrics.get(tracking.VAL_PQ, -1.0))


def base_config(sweep: Sweep) -> ExperimentConfig:
    """The sweep's base experiment, tracked in the MLflow experiment named after the sweep."""
    cfg = sweep.trial_config({})
    cfg.tracking.experiment = sweep.name
    return cfg


def param_space(sweep: Sweep) -> dict[str, Any]:
    """The search space in Tune's terms."""
    makers = {
        "grid": tune.grid_search,
        "choice": tune.choice,
        "uniform": lambda args: tune.uniform(*args),
        "loguniform": lambda args: tune.loguniform(*args),
        "randint": lambda args: tune.randint(*args),
    }
    space = {}
    for key, spec in sweep.search.items():
        ((kind, args),) = spec.items()
        space[key] = makers[kind](args)
    return space


def check_resources(sweep: Sweep, cfg: ExperimentConfig) -> None:
    """Fail before any trial starts when one trial can never fit on the cluster."""
    total = ray.cluster_resources()
    workers = cfg.resources.num_workers
    need_cpu = workers * cfg.resources.cpus_per_worker
    need_gpu = workers if cfg.resources.use_gpu else 0
    have_cpu, have_gpu = total.get("CPU", 0.0), total.get("GPU", 0.0)
    if need_gpu > have_gpu:
        raise ConfigError(
            f"{sweep.path}: each trial needs {need_gpu} GPU(s) ({workers} workers with "
            f"resources.use_gpu) but the Ray cluster has {have_gpu:g}; lower resources.num_workers "
            "or set resources.use_gpu: false"
        )
    if need_cpu > have_cpu:
        raise ConfigError(
            f"{sweep.path}: each trial needs {need_cpu:g} CPU(s) ({workers} workers x "
            f"{cfg.resources.cpus_per_worker:g}) but the Ray cluster has {have_cpu:g}"
        )


def run_sweep(
    path: str | Path, *, resume: bool = False, fresh: bool = False, address: str = ""
) -> SweepResult:
    """Run (or resume) every trial of a sweep YAML and return one summary per trial.

    Raises:
        ConfigError: the sweep is invalid, changed since its state was saved (see
            `choose_sweep_dir`), or held by another driver.
        Interrupted: SIGINT/SIGTERM; the parent and running child runs are marked KILLED.
    """
    sweep = load_sweep(path)  # validated completely before Ray starts
    cfg = base_config(sweep)
    check_run_prerequisites(cfg, address)
    directory = choose_sweep_dir(sweep, resume=resume, fresh=fresh)
    with DriverLock(directory, f"sweep {directory.name!r}", command=" ".join(sys.argv)):
        (directory / DEFINITION_FILE).write_text(json.dumps(sweep_definition(sweep), indent=1))
        return _run_sweep(sweep, cfg, directory, address)


def _run_sweep(
    sweep: Sweep, cfg: ExperimentConfig, directory: Location, address: str
) -> SweepResult:
    print("checking the data (the synthetic set is generated on first use)...", flush=True)
    for point in sweep.grid_points():  # data checked (and the synthetic set made) before any trial
        prepare_experiment(sweep.trial_config(point))
    start_ray(address or cfg.resources.address)
    log_file = _log_file(cfg, directory)
    print(f"sweep {directory.name}: Ray, Tune and MLflow messages go to {log_file}", flush=True)
    try:
        with own_lines_only(log_file):
            check_resources(sweep, cfg)
            parent_id = _parent_run(sweep, cfg, directory)
            started = time.monotonic()
            tuner = _tuner(sweep, cfg, directory, parent_id)
            try:
                results = run_interruptibly(tuner.fit)
            except Interrupted as exc:
                tracking.finish_sweep_runs(cfg, parent_id, "KILLED")
                ray.shutdown()  # ends the trials and their workers
                raise Interrupted(
                    f"{exc}: sweep {directory.name} stopped, its MLflow runs marked KILLED; "
                    f"continue it with `maxdeeplab sweep {sweep.path} --resume`",
                    exc.exit_code,
                ) from None
    finally:
        if not directory.is_local and log_file.is_file():  # written to the local cache
            (directory / LOG_FILE).write_bytes(log_file.read_bytes())
    wall = time.monotonic() - started
    summaries = [_summary(sweep, cfg, result) for result in results]
    table = format_table(sweep, summaries)
    print(table)
    train_s = sum(s.wall_s for s in summaries)
    tracking.log_sweep_summary(cfg, parent_id, table, wall_s=wall, train_s=train_s)
    longest = max((s.wall_s for s in summaries), default=0.0)
    print(
        f"sweep wall time {wall:.0f} s; trials' own time {train_s:.0f} s (longest {longest:.0f} s)"
    )
    failed = [s for s in summaries if s.status == "ERROR"]
    if failed:
        for s in failed:
            print(f"[{s.name}] failed: {s.error or 'no cause recorded'}", flush=True)
        raise MaXDeepLabError(
            f"{len(failed)} of {len(summaries)} trials failed (causes above); tracebacks in "
            f"{directory} (error.txt per trial) and Ray's and Tune's messages in {log_file}"
        )
    return SweepResult(sweep, cfg, directory, parent_id, summaries, table)


def _log_file(cfg: ExperimentConfig, directory: Location) -> Path:
    """The sweep's log: in its directory, or in the local cache (copied there at the end) when
    the directory is in a bucket."""
    if directory.is_local:
        return directory.local_path() / LOG_FILE
    return cache_dir(cfg) / "sweeps" / directory.name / LOG_FILE


def _parent_run(sweep: Sweep, cfg: ExperimentConfig, directory: Location) -> str:
    marker = directory / PARENT_RUN_FILE
    if marker.exists():
        run_id = marker.read_text().strip()
        tracking.reopen_run(cfg, run_id)
        return run_id
    run_id = tracking.create_sweep_run(cfg, directory.name, sweep.path, sweep.search)
    marker.write_text(run_id)
    return run_id


def _tuner(sweep: Sweep, cfg: ExperimentConfig, directory: Location, parent_id: str) -> Any:
    trainable = tune.with_resources(
        tune.with_parameters(
            run_trial,
            sweep_path=str(sweep.path),
            work_root=str(work_dir(cfg)),
            parent_id=parent_id,
            command=shlex.join(sys.argv),  # the sweep's, for its trials' provenance
        ),
        TRIAL_RESOURCES,
    )
    if tune.Tuner.can_restore(str(directory)):
        log.info("resuming sweep %s from %s", sweep.name, directory)
        return tune.Tuner.restore(
            str(directory), trainable=trainable, resume_unfinished=True, resume_errored=True
        )
    settings = sweep.tune
    if settings.scheduler.type == "asha":
        max_steps = max(
            sweep.trial_config(point).train.steps for point in sweep.grid_points() or [{}]
        )
        scheduler: Any = ASHAScheduler(
            time_attr="step",
            max_t=max_steps,
            grace_period=settings.scheduler.grace_period,
            reduction_factor=settings.scheduler.reduction_factor,
        )
    else:
        scheduler = FIFOScheduler()
    return tune.Tuner(
        trainable,
        param_space=param_space(sweep),
        tune_config=tune.TuneConfig(
            metric=settings.metric,
            mode=settings.mode,
            scheduler=scheduler,
            num_samples=settings.num_samples,
            max_concurrent_trials=settings.max_concurrent_trials,
        ),
        run_config=tune.RunConfig(
            name=directory.name,
            storage_path=str(directory.parent),
            verbose=1,
            callbacks=[TrialCleanup(sweep, cfg)],
        ),
    )


def run_trial(
    point: dict[str, Any], *, sweep_path: str, work_root: str, parent_id: str, command: str
) -> None:
    """Tune's function trainable: one Ray Train run for one search point.

    The Train run is named `<sweep>-<trial id>`; `resume=None` continues it (and its MLflow child
    run, whose id lives in the run directory) when a restored sweep restarts the trial. The MLflow
    run and the console lines are named by what the trial tries (`sweep_config.trial_name`);
    the run's command is the sweep's (`command`), not the Ray worker process's.
    """
    from maxdeeplab.platform.training.progress import CONSOLE_MARKER

    sweep = load_sweep(sweep_path)
    cfg = sweep.trial_config(point)
    cfg.tracking.experiment = sweep.name
    cfg.work_dir = work_root  # the driver's: a trial runs in a directory of Tune's choosing
    trial_id = tune.get_context().get_trial_id()
    name = trial_name(sweep, point, trial_id)
    run_name = trial_run_name(sweep, trial_id)
    # The trial's own lines reach the sweep's console the way the loop's do (marked).
    print(f"{CONSOLE_MARKER} [{name}] trial {trial_id} started (run {run_name})", flush=True)
    try:
        train(
            cfg,
            run_name=run_name,
            resume=None,
            parent_run_id=parent_id,
            callbacks=[EvalReportCallback()],
            preflight=False,  # the sweep's driver checked
            console_prefix=f"[{name}]",
            mlflow_tags={**trial_tags(sweep, point, trial_id), provenance.COMMAND_TAG: command},
        )
    except Exception as exc:
        print(f"{CONSOLE_MARKER} [{name}] failed: {failure_cause(exc)}", flush=True)
        raise


def trial_run_name(sweep: Sweep, trial_id: str) -> str:
    """The trial's Ray Train run (a directory under `<work_dir>/ray`): stable, for resume."""
    return f"{sweep.name}-{trial_id}"


def trial_tags(sweep: Sweep, point: dict[str, Any], trial_id: str) -> dict[str, str]:
    """The MLflow tags of a trial's run: its name (`<sweep> · <trial name>`), the trial's name
    alone, its Tune trial id and one `search.<key>` per searched key."""
    name = trial_name(sweep, point, trial_id)
    tags = {
        tracking.RUN_NAME_TAG: f"{sweep.name} · {name}",
        tracking.TRIAL_TAG: name,
        tracking.TRIAL_ID_TAG: trial_id,
    }
    for key in sweep.search:
        value = point.get(key)
        shown = json.dumps(value) if isinstance(value, dict | list) else str(value)
        tags[tracking.SEARCH_TAG_PREFIX + key] = shown
    return tags


def failure_cause(error: BaseException) -> str:
    """A failed trial's exception in one line: its type and its message's last line.

    Tune hands the trial's exception back wrapped in Ray's `RayTaskError`, whose text is the
    remote traceback and whose `cause` is the exception itself.
    """
    for _ in range(10):  # wrappers of wrappers, never a cycle
        cause = getattr(error, "cause", None)
        if not isinstance(cause, BaseException):
            break
        error = cause
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[-1]}" if lines else type(error).__name__


class TrialCleanup(tune.Callback):
    """Removes an ended trial's placement groups in the sweep's driver.

    A trial that ends on its own removes them itself (`launch.train`); one that the scheduler
    stops, or whose actor dies, cannot, and its workers' reservation would block every later
    trial (placement_groups.py).
    """

    def __init__(self, sweep: Sweep, cfg: ExperimentConfig) -> None:
        self.sweep = sweep
        self.cfg = cfg

    def _cleanup(self, trial: Any) -> None:
        run_dir = run_directory(self.cfg, trial_run_name(self.sweep, trial.trial_id))
        remove_placement_groups(str(run_dir))

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._cleanup(trial)

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._cleanup(trial)


class EvalReportCallback(TuneReportCallback):
    """Forward only the evaluation reports (those with `val/pq`) from Ray Train to Tune."""

    def after_report(
        self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any
    ) -> None:
        if metrics and tracking.VAL_PQ in metrics[0]:
            super().after_report(run_context, metrics, checkpoint)


def _summary(sweep: Sweep, cfg: ExperimentConfig, result: Any) -> TrialSummary:
    """One trial's outcome, read from its MLflow run: a trial that finished just before its
    driver was killed is restored by Tune as unfinished and reports nothing new when resumed."""
    trial_id = str((result.metrics or {}).get("trial_id") or trial_id_from_path(result.path))
    id_file = run_directory(cfg, trial_run_name(sweep, trial_id)) / tracking.MLFLOW_RUN_ID_FILE
    run_id = id_file.read_text().strip() if id_file.is_file() else ""
    metrics, step = tracking.latest_metrics(cfg, run_id) if run_id else ({}, 0)
    point = {k: (result.config or {}).get(k) for k in sweep.search}
    return TrialSummary(
        trial_id=trial_id,
        name=trial_name(sweep, point, trial_id),
        point=expand_bundles(point),
        metrics={k: v for k, v in metrics.items() if k.startswith("val/")},
        steps=step,
        wall_s=float((result.metrics or {}).get("time_total_s", 0.0)),
        status="ERROR" if result.error else "TERMINATED",
        run_id=run_id,
        error=failure_cause(result.error) if result.error else "",
    )
