"""The model-zoo table: the published numbers beside our best MLflow run of each config.

A run belongs to a row when its params (the flattened config every training run logs) carry the
row's defining settings (`ZooEntry.matches`: variant, crop, steps, LR, area limits); a sweep's
parent run (one that other runs name as `mlflow.parentRunId`) is not a training run. Among a row's
runs the best is the one with the highest official PQ (`val/pq`); runs still running are shown and
marked, their numbers being provisional. Training logs PQ as fractions (`PQResult`); the published
table is in percent, so ours are scaled by 100 here.

GPU-hours are the run's wall time times its GPU workers (`resources.num_workers` when
`resources.use_gpu`), so a CPU run shows 0; a resumed run counts the time it was stopped too.
"""

from __future__ import annotations

import csv
import html
import io
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from maxdeeplab.dashboards.model_zoo import ZooEntry, published_rows
from maxdeeplab.platform import tracking
from maxdeeplab.platform.errors import ConfigError

FORMATS = ("md", "csv", "html")
PERCENT = 100.0  # val/* metrics are fractions; the published table is in percent
IN_PROGRESS = ("RUNNING", "SCHEDULED")
TABLE_RUN_NAME = "model-zoo-table"  # the run that holds the table when only an experiment is given
# Metrics whose last step tells how far a run got (evaluation runs at the end, the loss every
# log_interval steps).
PROGRESS_METRICS = (tracking.VAL_PQ, tracking.LOSS_TOTAL, tracking.TRAIN_LR)
_PAGE = 1000


@dataclass(frozen=True)
class RunSummary:
    """One MLflow run of a model-zoo config. PQ values in percent (None: not evaluated yet)."""

    run_id: str
    run_name: str
    experiment: str
    status: str
    pq: float | None
    pq_thing: float | None
    pq_stuff: float | None
    pq_pipeline: float | None
    steps_done: int
    gpu_hours: float

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


def build_table(uri: str, experiment: str | None = None) -> list[TableRow]:
    """One row per published model-zoo config, with our best run from the store at `uri`.

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
    runs = [r for r in runs if r.info.run_id not in parents]
    table = []
    for entry in published_rows():
        matching = [run for run in runs if entry.matches(run.data.params)]
        best = _best_run(matching)
        summary = _summarize(client, best, experiments) if best is not None else None
        table.append(TableRow(entry, summary, len(matching)))
    return table


def published_table() -> list[TableRow]:
    """The published rows with no run of ours (a store with no runs yet)."""
    return [TableRow(entry, None, 0) for entry in published_rows()]


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


def _summarize(client: Any, run: Any, experiments: dict[str, str]) -> RunSummary:
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
    return RunSummary(
        run_id=info.run_id,
        run_name=info.run_name or info.run_id,
        experiment=experiments.get(info.experiment_id, info.experiment_id),
        status=info.status,
        pq=percent(tracking.VAL_PQ),
        pq_thing=percent(tracking.VAL_PQ_THING),
        pq_stuff=percent(tracking.VAL_PQ_STUFF),
        pq_pipeline=percent(tracking.VAL_PQ_PIPELINE),
        steps_done=max(steps, default=0),
        gpu_hours=hours * gpus if use_gpu else 0.0,
    )


# ---------------------------------------------------------------------------------------------
# Rendering

LEGEND = (
    "PQ, PQ_th, PQ_st: official panopticapi script; PQ**: deeplab2's own pipeline (crowd as "
    "void). pub.: deeplab2's published COCO val numbers. Δ = ours − published. Ours: the run of "
    "the config with the best val/pq; numbers of runs still in progress are provisional."
)


def _number(value: float | None, digits: int = 2, signed: bool = False) -> str:
    if value is None:
        return ""
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _record(row: TableRow) -> dict[str, str]:
    """The row as {csv column: text}; empty strings where we have no run or no value."""
    entry, best = row.entry, row.best
    record = {
        "config": entry.name,
        "published_pq": f"{entry.pq:.1f}",
        "published_pq_thing": f"{entry.pq_thing:.1f}",
        "published_pq_stuff": f"{entry.pq_stuff:.1f}",
        "published_pq_pipeline": f"{entry.pq_pipeline:.2f}",
    }
    for field in ("pq", "pq_thing", "pq_stuff", "pq_pipeline"):
        record[field] = _number(getattr(best, field) if best else None)
    record["delta_pq"] = _number(row.delta("pq"), signed=True)
    record["delta_pq_pipeline"] = _number(row.delta("pq_pipeline"), signed=True)
    record["steps_done"] = str(best.steps_done) if best else ""
    record["train_steps"] = str(entry.train_steps)
    record["gpu_hours"] = _number(best.gpu_hours, 1) if best else ""
    record["status"] = best.status if best else ""
    record["in_progress"] = str(best.in_progress) if best else ""
    record["run_name"] = best.run_name if best else ""
    record["run_id"] = best.run_id if best else ""
    record["experiment"] = best.experiment if best else ""
    record["num_runs"] = str(row.num_runs)
    return record


def _display(row: TableRow) -> list[str]:
    """The row's cells for the Markdown and HTML tables ('–' where there is nothing yet)."""
    rec = _record(row)
    best = row.best
    run = "–"
    if best is not None:
        run = best.run_name + (" (in progress)" if best.in_progress else "")
        if best.status not in ("FINISHED", *IN_PROGRESS):
            run += f" ({best.status.lower()})"
    steps = f"{best.steps_done:,} / {row.entry.train_steps:,}" if best else "–"
    cells = [rec["config"]]
    cells += [rec[k] for k in ("published_pq", "published_pq_thing", "published_pq_stuff")]
    cells += [rec["published_pq_pipeline"]]
    cells += [rec[k] or "–" for k in ("pq", "pq_thing", "pq_stuff", "pq_pipeline")]
    cells += [rec["delta_pq"] or "–", rec["delta_pq_pipeline"] or "–", steps]
    cells += [rec["gpu_hours"] or "–", run]
    return cells


