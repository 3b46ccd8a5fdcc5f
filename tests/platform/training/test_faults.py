"""What a fault leaves behind, through real Ray Train runs (tiny variant, crop 65, 1 CPU worker):
finite checkpoints after skipped steps, a resume past a corrupt newest checkpoint, one driver per
run, and an error that no restart can fix reported after one attempt instead of every retry.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from maxdeeplab.platform import tracking
from maxdeeplab.platform.config import ExperimentConfig, load_experiment
from maxdeeplab.platform.data.synthetic import ensure_synthetic
from maxdeeplab.platform.errors import CheckpointError, DataError
from maxdeeplab.platform.run_lock import LockHeld
from maxdeeplab.platform.training.checkpoint import STATE_FILE, non_finite_tensors
from maxdeeplab.platform.training.launch import train
from maxdeeplab.platform.training.loop import TrainingDiverged

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def experiment(work: Path, *overrides: str) -> ExperimentConfig:
    return load_experiment(
        None,
        [
            "model.variant=max_deeplab_tiny",
            "data.crop_size=65",
            "data.synthetic_train=8",
            "data.synthetic_val=2",
            "data.synthetic_size=[97,97]",
            "data.num_workers=0",
            f"work_dir={work}",
            "optim.warmup_steps=0",
            "train.batch_size=2",
            "eval.batch_size=2",
            "eval.num_visualizations=0",
            "resources.num_workers=1",
            *overrides,
        ],
    )


def status(cfg: ExperimentConfig, run_id: str) -> str:
    from mlflow import MlflowClient

    return str(MlflowClient(tracking.tracking_uri(cfg)).get_run(run_id).info.status)


def metric_steps_are_unique(cfg: ExperimentConfig, run_id: str) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking.tracking_uri(cfg))
    for key in client.get_run(run_id).data.metrics:
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert len(steps) == len(set(steps)), f"{key}: {sorted(steps)}"


def test_a_huge_learning_rate_never_writes_a_poisoned_checkpoint(ray_session, tmp_path: Path):
    """lr=1e30: step 0 applies, later losses are NaN and skipped; every kept checkpoint is finite
    (before, the skipped steps' forward passes had filled every BatchNorm statistic with NaN)."""
    cfg = experiment(
        tmp_path,
        "optim.lr=1e30",
        "train.steps=8",
        "train.max_bad_steps=3",
        "train.log_interval=1",
        "train.checkpoint_interval=1",
        "train.keep_checkpoints=3",
        "eval.interval=100",
    )
    with pytest.raises(TrainingDiverged, match="NaN/inf for 4 steps in a row"):
        train(cfg, run_name="huge-lr")
    run_dir = tmp_path / "ray" / "huge-lr"
    kept = sorted(run_dir.glob("checkpoint_0*"))
    assert kept, "no checkpoint was kept"
    for directory in kept:
        saved = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
        assert non_finite_tensors(saved["model"]) == [], directory
        assert non_finite_tensors(saved["optimizer"]["state"]) == [], directory


def test_a_corrupt_newest_checkpoint_is_skipped_and_named(ray_session, tmp_path: Path, capfd):
    cfg = experiment(
        tmp_path,
        "optim.lr=2e-3",
        "train.steps=6",
        "train.log_interval=2",
        "train.checkpoint_interval=2",
        "eval.interval=6",
        "eval.max_images=2",
    )
    first = train(cfg, run_name="corrupt")
    run_dir = tmp_path / "ray" / "corrupt"
    newest = run_dir / "checkpoint_000000006" / STATE_FILE
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated, as by a full disk

    # A live driver holds the run: a second one is refused before anything changes.
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        lock = {"host": __import__("socket").gethostname(), "pid": holder.pid, "command": ""}
        (run_dir / "driver.lock").write_text(json.dumps({**lock, "started": 0, "heartbeat": 0}))
        with pytest.raises(LockHeld, match=rf"pid {holder.pid}"):
            train(cfg, run_name="corrupt", resume=True)
    finally:
        holder.kill()
        holder.wait()
    # ... and once that driver is gone (killed), its lock is taken over: the resume runs.
    longer = replace(cfg, train=replace(cfg.train, steps=8))
    capfd.readouterr()
    resumed = train(longer, run_name="corrupt", resume=True)
    captured = capfd.readouterr()
    out = captured.out + captured.err  # worker lines reach the driver through Ray's log stream
    assert f"skipping a corrupt checkpoint: {newest}: 1000 bytes" in out
    assert "resuming at step 4 from checkpoint_000000004" in out
    assert resumed.mlflow_run_id == first.mlflow_run_id
    assert status(cfg, first.mlflow_run_id) == "FINISHED"
    assert {"checkpoint_000000006-r1", "checkpoint_000000008-r1"} <= {
        d.name for d in run_dir.iterdir()
    }
    metric_steps_are_unique(cfg, first.mlflow_run_id)

    # No intact checkpoint: one error on the driver, and the finished run stays FINISHED.
    for state in run_dir.glob("checkpoint_0*/" + STATE_FILE):
        state.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"none of the \d checkpoints in .*corrupt is intact"):
        train(replace(cfg, train=replace(cfg.train, steps=10)), run_name="corrupt", resume=True)
    assert status(cfg, first.mlflow_run_id) == "FINISHED"


def test_an_error_no_restart_can_fix_is_not_retried(ray_session, tmp_path: Path) -> None:
    """A corrupt training image: the first attempt records the error, the restart ends at once."""
    from ray import cloudpickle
    from ray.train.v2._internal.execution.callback import WorkerGroupCallback

    root = ensure_synthetic(
        tmp_path / "data", num_train=4, num_val=2, height=97, width=97, seed=0
    ).rename(tmp_path / "coco")
    victim = sorted((root / "annotations" / "panoptic_train2017").glob("*.png"))[0]
    victim.write_bytes(b"not a png")
    attempts = tmp_path / "attempts"

    class CountAttempts(WorkerGroupCallback):  # runs in Ray Train's controller
        def after_worker_group_start(self, worker_group) -> None:  # type: ignore[no-untyped-def]
            with open(attempts, "a") as f:
                f.write("x")

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        cfg = experiment(
            tmp_path,
            f"data.root={root}",
            "train.steps=4",  # two epochs of 4 images: the corrupt one is read
            "eval.interval=100",
            "resources.max_failures=3",
        )
        with pytest.raises(DataError, match=victim.name):
            train(cfg, run_name="bad-data", callbacks=[CountAttempts()])
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert attempts.read_text() == "xx"  # the failing attempt and one that ends at once
    shutil.rmtree(root)
