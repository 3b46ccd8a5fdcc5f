"""The model-zoo table: the published numbers beside our best MLflow run of each config.

A run belongs to a row when its params (the flattened config every training run logs) carry the
row's defining settings (`ZooEntry.matches`: variant, crop, steps, LR, area limits); a sweep's
parent run (one that other runs name as `mlflow.parentRunId`) is not a training run. Among a row's
runs the best is the one with the highest official PQ (`val/pq`); runs still running are shown and
marked, their numbers being provisional. Training runs that match no row (other crops, shortened
schedules, studies) are the "other runs": the best of each MLflow experiment. Training logs PQ as
fractions (`PQResult`); the published table is in percent, so ours are scaled by 100 here.
Rendering is in `zoo_table_formats`.

GPU-hours are the run's wall time times its GPU workers (`resources.num_workers` when
`resources.use_gpu`), so a CPU run shows 0; a resumed run counts the time it was stopped too.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from maxdeeplab.dashboards.mlflow_ui import DEFAULT_PORT, ui_url
from maxdeeplab.dashboards.model_zoo import ZooEntry, published_rows
from maxdeeplab.platform import tracking
from maxdeeplab.platform.errors import ConfigError

PERCENT = 100.0  # val/* metrics are fractions; the published table is in percent
IN_PROGRESS = ("RUNNING", "SCHEDULED")
# A param every training run logs (the flattened config): runs without it trained nothing.
TRAINING_PARAM = "model.variant"
# Metrics whose last step tells how far a run got (evaluation runs at the end, the loss every
# log_interval steps).
PROGRESS_METRICS = (tracking.VAL_PQ, tracking.LOSS_TOTAL, tracking.TRAIN_LR)
_PAGE = 1000


@dataclass(frozen=True)
class RunSummary:
    """One MLflow training run. PQ values in percent (None: not evaluated yet)."""

    run_id: str
    run_name: str
    experiment: str
    experiment_id: str
    status: str
    variant: str
    crop_size: str
    train_steps: int | None
    pq: float | None
    pq_thing: float | None
    pq_stuff: float | None
    pq_pipeline: float | None
    steps_done: int
    gpu_hours: float
    link: str  # the run's page in the MLflow UI (`run_link`)

    @property
    def in_progress(self) -> bool:
        return self.status in IN_PROGRESS


@dataclass(frozen=True)
class TableRow:
    """A published row, our best run of its config (or None) and how many runs it has."""

    entry: ZooEntry
    best: RunSummary | None
    num_runs: int

    def delta(self, field: str) -> float | None:
        """Ours minus published for `pq`, `pq_thing`, `pq_stuff` or `pq_pipeline` (percent)."""
        ours = getattr(self.best, field) if self.best is not None else None
        return None if ours is None else ours - getattr(self.entry, field)


@dataclass(frozen=True)
class ZooTable:
    """The published rows with our best runs, and the best run of each experiment whose training
    runs match no row."""

    rows: list[TableRow]
    other_runs: list[RunSummary] = field(default_factory=list)


def build_table(uri: str, experiment: str | None = None) -> ZooTable:
    """One row per published model-zoo config with our best run, and the other runs.

    Args:
        uri: the MLflow tracking URI.
        experiment: only this MLflow experiment's runs (default: every experiment).

    Raises:
        ConfigError: the named experiment does not exist.
    """
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiments = {e.experiment_id: e.name for e in _experiments(client)}
    if experiment is not None:
        experiments = {k: v for k, v in experiments.items() if v == experiment}
        if not experiments:
            raise ConfigError(f"{uri}: no MLflow experiment named {experiment!r}")
    runs = list(_search_all_runs(client, list(experiments)))
    # A sweep's parent run may carry its base config's params, but trained nothing itself.
    parents = {r.data.tags.get("mlflow.parentRunId") for r in runs} - {None}
    runs = [r for r in runs if r.info.run_id not in parents and TRAINING_PARAM in r.data.params]
    rows: list[TableRow] = []
    matched: set[str] = set()
    for entry in published_rows():
        matching = [run for run in runs if entry.matches(run.data.params)]
        matched.update(run.info.run_id for run in matching)
        best = _best_run(matching)
        summary = _summarize(client, uri, best, experiments) if best is not None else None
        rows.append(TableRow(entry, summary, len(matching)))
    by_experiment: dict[str, list[Any]] = {}
    for run in runs:
        if run.info.run_id not in matched:
            by_experiment.setdefault(run.info.experiment_id, []).append(run)
    others = [
        _summarize(client, uri, _best_run(group), experiments) for group in by_experiment.values()
    ]
    others.sort(key=lambda s: (s.experiment, s.run_name))
    return ZooTable(rows, others)


def published_table() -> ZooTable:
    """The published rows with no run of ours (a store with no runs yet)."""
    return ZooTable([TableRow(entry, None, 0) for entry in published_rows()])


def run_link(uri: str, experiment_id: str, run_id: str) -> str:
    """The run's page in the MLflow UI: the tracking server's own, else `maxdeeplab dashboard`'s
    on its default port (a local store has no UI until one is started)."""
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else ui_url(DEFAULT_PORT)
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"


def _experiments(client: Any) -> list[Any]:
    found, token = [], None
    while True:
        page = client.search_experiments(max_results=_PAGE, page_token=token)
        found += list(page)
        token = page.token
        if not token:
            return found


def _search_all_runs(client: Any, experiment_ids: list[str]) -> Iterable[Any]:
    if not experiment_ids:
        return
    token = None
    while True:
        page = client.search_runs(experiment_ids, max_results=_PAGE, page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def _best_run(runs: Sequence[Any]) -> Any | None:
    """The run with the highest `val/pq`; without any evaluation yet, the latest started."""
    if not runs:
        return None
    evaluated = [r for r in runs if tracking.VAL_PQ in r.data.metrics]
    if evaluated:
        return max(evaluated, key=lambda r: (r.data.metrics[tracking.VAL_PQ], r.info.start_time))
    return max(runs, key=lambda r: r.info.start_time or 0)


def _summarize(client: Any, uri: str, run: Any, experiments: dict[str, str]) -> RunSummary:
    metrics, params, info = run.data.metrics, run.data.params, run.info

    def percent(key: str) -> float | None:
        return metrics[key] * PERCENT if key in metrics else None

    steps = [
        max((m.step for m in client.get_metric_history(info.run_id, key)), default=0)
        for key in PROGRESS_METRICS
        if key in metrics
    ]
    end_ms = info.end_time if info.end_time else int(time.time() * 1000)
    hours = max(0, end_ms - (info.start_time or end_ms)) / 3.6e6
    gpus = int(params.get("resources.num_workers", "1"))
    use_gpu = params.get("resources.use_gpu", "False") == "True"
    steps_planned = params.get("train.steps", "")
    return RunSummary(
        run_id=info.run_id,
        run_name=info.run_name or info.run_id,
        experiment=experiments.get(info.experiment_id, info.experiment_id),
        experiment_id=info.experiment_id,
        status=info.status,
        variant=params.get("model.variant", ""),
        crop_size=params.get("data.crop_size", ""),
        train_steps=int(steps_planned) if steps_planned.isdigit() else None,
        pq=percent(tracking.VAL_PQ),
        pq_thing=percent(tracking.VAL_PQ_THING),
        pq_stuff=percent(tracking.VAL_PQ_STUFF),
        pq_pipeline=percent(tracking.VAL_PQ_PIPELINE),
        steps_done=max(steps, default=0),
        gpu_hours=hours * gpus if use_gpu else 0.0,
        link=run_link(uri, info.experiment_id, info.run_id),
    )


def artifact_name(fmt: str) -> str:
    return f"model_zoo_table.{fmt}"


def log_table(uri: str, text: str, fmt: str, run_id: str) -> None:
    """Log the rendered table into an existing run, as the artifact `model_zoo_table.<fmt>`.

    Raises:
        ConfigError: the run does not exist or refuses the artifact.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        MlflowClient(tracking_uri=uri).log_text(run_id, text, artifact_name(fmt))
    except MlflowException as exc:
        raise ConfigError(f"{uri}: cannot log the table into run {run_id!r} ({exc})") from None
