"""Losing a node mid-run: the run resumes from the bucket's checkpoint on the surviving node and
ends with the weights of an uninterrupted run; then a stopped run resumes from a fresh directory.

Runs after test_submit.py (file order): the cluster has one node left afterwards.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

from maxdeeplab.platform.config import load_experiment
from maxdeeplab.platform.training.launch import train

if TYPE_CHECKING:  # the fixtures' types (conftest.py is not imported by name)
    from conftest import MlflowServer, RayCluster, S3Server

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
HERE = Path(__file__).parent
RUN_TIMEOUT_S = 420

TINY = [
    "model.variant=max_deeplab_tiny",
    "data.crop_size=65",
    "data.synthetic_train=8",
    "data.synthetic_val=2",
    "data.synthetic_size=[97,97]",
    "data.num_workers=0",
    "optim.warmup_steps=0",
    "optim.lr=2e-3",
    "train.steps=12",
    "train.batch_size=2",
    "train.log_interval=2",
    "train.checkpoint_interval=4",
    "eval.interval=12",
    "eval.batch_size=2",
    "eval.max_images=2",
    "eval.num_visualizations=0",
    "postprocess.thing_area_limit=4",
    "postprocess.stuff_area_limit=16",
    "resources.num_workers=1",
    "resources.max_failures=2",
]


def tiny_experiment(folder: Path) -> str:
    """TINY as an experiment YAML (the path, for the command line)."""
    from omegaconf import OmegaConf

    path = folder / "tiny.yaml"
    path.write_text(OmegaConf.to_yaml(OmegaConf.from_dotlist(TINY)))
    return str(path)


def cluster_driver(
    cluster: RayCluster, args: list[str], *, cwd: Path, log: Path
) -> subprocess.Popen[bytes]:
    """`maxdeeplab ARGS --address GCS` joining the cluster from this machine, as a user would."""
    return subprocess.Popen(
        [sys.executable, "-m", "maxdeeplab.cli", *args, "--address", cluster.gcs_address],
        env=cluster.env,
        cwd=cwd,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def cpu_holder(cluster: RayCluster, action: str) -> str:
    done = subprocess.run(
        [sys.executable, str(HERE / "cluster_actor.py"), action, cluster.gcs_address],
        env=cluster.env | {"RAY_AUTH_MODE": "token"},  # a plain Ray driver needs it said
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.strip()


def keys(server: S3Server, prefix: str) -> list[str]:
    pages = server.client().get_paginator("list_objects_v2")
    return [
        o["Key"]
        for p in pages.paginate(Bucket=server.bucket, Prefix=prefix)
        for o in p.get("Contents", [])
    ]


def wait_for(what: str, condition, driver: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not condition():
        assert driver.poll() is None, f"the driver ended before {what}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} in time:\n{log.read_text()[-3000:]}"
        time.sleep(1)


def final_weights(uri: str, run_id: str, into: Path) -> dict[str, torch.Tensor]:
    from mlflow import MlflowClient

    path = MlflowClient(tracking_uri=uri).download_artifacts(
        run_id, "checkpoint/model.pt", str(into)
    )
    return torch.load(path, map_location="cpu", weights_only=True)


def test_a_lost_node_resumes_from_the_bucket_with_exact_weights(
    ray_cluster: RayCluster,
    s3_server: S3Server,
    mlflow_server: MlflowServer,
    tmp_path: Path,
) -> None:
    from mlflow import MlflowClient

    # The uninterrupted reference, in this process (Ray Train's local mode, local store).
    threads = torch.get_num_threads()
    try:
        reference_cfg = load_experiment(None, [*TINY, f"work_dir={tmp_path / 'reference'}"])
        reference = train(reference_cfg, run_name="reference", local=True)
    finally:
        torch.set_num_threads(threads)
    expected = final_weights(
        f"sqlite:///{tmp_path / 'reference' / 'mlflow.db'}", reference.mlflow_run_id, tmp_path / "a"
    )

    work = f"s3://{s3_server.bucket}/node-loss"
    fresh = tmp_path / "driver"
    fresh.mkdir()
    log = tmp_path / "driver.log"
    args = [
        "train",
        tiny_experiment(tmp_path),
        f"work_dir={work}",
        f"cache_dir={tmp_path / 'cache'}",
        f"tracking.uri={mlflow_server.url}",
        "tracking.experiment=node-loss",
        "--name",
        "lost",
    ]
    head = cpu_holder(ray_cluster, "hold")  # the worker can only start on the second node
    driver = cluster_driver(ray_cluster, args, cwd=fresh, log=log)
    try:
        checkpoints = "node-loss/ray/lost/checkpoint_"
        wait_for(
            "a checkpoint in the bucket", lambda: any(keys(s3_server, checkpoints)), driver, log
        )
        cpu_holder(ray_cluster, "release")
        os.kill(ray_cluster.node_raylet_pid, signal.SIGKILL)  # the second node is gone
        assert driver.wait(timeout=RUN_TIMEOUT_S) == 0, log.read_text()[-4000:]
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    assert head, "the CPU holder did not report the head node"

    runs = MlflowClient(tracking_uri=mlflow_server.url).search_runs(
        [
            MlflowClient(tracking_uri=mlflow_server.url)
            .get_experiment_by_name("node-loss")
            .experiment_id
        ]
    )
    (run,) = runs  # one MLflow run, whatever restarted
    assert run.info.status == "FINISHED"
    actual = final_weights(mlflow_server.url, run.info.run_id, tmp_path / "b")
    assert expected.keys() == actual.keys()
    for name, value in expected.items():
        assert torch.allclose(value.float(), actual[name].float(), rtol=1e-5, atol=1e-6), name
    stored = keys(s3_server, "node-loss/ray/lost/")
    assert any(k.endswith("state.pt") for k in stored), stored
    assert not list(fresh.rglob("*.pt")) and not list(fresh.rglob("mlflow.db"))
    assert not list(fresh.rglob("mlruns"))


def test_a_stopped_run_resumes_from_the_bucket_in_a_fresh_directory(
    ray_cluster: RayCluster,
    s3_server: S3Server,
    mlflow_server: MlflowServer,
    tmp_path: Path,
) -> None:
    from mlflow import MlflowClient

    work = f"s3://{s3_server.bucket}/stopped"
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    log = tmp_path / "first.log"
    args = [
        "train",
        tiny_experiment(tmp_path),
        f"work_dir={work}",
        f"cache_dir={first / 'cache'}",
        f"tracking.uri={mlflow_server.url}",
        "tracking.experiment=stopped",
        "--name",
        "stopped",
    ]
    driver = cluster_driver(ray_cluster, args, cwd=first, log=log)
    try:
        checkpoints = "stopped/ray/stopped/checkpoint_"
        wait_for(
            "a checkpoint in the bucket", lambda: any(keys(s3_server, checkpoints)), driver, log
        )
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver's machine is gone
        driver.wait()
    shutil.rmtree(first)  # every local trace of the run

    second.mkdir()
    log = tmp_path / "second.log"
    resumed = cluster_driver(
        ray_cluster, ["train", "--resume", "stopped", "--work-dir", work], cwd=second, log=log
    )
    assert resumed.wait(timeout=RUN_TIMEOUT_S) == 0, log.read_text()[-4000:]
    client = MlflowClient(tracking_uri=mlflow_server.url)
    (run,) = client.search_runs([client.get_experiment_by_name("stopped").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "stopped"
    steps = {m.step for m in client.get_metric_history(run.info.run_id, "loss/total")}
    assert max(steps) == 12, steps
