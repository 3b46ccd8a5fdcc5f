"""PNG plots of runs and sweeps, written to disk and logged to MLflow under `plots/`.

- a run: PQ / PQ_thing / PQ_stuff (and the pipeline PQ**) against the training step, and the
  latest per-class PQ as bars;
- a sweep (a parent run whose trials are child runs tagged `mlflow.parentRunId`): every trial's
  PQ curve, and the final PQ against each varied config key (resolution, steps, drop-path schedule
  and keep prob, ...), found as the params whose values differ between trials: mean ± std over
  the trials that differ by seed alone, with their count n.

Figures are drawn on matplotlib's Agg canvas without pyplot, so nothing touches global backend
state or needs a display. PQ is shown in percent, as everywhere the project shows it; MLflow
holds it as a fraction (`val/*`), as panopticapi computes it.
"""

from __future__ import annotations

import re
import statistics
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
# `seed` differs between repeats of one config: those are the n of each point, not a study.
NOT_SWEPT_KEYS = frozenset({"name", "work_dir", "seed"})
Y_MARGIN = 0.1  # of the PQ range, below and (twice) above the points of a sweep plot
MIN_Y_MARGIN = 1.0  # PQ points (percent)

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


def metric_vs_key_figure(
    points: Sequence[tuple[str, float]],
    key: str,
    title: str,
    *,
    series: Sequence[str] | None = None,
) -> Figure:
    """Final PQ (percent) of the trials against one config key's value, mean ± std per value.

    Trials with the same value and the same `series` label are repeats of one config (seeds):
    each such group is one marker at its mean, with the standard deviation as an error bar and its
    count `n` above it; each trial is also drawn as a faint dot. Numeric keys (crop size, steps,
    keep prob) get a numeric axis and a line per series through the means; other keys (schedule
    names) one position per value and markers only, since a line would invent an order between
    categories, with the series side by side. The y axis spans the data plus a margin (PQ of
    40-45 is not drawn from 0).

    Args:
        points: (the key's value as logged, PQ as a fraction), one per trial.
        key: the config key, for the x label.
        title: the figure's title.
        series: a label per point naming the other varied keys' values (e.g. `data.crop_size=641`);
            None: all points are one series.

    Raises:
        ValueError: `series` and `points` differ in length.
    """
    labels = list(series) if series is not None else [""] * len(points)
    if len(labels) != len(points):
        raise ValueError(
            f"metric_vs_key_figure: {len(labels)} series labels for {len(points)} points"
        )
    numeric = all(_is_number(value) for value, _ in points)
    order: list[Any] = sorted({float(v) if numeric else str(v) for v, _ in points})
    groups: dict[tuple[str, Any], list[float]] = {}
    for (value, pq), label in zip(points, labels, strict=True):
        x = float(value) if numeric else str(value)
        groups.setdefault((label, x), []).append(pq * PERCENT)
    names = sorted(set(labels))
    fig = _figure(5.5 if len(names) == 1 else 6.5, 4.0)
    ax = fig.subplots()
    shown: list[float] = []
    for i, name in enumerate(names):
        # Categories: series side by side within a category's slot.
        offset = 0.0 if numeric else (i - (len(names) - 1) / 2) * min(0.25, 0.8 / len(names))
        xs, means, errors, counts = [], [], [], []
        for value in order:
            ys = groups.get((name, value))
            if not ys:
                continue
            x = (value if numeric else order.index(value)) + offset
            xs.append(x)
            means.append(statistics.fmean(ys))
            errors.append(statistics.stdev(ys) if len(ys) > 1 else 0.0)
            counts.append(len(ys))
            ax.scatter([x] * len(ys), ys, s=10, color=f"C{i}", alpha=0.35, zorder=2)
            shown += ys
        ax.errorbar(
            xs,
            means,
            yerr=errors,
            color=f"C{i}",
            marker="o",
            linestyle="-" if numeric else "none",
            capsize=4,
            zorder=3,
            label=name or None,
        )
        for x, mean, error, n in zip(xs, means, errors, counts, strict=True):
            ax.annotate(
                f"n={n}",
                (x, mean + error),
                xytext=(0, 4),
                textcoords="offset points",
                ha="center",
                fontsize=7,
            )
            shown += [mean - error, mean + error]
    if not numeric:
        ax.set_xticks(range(len(order)), order)
        ax.set_xlim(-0.5, len(order) - 0.5)
    ax.set_ylim(*_pq_limits(shown))
    ax.set(xlabel=key, ylabel="PQ (%), mean ± std over seeds", title=title)
    ax.grid(alpha=0.3)
    if len(names) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _pq_limits(values: Sequence[float]) -> tuple[float, float]:
    """y limits (percent) that hold every value with a margin, clipped to [0, 100]."""
    if not values:
        return 0.0, 100.0
    low, high = min(values), max(values)
    margin = max(MIN_Y_MARGIN, Y_MARGIN * (high - low))
    # More room above, for the `n=` labels.
    return max(0.0, low - margin), min(100.0, high + 2 * margin)


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


def trial_label(run: Any) -> str:
    """A trial's name in legends: the one its sweep's console and summary table show (the
    `maxdeeplab.trial` tag, `drop_path_schedule=linear`), else its run name."""
    return str(run.data.tags.get(tracking.TRIAL_TAG) or run.info.run_name or run.info.run_id)


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
        partition = _partition(runs, key)
        if len(set(partition)) > 1 and partition not in partitions:
            partitions.add(partition)
            varied.append(key)
    return varied


def _partition(runs: Sequence[Any], key: str) -> tuple[int, ...]:
    """Which runs share a value of `key`, independent of the values themselves."""
    values = [run.data.params.get(key) for run in runs]
    return tuple(values.index(value) for value in values)


def sweep_points(
    trials: Sequence[Any], key: str, varied: Sequence[str], metric: str = tracking.VAL_PQ
) -> tuple[list[tuple[str, float]], list[str]]:
    """The points of `metric_vs_key_figure` for one key, and each point's series label.

    A trial's series is its values of the other varied keys (`data.crop_size=641`), so that the
    trials grouped at one value differ by seed alone. Keys that move with `key` (its bundle) are
    not other keys.
    """
    with_key = [run for run in trials if key in run.data.params]
    own = _partition(with_key, key)
    others = [k for k in varied if k != key and _partition(with_key, k) != own]
    points = [(run.data.params[key], run.data.metrics[metric]) for run in with_key]
    series = [", ".join(f"{k}={run.data.params.get(k, '')}" for k in others) for run in with_key]
    return points, series


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
    curves = {trial_label(run): metric_series(client, run.info.run_id, metric) for run in trials}
    fig = pq_curves_figure(curves, f"{sweep}: {metric} of every trial")
    paths = [save_figure(fig, out / f"{stem}_trials_pq_vs_step.png")]
    varied = varied_keys(trials)
    for key in keys if keys is not None else varied:
        points, series = sweep_points(trials, key, varied, metric)
        title = f"{sweep}: final {metric} vs {key}"
        fig = metric_vs_key_figure(points, key, title, series=series)
        paths.append(save_figure(fig, out / f"{stem}_pq_vs_{_file_stem(key)}.png"))
    if log:
        for path in paths:
            client.log_artifact(parent_run_id, str(path), ARTIFACT_DIR)
    return paths


def _file_stem(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z_.-]+", "_", name).strip("_") or "run"
