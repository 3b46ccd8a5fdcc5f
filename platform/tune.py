"""Ray Tune sweeps: one Ray Train run per trial, a parent MLflow run per sweep.

The Ray behaviour this relies on: docs/architecture.md#ray-facts.

The current Ray pattern (Train V2): a Tune *function* trainable builds and fits one `TorchTrainer`
per trial; the trial function itself holds no CPU (`{"cpu": 0, "memory": ...}`,
docs/architecture.md#trial-resources), the Train workers get their own placement group. Train
reports reach Tune through `TuneReportCallback`, filtered to the evaluation reports (those
carrying `val/pq`), so each Tune result is one evaluation and ASHA compares trials on `val/pq` at
equal training steps (`time_attr="step"`: Tune's own iteration counter restarts at 0 after a
restore).

Resume: the sweep directory `<work_dir>/sweeps/<name>` holds Tune's experiment state; running the
same sweep again (or `--resume`) restores it with `Tuner.restore`: finished trials are kept,
interrupted ones continue from their Ray Train checkpoint and their own MLflow child run (the Train
run is named `<sweep>-<trial id>` and keeps its MLflow run id in its run directory), so no trial
is rerun and no child run is created twice.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from maxdeeplab.platform import tracking
from maxdeeplab.platform.config import ExperimentConfig, work_dir
from maxdeeplab.platform.errors import ConfigError, MaXDeepLabError
from maxdeeplab.platform.preflight import check_run_prerequisites
from maxdeeplab.platform.storage import Location
from maxdeeplab.platform.sweep_config import Sweep, expand_bundles, load_sweep
from maxdeeplab.platform.training.launch import prepare_experiment, run_directory, start_ray, train
from maxdeeplab.platform.training.placement_groups import remove_placement_groups

log = logging.getLogger(__name__)

TRIAL_RESOURCES: dict[str, float] = {
    "cpu": 0,
    "memory": 64 * 2**20,
}  # the trial driver; Train workers bring their own
PARENT_RUN_FILE = "mlflow_parent_run_id"


@dataclass
class TrialSummary:
    trial_id: str
    point: dict[str, Any]
    metrics: dict[str, float]
    steps: int
    wall_s: float
    status: str
    run_id: str


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


def sweep_dir(sweep: Sweep) -> Location:
    return work_dir(sweep.trial_config({})) / "sweeps" / sweep.name


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


def run_sweep(path: str | Path, *, resume: bool = False, address: str = "") -> SweepResult:
    """Run (or resume) every trial of a sweep YAML and return one summary per trial."""
    sweep = load_sweep(path)  # validated completely before Ray starts
    directory = sweep_dir(sweep)
    cfg = base_config(sweep)
    check_run_prerequisites(cfg, address)
    if resume and not tune.Tuner.can_restore(str(directory)):
        raise ConfigError(f"{sweep.path}: nothing to resume: no sweep state in {directory}")
    for point in sweep.grid_points():  # data checked (and the synthetic set made) before any trial
        prepare_experiment(sweep.trial_config(point))
    start_ray(address or cfg.resources.address)
    check_resources(sweep, cfg)
    parent_id = _parent_run(sweep, cfg, directory)
    started = time.monotonic()
    tuner = _tuner(sweep, cfg, directory, parent_id)
    results = tuner.fit()
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
        raise MaXDeepLabError(
            f"{len(failed)} of {len(summaries)} trials failed "
            f"({', '.join(s.trial_id for s in failed)});"
            f" see {directory}"
        )
    return SweepResult(sweep, cfg, directory, parent_id, summaries, table)


def _parent_run(sweep: Sweep, cfg: ExperimentConfig, directory: Location) -> str:
    marker = directory / PARENT_RUN_FILE
    if marker.exists():
        run_id = marker.read_text().strip()
        tracking.reopen_run(cfg, run_id)
        return run_id
    run_id = tracking.create_sweep_run(cfg, sweep.name, sweep.path, sweep.search)
    marker.write_text(run_id)
    return run_id


def _tuner(sweep: Sweep, cfg: ExperimentConfig, directory: Location, parent_id: str) -> Any:
    trainable = tune.with_resources(
        tune.with_parameters(
            run_trial,
            sweep_path=str(sweep.path),
            work_root=str(work_dir(cfg)),
            parent_id=parent_id,
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


def run_trial(point: dict[str, Any], *, sweep_path: str, work_root: str, parent_id: str) -> None:
    """Tune's function trainable: one Ray Train run for one search point.

    The Train run is named `<sweep>-<trial id>`; `resume=None` continues it (and its MLflow child
    run, whose id lives in the run directory) when a restored sweep restarts the trial.
    """
    sweep = load_sweep(sweep_path)
    cfg = sweep.trial_config(point)
    cfg.tracking.experiment = sweep.name
    cfg.work_dir = work_root  # the driver's: a trial runs in a directory of Tune's choosing
    train(
        cfg,
        run_name=trial_run_name(sweep, tune.get_context().get_trial_id()),
        resume=None,
        parent_run_id=parent_id,
        callbacks=[EvalReportCallback()],
        preflight=False,  # the sweep's driver checked
    )


def trial_run_name(sweep: Sweep, trial_id: str) -> str:
    return f"{sweep.name}-{trial_id}"


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
        point=expand_bundles(point),
        metrics={k: v for k, v in metrics.items() if k.startswith("val/")},
        steps=step,
        wall_s=float((result.metrics or {}).get("time_total_s", 0.0)),
        status="ERROR" if result.error else "TERMINATED",
        run_id=run_id,
    )


def trial_id_from_path(path: str) -> str:
    """Tune names a trial's directory `<trainable>_<trial id>_<index>_<params>_<date>`."""
    match = re.match(r"run_trial_([0-9a-f]+_\d+)_", Path(path).name)
    return match.group(1) if match else Path(path).name


def format_table(sweep: Sweep, trials: list[TrialSummary]) -> str:
    """The sweep summary: trial, varied keys, PQ, PQ_th, PQ_st, steps, wall time."""
    varied = sorted({k for t in trials for k in t.point})
    header = ["trial", *varied, "PQ", "PQ_th", "PQ_st", "steps", "wall (s)", "status"]
    rows = []
    for t in sorted(trials, key=lambda t: -t.metrics.get(tracking.VAL_PQ, -1.0)):
        pq = [
            t.metrics.get(k)
            for k in (tracking.VAL_PQ, tracking.VAL_PQ_THING, tracking.VAL_PQ_STUFF)
        ]
        rows.append(
            [t.trial_id, *(str(t.point.get(k, "")) for k in varied)]
            + [f"{100 * v:.1f}" if v is not None else "-" for v in pq]
            + [str(t.steps), f"{t.wall_s:.0f}", t.status]
        )
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    lines = [
        " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in [header, *rows]
    ]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return f"sweep {sweep.name}: {len(trials)} trials\n" + "\n".join(lines)
