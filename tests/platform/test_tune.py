"""Ray Tune sweeps on CPU: parent/child MLflow runs, resume after a killed driver, ASHA, bad input.

Trials are tiny (tiny variant, crop 65, a few steps on a handful of synthetic images): start-up of
Ray Train's worker groups dominates their time.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from maxdeeplab.platform import tracking
from maxdeeplab.platform.errors import ConfigError
from maxdeeplab.platform.sweep_config import load_sweep
from maxdeeplab.platform.tune import base_config, run_sweep

pytestmark = [pytest.mark.ray, pytest.mark.slow]

EXPERIMENT = """\
name: tiny
work_dir: {work}
model: {{variant: max_deeplab_tiny}}
data:
  crop_size: 65
  synthetic_train: 8
  synthetic_val: 4
  synthetic_size: [97, 97]
  num_workers: 0
train:
  {{steps: {steps}, batch_size: 4, log_interval: 5, checkpoint_interval: 10, max_bad_steps: 1000}}
optim: {{lr: 2.0e-3, warmup_steps: 0, backbone_lr_multiplier: 1.0}}
eval: {{interval: {eval_interval}, batch_size: 4, num_visualizations: 0}}
postprocess: {{thing_area_limit: 4, stuff_area_limit: 16}}
resources: {{num_workers: 1}}
"""


def write_sweep(
    tmp_path: Path, search: str, tune: str, *, steps: int, eval_interval: int, overrides: str = "{}"
) -> Path:
    work = tmp_path / "work"
    (tmp_path / "exp.yaml").write_text(
        EXPERIMENT.format(work=work, steps=steps, eval_interval=eval_interval)
    )
    path = tmp_path / "sweep.yaml"
    path.write_text(
        f"name: study\nbase: exp.yaml\noverrides: {overrides}\nsearch:\n{search}\ntune: {tune}\n"
    )
    return path


def mlflow_runs(sweep_path: Path) -> tuple[list, list]:
    from mlflow import MlflowClient

    cfg = base_config(load_sweep(sweep_path))
    client = MlflowClient(tracking_uri=tracking.tracking_uri(cfg))
    experiment = client.get_experiment_by_name("study")
    if experiment is None:
        return [], []
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


def test_sweep_resumes_after_its_driver_is_killed(ray_session, tmp_path):
    import ray

    path = write_sweep(
        tmp_path,
        "  model.drop_path_schedule: {grid: [linear, constant]}",
        "{max_concurrent_trials: 1}",
        steps=10,
        eval_interval=10,
    )
    address = ray.get_runtime_context().gcs_address
    driver = subprocess.Popen(
        [sys.executable, "-m", "maxdeeplab.cli", "sweep", str(path), "--address", address],
        stdout=(tmp_path / "driver.log").open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:  # kill the driver as soon as the first trial's child run has finished
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and driver.poll() is None:
            _, children = mlflow_runs(path)
            if any(r.info.status == "FINISHED" for r in children):
                break
            time.sleep(1)
        log = (tmp_path / "driver.log").read_text()[-3000:]
        assert driver.poll() is None, f"the sweep ended before it could be interrupted:\n{log}"
        _, children = mlflow_runs(path)
        assert [r.info.status for r in children].count("FINISHED") == 1
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()

    summaries = run_sweep(path, resume=True).trials

    parents, children = mlflow_runs(path)
    assert len(parents) == 1 and len(children) == 2  # no duplicate child run after the resume
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert {c.data.params["model.drop_path_schedule"] for c in children} == {"linear", "constant"}
    for child in children:
        assert child.info.status == "FINISHED"
        for metric in (tracking.VAL_PQ, tracking.VAL_PQ_THING, tracking.VAL_PQ_STUFF):
            assert 0.0 <= child.data.metrics[metric] <= 1.0
    assert len(summaries) == 2 and all(s.steps == 10 for s in summaries)
    assert "search.model.drop_path_schedule" in parents[0].data.params
    assert parents[0].info.status == "FINISHED"


def test_asha_stops_a_diverging_trial_early(ray_session, tmp_path, assert_no_placement_groups):
    """Two trials, one at a time: the second starts only if the first's reservation is gone."""
    path = write_sweep(
        tmp_path,
        "  optim.lr: {grid: [2.0e-3, 10.0]}",
        "{max_concurrent_trials: 1,"
        " scheduler: {type: asha, grace_period: 40, reduction_factor: 2}}",
        steps=80,
        eval_interval=40,
        # Low thresholds so that a model 40 steps into training already scores PQ > 0.
        overrides="{postprocess.class_threshold: 0.1, postprocess.pixel_threshold: 0.1}",
    )
    summaries = {s.point["optim.lr"]: s for s in run_sweep(path).trials}
    assert summaries[2e-3].steps == 80
    assert summaries[10.0].steps < 80, "ASHA let the lr=10 trial run to the end"
    assert summaries[10.0].metrics[tracking.VAL_PQ] < summaries[2e-3].metrics[tracking.VAL_PQ]
    assert_no_placement_groups()  # including the stopped trial's


def test_unsatisfiable_resources_fail_before_any_trial(ray_session, tmp_path):
    path = write_sweep(
        tmp_path,
        "  optim.lr: {grid: [1.0e-3]}",
        "{max_concurrent_trials: 1}",
        steps=2,
        eval_interval=2,
    )
    path.write_text(path.read_text() + "resources: {num_workers: 2, use_gpu: true}\n")
    with pytest.raises(ConfigError, match=r"needs 2 GPU\(s\).*cluster has 0"):
        run_sweep(path)
    _, children = mlflow_runs(path)
    assert children == []


def test_resume_without_saved_state_is_an_error(tmp_path):
    path = write_sweep(
        tmp_path,
        "  optim.lr: {grid: [1.0e-3]}",
        "{max_concurrent_trials: 1}",
        steps=2,
        eval_interval=2,
    )
    with pytest.raises(ConfigError, match="nothing to resume"):
        run_sweep(path, resume=True)
