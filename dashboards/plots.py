"""PNG plots of runs and sweeps, written to disk and logged to MLflow under `plots/`.

- a run: PQ / PQ_thing / PQ_stuff (and the pipeline PQ**) against the training step, and the
  latest per-class PQ as bars;
- a sweep (a parent run whose trials are child runs tagged `mlflow.parentRunId`): every trial's
  PQ curve, and the final PQ against each varied config key (resolution, steps, drop-path schedule
  and keep prob, ...), found as the params whose values differ between trials.

Figures are drawn on matplotlib's Agg canvas without pyplot, so nothing touches global backend
state or needs a display. Values are shown in percent, as in the model-zoo table.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from maxdeeplab.platform import tracking

PERCENT = 100.0  # val/* metrics are fractions
CURVES = (
    (tracking.VAL_PQ, "PQ"),
    (tracking.VAL_PQ_THING, "PQ_thing"),
    (tracking.VAL_PQ_STUFF, "PQ_stuff"),
    (tracking.VAL_PQ_PIPELINE, "PQ** (pipeline)"),
)
ARTIFACT_DIR = "plots"
# Params that differ between trials without being part of what a sweep studies.
NOT_SWEPT_PREFIXES = ("tracking.",)
NOT_SWEPT_KEYS = frozenset({"name", "work_dir"})

Series = list[tuple[int, float]]  # (step, value) pairs sorted by step


# ---------------------------------------------------------------------------------------------
# Figures (pure: data in, Figure out)


def pq_curves_figure(curves: Mapping[str, Series], title: str) -> Figure:
    """Lines of PQ (percent) against the training step, one per label."""
    fig = _figure(7.0, 4.2)
    ax = fig.subplots()
    for label, series in curves.items():
        if series:
            steps, values = zip(*series, strict=True)
            ax.plot(steps, [v * PERCENT for v in values], marker="o", markersize=3, label=label)
    ax.set(xlabel="training step", ylabel="PQ (%)", title=title)
    ax.grid(alpha=0.3)
    if any(curves.values()):
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def per_class_figure(pq_by_class: Mapping[str, float], title: str) -> Figure:
    """Horizontal bars of per-class PQ (percent), best class on top."""
    ranked = sorted(pq_by_class.items(), key=lambda item: item[1])
    fig = _figure(7.0, max(2.5, 0.9 + 0.18 * len(ranked)))
    ax = fig.subplots()
    ax.barh(range(len(ranked)), [v * PERCENT for _, v in ranked], color="tab:blue")
    ax.set_yticks(range(len(ranked)), [name for name, _ in ranked], fontsize=7)
    ax.set(xlabel="PQ (%)", title=title, xlim=(0, 100))
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def metric_vs_key_figure(points: Sequence[tuple[str, float]], key: str, title: str) -> Figure:
    """Final PQ (percent) of each trial against one config key's value.

    Numeric keys (crop size, steps, keep prob) get a numeric axis; others (schedule names)
    one position per value. The line joins the best trial at each value, since other keys may
    vary too.
    """
    fig = _figure(5.5, 4.0)
    ax = fig.subplots()
    numeric = all(_is_number(value) for value, _ in points)
    order: list[Any]
    if numeric:
        order = sorted({float(value) for value, _ in points})
        xs = [float(value) for value, _ in points]
    else:
        order = sorted({str(value) for value, _ in points})
        xs = [order.index(str(value)) for value, _ in points]
        ax.set_xticks(range(len(order)), order)
    ys = [pq * PERCENT for _, pq in points]
    ax.scatter(xs, ys, color="tab:blue", zorder=3, label="trial")
    positions = list(order) if numeric else list(range(len(order)))
    best = [max(y for x, y in zip(xs, ys, strict=True) if x == p) for p in positions]
    ax.plot(positions, best, color="tab:orange", label="best at value")
    ax.set(xlabel=key, ylabel="PQ (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return text.strip().lower() not in ("nan", "inf", "-inf", "true", "false")


def save_figure(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


# ---------------------------------------------------------------------------------------------
# From MLflow


def metric_series(client: Any, run_id: str, key: str) -> Series:
    """A metric's history as (step, value) pairs by step (the latest value at a repeated step)."""
    by_step: dict[int, tuple[int, float]] = {}
    for metric in client.get_metric_history(run_id, key):
        if metric.step not in by_step or metric.timestamp >= by_step[metric.step][0]:
            by_step[metric.step] = (metric.timestamp, metric.value)
    return [(step, value) for step, (_, value) in sorted(by_step.items())]


