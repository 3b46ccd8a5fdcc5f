"""Ray Train runs on CPU: 2-worker DDP with MLflow, exact resume after a killed worker, 2 nodes.

Kept small (tiny variant, crop 65, a handful of 97 x 97 synthetic images): Ray's start-up dominates.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from maxdeeplab.platform import tracking
from maxdeeplab.platform.config import ExperimentConfig, load_experiment, to_params
from maxdeeplab.platform.training.launch import TrainingFailed, prepare_experiment, train

pytestmark = [pytest.mark.ray, pytest.mark.slow]
HERE = Path(__file__).parent


def experiment(work: Path, *overrides: str) -> ExperimentConfig:
    return load_experiment(
        None,
        [
            "model.variant=max_deeplab_tiny",
            "data.crop_size=65",
            "data.synthetic_train=16",
            "data.synthetic_val=4",
            "data.synthetic_size=[97,97]",
            "data.num_workers=0",
            f"work_dir={work}",
            "optim.warmup_steps=0",
            "optim.lr=2e-3",
            "eval.batch_size=2",
            "eval.num_visualizations=1",
            "postprocess.thing_area_limit=4",
            "postprocess.stuff_area_limit=16",
            *overrides,
        ],
    )


def client(cfg: ExperimentConfig):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking.tracking_uri(cfg))


def test_two_worker_ddp_run_learns_and_is_tracked(
    ray_session, tmp_path: Path, assert_no_placement_groups
) -> None:
    cfg = experiment(
        tmp_path,
        "resources.num_workers=2",
        "train.steps=20",
        "train.batch_size=4",
        "train.micro_batch_size=1",  # 2 images per worker in 2 passes: gradient accumulation
        "train.log_interval=5",
        "train.checkpoint_interval=10",
        "eval.interval=20",
    )
    outcome = train(cfg, run_name="ddp")
    mlflow = client(cfg)
    run = mlflow.get_run(outcome.mlflow_run_id)
    assert run.info.status == "FINISHED"
    # every flattened config key is a param, with the values the workers used
    assert run.data.params == to_params(prepare_experiment(cfg))
    losses = [m.value for m in mlflow.get_metric_history(run.info.run_id, tracking.LOSS_TOTAL)]
    assert len(losses) == 4, losses
    assert losses[-1] < losses[0], losses
    for key in (*tracking.VAL_METRICS, tracking.TRAIN_LR, tracking.TRAIN_IMAGES_PER_S):
        assert key in run.data.metrics, key
    assert 0.0 <= run.data.metrics[tracking.VAL_PQ] <= 1.0
    assert any(k.startswith(tracking.VAL_PQ_CLASS_PREFIX) for k in run.data.metrics)
    # the default store lives in the work dir, artifacts included (not under the cwd)
    assert tracking.tracking_uri(cfg) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert run.info.artifact_uri.startswith((tmp_path / "mlartifacts").as_uri())
    artifacts = {a.path for a in mlflow.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "checkpoint", "pq", "predictions"} <= artifacts
    assert outcome.metrics["step"] == 20 and tracking.VAL_PQ in outcome.metrics
    assert_no_placement_groups()  # a finished run leaves no reservation behind


def final_weights(cfg: ExperimentConfig, run_id: str, into: Path) -> dict[str, torch.Tensor]:
    path = client(cfg).download_artifacts(run_id, "checkpoint/model.pt", str(into))
    return torch.load(path, map_location="cpu", weights_only=True)


def test_killed_worker_resumes_exactly(
    ray_session, tmp_path: Path, assert_no_placement_groups
) -> None:
    overrides = (
        "train.steps=8",
        "train.batch_size=2",
        "train.log_interval=2",
        "train.checkpoint_interval=3",
        "eval.interval=8",
        "eval.max_images=2",
        "resources.max_failures=1",
    )
    threads = torch.get_num_threads()
    try:  # the uninterrupted reference, in this process (Ray Train's local mode)
        reference_cfg = experiment(tmp_path / "reference", *overrides)
        reference = train(reference_cfg, run_name="reference", local=True)
    finally:
        torch.set_num_threads(threads)
    cfg = experiment(tmp_path / "killed", *overrides)
    killed = train(cfg, run_name="killed", crash_at_step=5)

    expected = final_weights(reference_cfg, reference.mlflow_run_id, tmp_path / "a")
    actual = final_weights(cfg, killed.mlflow_run_id, tmp_path / "b")
    assert expected.keys() == actual.keys()
    for name, value in expected.items():
        assert torch.allclose(value.float(), actual[name].float(), rtol=1e-5, atol=1e-6), name
    # The first attempt died after logging step 4; the second resumed from the step-3 checkpoint
    # and replayed step 4: every metric key (system/* included) still has one point per step.
    mlflow = client(cfg)
    for key in mlflow.get_run(killed.mlflow_run_id).data.metrics:
        steps = [m.step for m in mlflow.get_metric_history(killed.mlflow_run_id, key)]
        assert len(steps) == len(set(steps)), (key, sorted(steps))
    steps = [m.step for m in mlflow.get_metric_history(killed.mlflow_run_id, tracking.LOSS_TOTAL)]
    assert sorted(steps) == [2, 4, 6, 8], steps
    # ... and MLflow holds one run for it
    runs = tracking.find_runs(cfg, "killed")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert_no_placement_groups()  # neither the killed worker group's nor its successor's


def test_failed_run_leaves_no_placement_group(
    ray_session, tmp_path: Path, assert_no_placement_groups
) -> None:
    cfg = experiment(
        tmp_path,
        "train.steps=4",
        "train.batch_size=2",
        "eval.interval=4",
        "resources.max_failures=0",
    )
    with pytest.raises(TrainingFailed, match="worker rank 0 failed"):
        train(cfg, run_name="failed", crash_at_step=2)
    assert_no_placement_groups()


def test_two_node_cluster_trains_and_evaluates(tmp_path: Path) -> None:
    """A simulated 2-node cluster (its own Ray instance, so in a subprocess)."""
    cfg = experiment(
        tmp_path,
        "resources.num_workers=2",
        "resources.placement_strategy=SPREAD",
        "train.steps=4",
        "train.batch_size=2",
        "train.log_interval=2",
        "train.checkpoint_interval=4",
        "eval.interval=4",
    )
    config_path = tmp_path / "experiment.yaml"
    from maxdeeplab.platform.config import to_yaml

    config_path.write_text(to_yaml(cfg))
    result_path = tmp_path / "result.json"
    completed = subprocess.run(
        [sys.executable, str(HERE / "multinode_run.py"), str(config_path), str(result_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    result = json.loads(result_path.read_text())
    assert result["num_nodes"] == 2
    assert len(set(result["worker_nodes"])) == 2, result  # one worker on each node
    assert result["step"] == 4 and 0.0 <= result["pq"] <= 1.0
