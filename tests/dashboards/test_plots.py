"""Run and sweep plots: PNGs on disk and in the runs' `plots/` artifacts, drawn from real runs."""

from __future__ import annotations

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


def test_metric_vs_key_joins_the_best_trial_at_each_value():
    points = [("641", 0.30), ("321", 0.20), ("641", 0.35), ("321", 0.25)]
    ax = metric_vs_key_figure(points, "data.crop_size", "t").axes[0]
    (line,) = ax.lines
    assert list(line.get_xdata()) == [321.0, 641.0]
    assert list(line.get_ydata()) == pytest.approx([25.0, 35.0])
    categorical = [("linear", 0.35), ("constant", 0.30), ("linear", 0.25)]
    ax = metric_vs_key_figure(categorical, "model.drop_path_schedule", "t").axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["constant", "linear"]
    assert list(ax.lines[0].get_ydata()) == pytest.approx([30.0, 35.0])


def test_plot_sweep_finds_trials_and_varied_keys(sweep, tmp_path):
    client = MlflowClient(tracking_uri=sweep["uri"])
    trials = child_runs(client, sweep["parent"])
    assert {r.info.run_id for r in trials} == set(sweep["trials"].values())
    # tracking.run_name differs per trial too, but is not what the sweep studies; the area limit
    # moves with the crop size, so it is plotted once, under the crop size.
    assert varied_keys(trials) == ["data.crop_size", "model.drop_path_schedule"]

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