HEADERS = [
    "config",
    "pub. PQ",
    "pub. PQ_th",
    "pub. PQ_st",
    "pub. PQ**",
    "our PQ",
    "our PQ_th",
    "our PQ_st",
    "our PQ**",
    "ΔPQ",
    "ΔPQ**",
    "steps",
    "GPU-h",
    "our run",
]


def render_markdown(table: Sequence[TableRow]) -> str:
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    for row in table:
        cells = [c.replace("|", "\\|") for c in _display(row)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\n{LEGEND}\n"


def render_csv(table: Sequence[TableRow]) -> str:
    buffer = io.StringIO()
    records = [_record(row) for row in table]
    fields = list(records[0]) if records else ["config"]
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    return buffer.getvalue()


def render_html(table: Sequence[TableRow]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in HEADERS)
    body = []
    for row in table:
        marker = ' class="in-progress"' if row.best is not None and row.best.in_progress else ""
        cells = "".join(f"<td>{html.escape(c)}</td>" for c in _display(row))
        body.append(f"<tr{marker}>{cells}</tr>")
    style = (
        "table{border-collapse:collapse;font-family:sans-serif;font-size:13px}"
        "th,td{border:1px solid #ccc;padding:3px 6px;text-align:right}"
        "td:first-child,td:last-child{text-align:left}tr.in-progress{background:#fff6d5}"
    )
    rows = "\n".join(body)
    return (
        '<!doctype html>\n<html><head><meta charset="utf-8"><title>MaX-DeepLab model zoo</title>'
        f"<style>{style}</style></head><body>\n<h2>MaX-DeepLab model zoo: published vs ours</h2>\n"
        f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{rows}\n</tbody>\n</table>\n"
        f"<p>{html.escape(LEGEND)}</p>\n</body></html>\n"
    )


RENDERERS: dict[str, Callable[[Sequence[TableRow]], str]] = {
    "md": render_markdown,
    "csv": render_csv,
    "html": render_html,
}


def render_table(table: Sequence[TableRow], fmt: str = "md") -> str:
    """The table as Markdown, CSV or a standalone HTML page.

    Raises:
        ConfigError: an unknown format.
    """
    if fmt not in RENDERERS:
        raise ConfigError(f"unknown table format {fmt!r}; expected one of {', '.join(FORMATS)}")
    return RENDERERS[fmt](table)


def artifact_name(fmt: str) -> str:
    return f"model_zoo_table.{fmt}"


def log_table(
    uri: str, text: str, fmt: str, *, run_id: str | None = None, experiment: str | None = None
) -> str:
    """Log the rendered table as an artifact; returns the run id it went to.

    Args:
        uri: the MLflow tracking URI.
        text: the rendered table.
        fmt: its format (names the artifact `model_zoo_table.<fmt>`).
        run_id: log into this run.
        experiment: else, into this experiment's `model-zoo-table` run (created once, reused).

    Raises:
        ConfigError: neither is given, or the run or experiment does not exist.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=uri)
    if run_id is None:
        if experiment is None:
            raise ConfigError("log_table: give a run id or an experiment name")
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise ConfigError(f"{uri}: no MLflow experiment named {experiment!r}")
        query = f"attributes.run_name = '{TABLE_RUN_NAME}'"
        existing = client.search_runs([found.experiment_id], filter_string=query, max_results=1)
        if existing:
            run_id = existing[0].info.run_id
        else:
            created = client.create_run(found.experiment_id, run_name=TABLE_RUN_NAME)
            run_id = created.info.run_id
            client.set_terminated(run_id)
    try:
        client.log_text(run_id, text, artifact_name(fmt))
    except MlflowException as exc:
        raise ConfigError(f"{uri}: cannot log the table into run {run_id!r} ({exc})") from None
    return run_id