def plot_run(run_id: str, out_dir: str | Path, *, uri: str, log: bool = True) -> list[Path]:
    """PQ-vs-step and per-class PQ plots of one run.

    Args:
        run_id: the MLflow run.
        out_dir: where the PNGs go (`<run name>_pq_vs_step.png`, `<run name>_per_class_pq.png`;
            the second only when the run logged per-class PQ).
        uri: the MLflow tracking URI.
        log: also log them to the run under `plots/`.

    Returns:
        The PNG paths written.
    """
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    name = run.info.run_name or run_id
    stem = _file_stem(name)
    metrics = run.data.metrics
    curves = {label: metric_series(client, run_id, key) for key, label in CURVES if key in metrics}
    paths = [
        save_figure(
            pq_curves_figure(curves, f"{name}: PQ"), Path(out_dir) / f"{stem}_pq_vs_step.png"
        )
    ]
    per_class = {
        key[len(tracking.VAL_PQ_CLASS_PREFIX) :]: value
        for key, value in metrics.items()
        if key.startswith(tracking.VAL_PQ_CLASS_PREFIX)
    }
    if per_class:
        fig = per_class_figure(per_class, f"{name}: per-class PQ (latest evaluation)")
        paths.append(save_figure(fig, Path(out_dir) / f"{stem}_per_class_pq.png"))
    if log:
        for path in paths:
            client.log_artifact(run_id, str(path), ARTIFACT_DIR)
    return paths


def child_runs(client: Any, parent_run_id: str) -> list[Any]:
    """The parent run's children (the sweep's trials), oldest first."""
    parent = client.get_run(parent_run_id)
    query = f"tags.`mlflow.parentRunId` = '{parent_run_id}'"
    runs = client.search_runs([parent.info.experiment_id], filter_string=query, max_results=10_000)
    return sorted(runs, key=lambda r: r.info.start_time or 0)


def varied_keys(runs: Sequence[Any]) -> list[str]:
    """The config keys (params) whose values differ between the runs, sorted.

    Keys that move together (a sweep's bundle such as crop size with the area limits scaled to
    it) split the runs the same way; only the first of them is kept, since their plots would be
    the same.
    """
    keys = set().union(*(run.data.params for run in runs)) if runs else set()
    varied, partitions = [], set()
    for key in sorted(keys):
        if key in NOT_SWEPT_KEYS or key.startswith(NOT_SWEPT_PREFIXES):
            continue
        values = [run.data.params.get(key) for run in runs]
        # Which runs share a value, independent of the values themselves.
        partition = tuple(values.index(value) for value in values)
        if len(set(values)) > 1 and partition not in partitions:
            partitions.add(partition)
            varied.append(key)
    return varied


def plot_sweep(
    parent_run_id: str,
    out_dir: str | Path,
    *,
    uri: str,
    keys: Sequence[str] | None = None,
    metric: str = tracking.VAL_PQ,
    log: bool = True,
) -> list[Path]:
    """Plots of a sweep: every trial's PQ curve, and final PQ against each varied key.

    Args:
        parent_run_id: the sweep's parent MLflow run.
        out_dir: where the PNGs go (`<sweep>_trials_pq_vs_step.png`, `<sweep>_pq_vs_<key>.png`).
        uri: the MLflow tracking URI.
        keys: the config keys to plot against (default: `varied_keys` of the trials).
        metric: the metric on the y axis (a fraction, shown in percent).
        log: also log them to the parent run under `plots/`.

    Returns:
        The PNG paths written (none when no trial has logged `metric` yet).
    """
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    sweep = client.get_run(parent_run_id).info.run_name or parent_run_id
    trials = [run for run in child_runs(client, parent_run_id) if metric in run.data.metrics]
    if not trials:
        return []
    out = Path(out_dir)
    stem = _file_stem(sweep)
    curves = {
        run.info.run_name or run.info.run_id: metric_series(client, run.info.run_id, metric)
        for run in trials
    }
    fig = pq_curves_figure(curves, f"{sweep}: {metric} of every trial")
    paths = [save_figure(fig, out / f"{stem}_trials_pq_vs_step.png")]
    for key in keys if keys is not None else varied_keys(trials):
        points = [
            (run.data.params[key], run.data.metrics[metric])
            for run in trials
            if key in run.data.params
        ]
        fig = metric_vs_key_figure(points, key, f"{sweep}: final {metric} vs {key}")
        paths.append(save_figure(fig, out / f"{stem}_pq_vs_{_file_stem(key)}.png"))
    if log:
        for path in paths:
            client.log_artifact(parent_run_id, str(path), ARTIFACT_DIR)
    return paths


def _file_stem(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z_.-]+", "_", name).strip("_") or "run"
