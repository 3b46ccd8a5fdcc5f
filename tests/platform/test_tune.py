"""Ray Tune sweeps on CPU: parent/child MLflow runs, resume after a killed driver, ASHA, bad input.

Trials are tiny (tiny variant, crop 65, a few steps on a handful of synthetic images): start-up of
Ray Train's worker groups dominates their time.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from maxdeeplab.dashboards.plots import trial_label
from maxdeeplab.platform import provenance, tracking
from maxdeeplab.platform.errors import ConfigError, MaXDeepLabError
from maxdeeplab.platform.sweep_config import load_sweep
from maxdeeplab.platform.sweep_dirs import DEFINITION_FILE, choose_sweep_dir, sweep_definition
from maxdeeplab.platform.tune import LOG_FILE, base_config, run_sweep

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


def test_sweep_stopped_by_sigterm_resumes_and_an_edited_one_needs_fresh(
    ray_session, tmp_path, capfd
):
    """SIGTERM to a sweep's driver mid-sweep: KILLED runs, exit 143, and `--resume` finishes it
    without rerunning a trial. Then the YAML is edited: refused under the same name, run with
    `--fresh` into a new directory, where a failing trial ends the sweep with its cause."""
    import ray

    path = write_sweep(
        tmp_path,
        "  model.drop_path_schedule: {grid: [linear, constant]}",
        "{max_concurrent_trials: 1}",
        steps=10,
        eval_interval=10,
    )
    address = ray.get_runtime_context().gcs_address
    log = tmp_path / "driver.log"
    driver = subprocess.Popen(
        [sys.executable, "-m", "maxdeeplab.cli", "sweep", str(path), "--address", address],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:  # stop the driver as soon as the first trial's child run has finished
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and driver.poll() is None:
            _, children = mlflow_runs(path)
            if any(r.info.status == "FINISHED" for r in children):
                break
            time.sleep(1)
        assert driver.poll() is None, f"the sweep ended before the signal:\n{log.read_text()}"
        driver.send_signal(signal.SIGTERM)  # a scheduler's or `kill`'s
        assert driver.wait(timeout=120) == 143, log.read_text()[-3000:]
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
    last = log.read_text().strip().splitlines()[-1]
    assert "interrupted (SIGTERM): sweep study stopped" in last, last
    assert f"maxdeeplab sweep {path} --resume" in last
    parents, children = mlflow_runs(path)
    assert parents[0].info.status == "KILLED"
    assert sorted(r.info.status for r in children) in (["FINISHED"], ["FINISHED", "KILLED"])

    result = run_sweep(path, resume=True)
    summaries = result.trials

    parents, children = mlflow_runs(path)
    assert len(parents) == 1 and len(children) == 2  # no duplicate child run after the resume
    # Each child is named by what it tries, in MLflow, the summary table and the plot legends;
    # its Ray Train run keeps the Tune trial id (resume finds it by that name).
    names = {"drop_path_schedule=linear", "drop_path_schedule=constant"}
    assert {c.data.tags[tracking.TRIAL_TAG] for c in children} == names
    for child in children:
        tags = child.data.tags
        assert child.info.run_name == f"study · {tags[tracking.TRIAL_TAG]}"
        value = tags[tracking.SEARCH_TAG_PREFIX + "model.drop_path_schedule"]
        assert tags[tracking.TRIAL_TAG] == f"drop_path_schedule={value}"
        assert child.data.params["model.drop_path_schedule"] == value
        assert (tmp_path / "work" / "ray" / f"study-{tags[tracking.TRIAL_ID_TAG]}").is_dir()
    assert {trial_label(c) for c in children} == names == {s.name for s in summaries}
    # provenance: the command that ran the sweep, not the Ray worker process running the trial
    commands = [c.data.tags[provenance.COMMAND_TAG] for c in children]
    assert not any("default_worker" in c for c in commands), commands
    assert any(f"sweep {path}" in c for c in commands), commands
    assert all(name in result.table for name in names)
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert {c.data.params["model.drop_path_schedule"] for c in children} == {"linear", "constant"}
    for child in children:
        assert child.info.status == "FINISHED"
        for metric in (tracking.VAL_PQ, tracking.VAL_PQ_THING, tracking.VAL_PQ_STUFF):
            assert 0.0 <= child.data.metrics[metric] <= 1.0
    assert len(summaries) == 2 and all(s.steps == 10 for s in summaries)
    assert "search.model.drop_path_schedule" in parents[0].data.params
    assert parents[0].info.status == "FINISHED"

    # The same name with another search and fewer steps: refused, not replayed ...
    bad = tmp_path / "other_model.pt"
    torch.save({"not_a_layer": torch.zeros(1)}, bad)  # an init checkpoint for another model
    path.write_text(
        path.read_text()
        .replace(
            "model.drop_path_schedule: {grid: [linear, constant]}",
            f"model.init_checkpoint: {{grid: ['{bad}']}}",
        )
        .replace(
            "overrides: {}",
            "overrides: {train.steps: 2, eval.interval: 2, resources.max_failures: 0}",
        )
    )
    with pytest.raises(ConfigError, match=r"another definition \(search.model.drop_path_schedule"):
        run_sweep(path)
    # ... and with --fresh a new sweep beside the old one, whose failed trial gives its cause.
    capfd.readouterr()
    with pytest.raises(MaXDeepLabError, match=r"^1 of 1 trials failed \(causes above\)"):
        run_sweep(path, fresh=True)
    lines = capfd.readouterr().out.splitlines()
    failed = [line for line in lines if line.startswith(f"[init_checkpoint={bad}] failed: ")]
    assert failed and "ConfigError: " in failed[-1], lines[-20:]
    assert "1 unknown and 0 mis-shaped tensors for this model (not_a_layer)" in failed[-1]
    sweeps = tmp_path / "work" / "sweeps"
    assert (sweeps / "study-2" / DEFINITION_FILE).is_file() and (
        sweeps / "study" / DEFINITION_FILE
    ).is_file()


def test_asha_stops_a_diverging_trial_early(
    ray_session, tmp_path, assert_no_placement_groups, capfd
):
    """Two trials, one at a time: the second starts only if the first's reservation is gone.

    The console shows our lines, each trial's prefixed with its name; Tune's tables go to the log.
    """
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

    lines = capfd.readouterr().out.splitlines()
    log_file = tmp_path / "work" / "sweeps" / "study" / LOG_FILE
    assert f"sweep study: Ray, Tune and MLflow messages go to {log_file}" in lines
    for name in ("lr=0.002", "lr=10"):
        assert any(line.startswith(f"[{name}] step 5/80  loss ") for line in lines), name
        assert any(line.startswith(f"[{name}] eval step 40: PQ ") for line in lines), name
    tune_lines = [line for line in lines if "Trial status" in line or "│" in line]
    assert not [*tune_lines, *(line for line in lines if "tensorboard" in line.lower())]
    assert "Trial status" in log_file.read_text()


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


def test_a_sweep_finds_the_directory_holding_its_definition(tmp_path):
    """No Ray: which directory a run of a sweep YAML continues, starts or refuses."""
    path = write_sweep(tmp_path, "  optim.lr: {grid: [1.0e-3]}", "{}", steps=2, eval_interval=2)
    sweep = load_sweep(path)
    first = choose_sweep_dir(sweep)
    assert first.name == "study"
    first.mkdir()
    (first / DEFINITION_FILE).write_text(json.dumps(sweep_definition(sweep)))
    assert choose_sweep_dir(sweep) == first  # the same sweep again: its own state
    assert choose_sweep_dir(sweep, resume=True) == first
    path.write_text(path.read_text().replace("1.0e-3", "2.0e-3"))
    edited = load_sweep(path)
    with pytest.raises(ConfigError, match=r"search.optim.lr: .*0\.001.* -> .*0\.002.*--fresh"):
        choose_sweep_dir(edited)
    with pytest.raises(ConfigError, match="nothing to resume"):
        choose_sweep_dir(edited, resume=True)
    second = choose_sweep_dir(edited, fresh=True)
    assert second.name == "study-2"
    second.mkdir()
    (second / DEFINITION_FILE).write_text(json.dumps(sweep_definition(edited)))
    assert choose_sweep_dir(edited) == second  # found again without --fresh
    assert choose_sweep_dir(sweep) == first
