"""Run and sweep plots: PNGs on disk and in the runs' `plots/` artifacts, drawn from real runs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from matplotlib.image import imread
from mlflow import MlflowClient

from maxdeeplab.dashboards.plots import (
    child_runs,
    metric_vs_key_figure,
    per_class_figure,
    plot_run,
    plot_sweep,
    pq_curves_figure,
    sweep_points,
    varied_keys,
)
from maxdeeplab.platform import tracking
from maxdeeplab.platform.config import load_experiment

# Final PQ (fraction) of each (crop, schedule) trial: 641 beats 321, linear beats constant.
TRIALS = {
    (321, "constant"): 0.20,
    (321, "linear"): 0.25,
    (641, "constant"): 0.30,
    (641, "linear"): 0.35,
}
CLASSES = {"person": 0.6, "car": 0.4, "sky-other": 0.8}


@pytest.fixture(scope="module")
def sweep(tracking_work_dir):
    base = [
        f"work_dir={tracking_work_dir}",
        "tracking.experiment=plots-check",
        "name=schedule_study",
    ]
    parent_cfg = load_experiment(None, base)
    parent = tracking.create_run(parent_cfg, "schedule_study")
    uri = tracking.tracking_uri(parent_cfg)
    trials = {}
    for i, ((crop, schedule), pq) in enumerate(TRIALS.items()):
        overrides = [f"data.crop_size={crop}", f"model.drop_path_schedule={schedule}"]
        # The area limits scale with the crop, as in the model-zoo grid's `resolution` bundle.
        overrides.append(f"postprocess.thing_area_limit={crop // 4}")
        cfg = load_experiment(None, [*base, *overrides, f"tracking.run_name=trial-{i}"])
        run_id = tracking.create_run(cfg, f"trial-{i}", parent_run_id=parent)
        logger = tracking.RunLogger(uri, run_id, system_metrics=False)
        logger.log_metrics({tracking.VAL_PQ: pq / 2, tracking.VAL_PQ_THING: pq / 3}, step=100)
        metrics = {tracking.VAL_PQ: pq, tracking.VAL_PQ_THING: pq - 0.05}
        metrics[tracking.VAL_PQ_STUFF] = pq + 0.05
        metrics.update({tracking.class_metric(name): v for name, v in CLASSES.items()})
        logger.log_metrics(metrics, step=200)
        logger.close()
        trials[(crop, schedule)] = run_id
    return {"uri": uri, "parent": parent, "trials": trials}


def test_plot_run_writes_and_logs_curves_and_per_class_bars(sweep, tmp_path):
    run_id = sweep["trials"][(641, "linear")]
    paths = plot_run(run_id, tmp_path, uri=sweep["uri"])
    assert [p.name for p in paths] == ["trial-3_pq_vs_step.png", "trial-3_per_class_pq.png"]
    for path in paths:
        image = imread(path)
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 400
        assert image[..., :3].std() > 0.01  # something is drawn
    client = MlflowClient(tracking_uri=sweep["uri"])
    logged = sorted(a.path for a in client.list_artifacts(run_id, "plots"))
    assert logged == ["plots/trial-3_per_class_pq.png", "plots/trial-3_pq_vs_step.png"]


def test_curves_and_bars_show_the_logged_values_in_percent():
    fig = pq_curves_figure({"PQ": [(100, 0.1), (200, 0.35)], "PQ_thing": [(200, 0.3)]}, "t")
    (ax,) = fig.axes
    assert [list(line.get_xdata()) for line in ax.lines] == [[100, 200], [200]]
    assert list(ax.lines[0].get_ydata()) == pytest.approx([10.0, 35.0])
    bars = per_class_figure(CLASSES, "t").axes[0]
    assert [t.get_text() for t in bars.get_yticklabels()] == ["car", "person", "sky-other"]
    assert [p.get_width() for p in bars.patches] == pytest.approx([40.0, 60.0, 80.0])


def test_numeric_key_joins_the_mean_of_each_value_with_its_spread_and_n():
    points = [("641", 0.30), ("321", 0.20), ("641", 0.34), ("321", 0.25), ("641", 0.32)]
    ax = metric_vs_key_figure(points, "data.crop_size", "t").axes[0]
    line = next(line for line in ax.lines if len(line.get_xdata()) > 1)
    assert list(line.get_xdata()) == [321.0, 641.0] and line.get_linestyle() == "-"
    assert list(line.get_ydata()) == pytest.approx([22.5, 32.0])
    (bars,) = ax.collections[-1:]  # the error bars: mean ± sample std
    spans = sorted(abs(seg[1][1] - seg[0][1]) for seg in bars.get_segments())
    assert spans == pytest.approx(sorted([2 * 3.5355339, 2 * 2.0]))
    assert sorted(t.get_text() for t in ax.texts) == ["n=2", "n=3"]


def test_categorical_key_has_markers_not_a_line_and_a_floor_above_zero():
    # Values of 40-45 %: the axis starts just below them, not at 0, and cuts none.
    points = [("linear", 0.45), ("constant", 0.40), ("linear", 0.43), ("constant", 0.41)]
    ax = metric_vs_key_figure(points, "model.drop_path_schedule", "t").axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["constant", "linear"]
    for line in ax.lines:  # markers and error-bar caps only: no line between categories
        assert line.get_linestyle() == "None"
    means = next(line for line in ax.lines if line.get_marker() == "o")
    assert list(means.get_ydata()) == pytest.approx([40.5, 44.0])
    assert sorted(t.get_text() for t in ax.texts) == ["n=2", "n=2"]
    low, high = ax.get_ylim()
    assert 30.0 < low < 40.0 and high > 45.0


def test_series_split_repeats_and_sit_side_by_side():
    points = [("linear", 0.35), ("linear", 0.25), ("constant", 0.30), ("constant", 0.20)]
    series = ["crop=641", "crop=321", "crop=641", "crop=321"]
    ax = metric_vs_key_figure(points, "model.drop_path_schedule", "t", series=series).axes[0]
    means = [line for line in ax.lines if line.get_marker() == "o"]
    assert [list(m.get_ydata()) for m in means] == [
        pytest.approx([20.0, 25.0]),
        pytest.approx([30.0, 35.0]),
    ]
    # Side by side: crop=321 left of each category's tick, crop=641 right of it.
    assert all(means[0].get_xdata() < [0, 1]) and all(means[1].get_xdata() > [0, 1])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["crop=321", "crop=641"]
    assert [t.get_text() for t in ax.texts] == ["n=1"] * 4
    with pytest.raises(ValueError, match="3 series labels for 4 points"):
        metric_vs_key_figure(points, "k", "t", series=series[:3])


def test_seed_is_a_repeat_not_a_swept_key():
    runs = [
        SimpleNamespace(data=SimpleNamespace(params={"seed": str(seed), "train.steps": steps}))
        for seed in (0, 1)
        for steps in ("100", "200")
    ]
    assert varied_keys(runs) == ["train.steps"]


def test_plot_sweep_finds_trials_and_varied_keys(sweep, tmp_path):
    client = MlflowClient(tracking_uri=sweep["uri"])
    trials = child_runs(client, sweep["parent"])
    assert {r.info.run_id for r in trials} == set(sweep["trials"].values())
    # tracking.run_name differs per trial too, but is not what the sweep studies; the area limit
    # moves with the crop size, so it is plotted once, under the crop size.
    assert varied_keys(trials) == ["data.crop_size", "model.drop_path_schedule"]
    # Against the schedule, one series per crop size; the area limit moves with the crop.
    varied = varied_keys(trials)
    points, series = sweep_points(trials, "model.drop_path_schedule", varied)
    by_trial = {(int(s.split("=")[1]), v): pq for (v, pq), s in zip(points, series, strict=True)}
    assert by_trial == TRIALS
    points, series = sweep_points(trials, "postprocess.thing_area_limit", varied)
    assert {s.split("=")[0] for s in series} == {"model.drop_path_schedule"}

    paths = plot_sweep(sweep["parent"], tmp_path, uri=sweep["uri"])
    assert [p.name for p in paths] == [
        "schedule_study_trials_pq_vs_step.png",
        "schedule_study_pq_vs_data.crop_size.png",
        "schedule_study_pq_vs_model.drop_path_schedule.png",
    ]
    assert all(imread(p).shape[0] > 200 for p in paths)
    logged = {a.path for a in client.list_artifacts(sweep["parent"], "plots")}
    assert logged == {f"plots/{p.name}" for p in paths}

    only = plot_sweep(
        sweep["parent"], tmp_path / "one", uri=sweep["uri"], keys=["data.crop_size"], log=False
    )
    assert [p.name for p in only][1:] == ["schedule_study_pq_vs_data.crop_size.png"]
