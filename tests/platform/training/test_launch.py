"""Driver-side pieces that need no Ray: argument splitting, run lookup, one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from maxdeeplab.cli.commands.train import split_items
from maxdeeplab.platform.errors import ConfigError, DataError
from maxdeeplab.platform.storage import Location
from maxdeeplab.platform.training.launch import (
    CONFIG_FILE,
    TrainingFailed,
    _one_line_error,
    find_run,
)


def test_the_first_item_is_the_experiment_unless_it_is_an_override() -> None:
    assert split_items(["exp.yaml", "train.steps=3"]) == ("exp.yaml", ["train.steps=3"])
    assert split_items(["train.steps=3"]) == (None, ["train.steps=3"])
    assert split_items([]) == (None, [])


def test_find_run_by_name_or_path(tmp_path: Path) -> None:
    run = tmp_path / "ray" / "quickstart-1"
    run.mkdir(parents=True)
    (run / CONFIG_FILE).write_text("name: quickstart\n")
    assert find_run("quickstart-1", str(tmp_path)) == Location.parse(run)
    assert find_run(str(run), "elsewhere") == Location.parse(run)
    with pytest.raises(
        ConfigError, match="--resume nope: .*name the run's work dir with --work-dir"
    ):
        find_run("nope", str(tmp_path))


def test_worker_failures_become_one_line(tmp_path: Path) -> None:
    from ray.train import WorkerGroupError

    from maxdeeplab.platform.config import load_experiment

    cfg = load_experiment(None, [f"work_dir={tmp_path}", "resources.max_failures=2"])
    data_error = DataError("train2017/0001.jpg: cannot decode")
    # our own errors come through unchanged
    assert _one_line_error(WorkerGroupError("...", {0: data_error}), cfg) is data_error
    # anything else: the rank, the type and the last line of the message
    crash = RuntimeError("Traceback ...\n  File x\nsize mismatch for conv.weight")
    error = _one_line_error(WorkerGroupError("...", {1: crash, 0: crash}), cfg)
    assert isinstance(error, TrainingFailed)
    assert "\n" not in str(error)
    assert str(error) == (
        "worker rank 0 failed (after 2 restarts): RuntimeError: size mismatch for conv.weight"
    )


def test_a_diverging_run_stops_with_a_clear_error(tmp_path: Path) -> None:
    """lr = 1e30 overflows the weights at once; 2 non-finite steps in a row > max_bad_steps = 1.

    Runs in Ray Train's local mode (this process, no Ray instance needed).
    """
    import torch

    from maxdeeplab.platform import tracking
    from maxdeeplab.platform.config import load_experiment
    from maxdeeplab.platform.training.launch import train
    from maxdeeplab.platform.training.loop import TrainingDiverged, read_status

    cfg = load_experiment(
        None,
        [
            "model.variant=max_deeplab_tiny",
            "data.crop_size=65",
            "data.synthetic_train=8",
            "data.synthetic_val=2",
            "data.synthetic_size=[97,97]",
            "data.num_workers=0",
            f"work_dir={tmp_path}",
            "optim.warmup_steps=0",
            "optim.lr=1e30",
            "train.steps=10",
            "train.batch_size=2",
            "train.max_bad_steps=1",
            "train.log_interval=1",
        ],
    )
    threads = torch.get_num_threads()
    try:
        with pytest.raises(TrainingDiverged, match=r"NaN/inf for 2 steps in a row"):
            train(cfg, run_name="diverging", local=True)
    finally:
        torch.set_num_threads(threads)
    assert read_status(Location.parse(tmp_path / "ray" / "diverging"))["status"] == "diverged"
    (run,) = tracking.find_runs(cfg, "diverging")
    assert run.info.status == "FAILED"
    assert run.data.metrics[tracking.TRAIN_BAD_STEPS] == 2


def test_starting_a_local_ray_says_so_before_it_waits(monkeypatch, capsys) -> None:
    import ray

    from maxdeeplab.platform.training import launch

    class Started(Exception):
        pass

    def init(**kwargs: object) -> None:  # what the console showed when Ray would start
        raise Started(capsys.readouterr().out)

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(launch, "_listen_on_loopback", lambda: None)
    with pytest.raises(Started) as started:
        launch.start_ray(quiet=False)
    assert str(started.value) == "starting Ray (local, 127.0.0.1)...\n"
