"""`maxdeeplab submit` and `maxdeeplab jobs` against a real two-node Ray cluster with token auth.

The cluster parts are the session fixtures of conftest.py (an S3 server, an MLflow server, the Ray
cluster). The CLI runs as a subprocess with a client's environment, as a user would run it. The
experiment is tiny (tiny variant, crop 65, a few 97 x 97 synthetic images, a few steps, one
worker): the cluster's and the job's start-up dominate.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:  # the fixtures' types (conftest.py is not imported by name)
    from conftest import MlflowServer, RayCluster, S3Server

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

JOB_TIMEOUT_S = 300

# The base every test experiment names (`base:` is shipped with the job, at the same layout).
TINY = """\
model: {variant: max_deeplab_tiny}
data:
  crop_size: 65
  synthetic_train: 4
  synthetic_val: 2
  synthetic_size: [97, 97]
  num_workers: 0
train: {steps: 4, batch_size: 2, log_interval: 2, checkpoint_interval: 4, max_bad_steps: 1000}
optim: {lr: 2.0e-3, warmup_steps: 0, backbone_lr_multiplier: 1.0}
eval: {interval: 4, batch_size: 2, num_visualizations: 0}
postprocess: {thing_area_limit: 4, stuff_area_limit: 16}
resources: {num_workers: 1, cpus_per_worker: 1}
"""


def write_experiment(folder: Path, name: str, work_dir: str, *, tracking_uri: str = "") -> Path:
    """`folder/experiments/<name>.yaml`, whose `base:` is `folder/common/tiny.yaml`."""
    (folder / "common").mkdir(parents=True, exist_ok=True)
    (folder / "common" / "tiny.yaml").write_text(TINY)
    path = folder / "experiments" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    tracking = f"tracking: {{experiment: {name}, uri: '{tracking_uri}'}}\n"
    path.write_text(f"base: ../common/tiny.yaml\nname: {name}\nwork_dir: '{work_dir}'\n{tracking}")
    return path


def write_sweep(
    folder: Path, name: str, experiment: Path, search: str, *, concurrent: int = 1
) -> Path:
    """`folder/sweeps/<name>.yaml` over `experiment`, `concurrent` trials at a time."""
    path = folder / "sweeps" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    base = Path("..") / experiment.relative_to(folder)
    path.write_text(
        f"name: {name}\nbase: {base.as_posix()}\nsearch:\n{search}\n"
        f"tune: {{max_concurrent_trials: {concurrent}, scheduler: {{type: fifo}}}}\n"
        "resources: {num_workers: 1}\n"
    )
    return path


def maxdeeplab(
    *args: str, env: dict[str, str], cwd: Path, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """The CLI in a subprocess with exactly `env` (the test process's own may hold tokens)."""
    return subprocess.run(
        [sys.executable, "-m", "maxdeeplab.cli", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def job_ids(cluster: RayCluster) -> set[str]:
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(cluster.address, headers=cluster.auth_headers())
    return {job.submission_id for job in client.list_jobs() if job.submission_id}


def submit_and_list(
    cluster: RayCluster, yaml: Path, *overrides: str, cwd: Path
) -> tuple[str, subprocess.CompletedProcess[str]]:
    """`submit` (following the job to its end) then `jobs`: (the job id, `jobs`' result)."""
    result = maxdeeplab(
        "submit",
        str(yaml),
        *overrides,
        "--address",
        cluster.address,
        env=cluster.env,
        cwd=cwd,
        timeout=JOB_TIMEOUT_S,
    )
    print(result.stdout, result.stderr, sep="\n")  # shown when a test fails
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    submitted = [line for line in result.stdout.splitlines() if line.startswith("submitted ")]
    assert submitted, result.stdout
    job_id = submitted[0].split(" as job ")[1].split()[0]
    assert f"job {job_id} SUCCEEDED" in result.stdout
    listing = maxdeeplab("jobs", "--address", cluster.address, env=cluster.env, cwd=cwd)
    assert listing.returncode == 0, listing.stderr
    return job_id, listing


# ---------------------------------------------------------------------------------------------
# The fixtures themselves


def test_s3_server_round_trips_with_boto3_and_pyarrow(s3_server: S3Server) -> None:
    from pyarrow import fs

    s3_server.client().put_object(Bucket=s3_server.bucket, Key="probe/a.txt", Body=b"from boto3")
    # pyarrow finds the endpoint and credentials through the standard variables alone
    env = s3_server.env
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        s3, path = fs.FileSystem.from_uri(f"s3://{s3_server.bucket}/probe")
        with s3.open_input_stream(f"{path}/a.txt") as stream:
            assert stream.read() == b"from boto3"
        with s3.open_output_stream(f"{path}/b.txt") as stream:
            stream.write(b"from pyarrow")
    body = s3_server.client().get_object(Bucket=s3_server.bucket, Key="probe/b.txt")["Body"]
    assert body.read() == b"from pyarrow"


def test_mlflow_server_keeps_artifacts_in_the_bucket(
    mlflow_server: MlflowServer, s3_server: S3Server, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server.url)
    experiment_id = client.create_experiment("fixture-check")
    run = client.create_run(experiment_id, run_name="probe")
    artifact = tmp_path / "hello.txt"
    artifact.write_text("hello")
    client.log_artifact(run.info.run_id, str(artifact))  # through the server: no S3 env needed
    client.set_terminated(run.info.run_id)
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    listed = s3_server.client().list_objects_v2(Bucket=s3_server.bucket, Prefix="mlartifacts/")
    keys = [item["Key"] for item in listed.get("Contents", [])]
    assert any(key.endswith(f"{run.info.run_id}/artifacts/hello.txt") for key in keys), keys


# ---------------------------------------------------------------------------------------------
# Refusals: one line, exit 2, nothing submitted


def test_submit_without_token_is_refused(ray_cluster: RayCluster, tmp_path: Path) -> None:
    yaml = write_experiment(tmp_path, "refused", str(tmp_path / "work"))
    before = job_ids(ray_cluster)
    home = tmp_path / "home"  # no ~/.ray/auth_token there
    home.mkdir()
    result = maxdeeplab(
        "submit",
        str(yaml),
        "--address",
        ray_cluster.address,
        "--no-wait",
        env=ray_cluster.env_without_token(home),
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        f"error: the Ray cluster at {ray_cluster.address} requires an auth token: set "
        "RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH (none found in RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH "
        "or ~/.ray/auth_token)"
    ]
    # a wrong token: the same line, naming where the token came from
    wrong = ray_cluster.env_without_token(home) | {"RAY_AUTH_TOKEN": "not-the-token"}
    result = maxdeeplab("jobs", "--address", ray_cluster.address, env=wrong, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"error: the Ray cluster at {ray_cluster.address} requires an auth")
    assert line.endswith("(the token from RAY_AUTH_TOKEN was refused)")
    assert job_ids(ray_cluster) == before


def test_submit_to_an_unreachable_address_fails_in_one_line(
    ray_cluster: RayCluster, tmp_path: Path
) -> None:
    from maxdeeplab.platform.training.launch import free_port

    yaml = write_experiment(tmp_path, "nowhere", str(tmp_path / "work"))
    address = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    result = maxdeeplab(
        "submit", str(yaml), "--address", address, env=ray_cluster.env, cwd=tmp_path
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        f"error: cannot reach the Ray cluster at {address}: Connection refused"
    ]


def test_bad_key_fails_before_anything_is_submitted(
    ray_cluster: RayCluster, tmp_path: Path
) -> None:
    yaml = write_experiment(tmp_path, "badkey", str(tmp_path / "work"))
    yaml.write_text(yaml.read_text() + "train: {stpes: 3}\n")
    before = job_ids(ray_cluster)
    result = maxdeeplab(
        "submit", str(yaml), "--address", ray_cluster.address, env=ray_cluster.env, cwd=tmp_path
    )
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: ") and "stpes" in line and str(yaml) in line, line
    # an override is validated the same way
    result = maxdeeplab(
        "submit",
        str(write_experiment(tmp_path, "badvalue", str(tmp_path / "work"))),
        "data.crop_size=64",
        "--address",
        ray_cluster.address,
        env=ray_cluster.env,
        cwd=tmp_path,
    )
    assert result.returncode == 2 and "data.crop_size" in result.stderr, result.stderr
    assert job_ids(ray_cluster) == before


# ---------------------------------------------------------------------------------------------
# Jobs that run


def test_submitted_experiment_trains_on_the_cluster(
    ray_cluster: RayCluster, tmp_path: Path
) -> None:
    """Local work dir and MLflow store (the defaults), the `base:` file shipped alongside."""
    from mlflow import MlflowClient

    work = tmp_path / "work"
    yaml = write_experiment(tmp_path, "tiny-submit", str(work))
    job_id, listing = submit_and_list(ray_cluster, yaml, "train.steps=3", cwd=tmp_path)

    (line,) = [line for line in listing.stdout.splitlines() if line.startswith(job_id)]
    assert " SUCCEEDED " in line, line
    assert "maxdeeplab train experiments/tiny-submit.yaml train.steps=3" in line, line
    assert "mlflow tiny-submit/tiny-submit-" in line, line

    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tiny-submit")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.steps"] == "3"  # the override reached the cluster
    assert line.split("mlflow tiny-submit/")[1].split()[0] == run.info.run_name


def test_ctrl_c_leaves_the_job_running_and_jobs_follow_reattaches(
    ray_cluster: RayCluster, tmp_path: Path
) -> None:
    """Ctrl-C while following: 130 and how to re-attach; the job goes on. It fails on the cluster
    (its data root does not exist there), so the re-attached `jobs --follow` exits 1. The job runs
    the cluster's installed package (`--no-ship-package`), which prints the failure."""
    from ray.job_submission import JobSubmissionClient

    missing = tmp_path / "no-such-data"
    yaml = write_experiment(tmp_path, "no-data", str(tmp_path / "work"))
    command = [sys.executable, "-m", "maxdeeplab.cli", "submit", str(yaml), f"data.root={missing}"]
    with subprocess.Popen(
        [*command, "--address", ray_cluster.address, "--no-ship-package"],
        env=ray_cluster.env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as submit:
        assert submit.stdout is not None
        first = submit.stdout.readline()
        assert first.startswith("submitted train experiments/no-data.yaml as job "), first
        job_id = first.split(" as job ")[1].split()[0]
        submit.send_signal(signal.SIGINT)
        out, err = submit.communicate(timeout=60)
    assert submit.returncode == 130, f"{out}\n{err}"
    assert f"re-attach: maxdeeplab jobs --address {ray_cluster.address} --follow {job_id}" in err
    client = JobSubmissionClient(ray_cluster.address, headers=ray_cluster.auth_headers())
    assert client.get_job_status(job_id) != "STOPPED"

    result = maxdeeplab(
        "jobs",
        "--address",
        ray_cluster.address,
        "--follow",
        job_id,
        env=ray_cluster.env,
        cwd=tmp_path,
        timeout=JOB_TIMEOUT_S,
    )
    assert result.returncode == 1, f"{result.stdout}\n{result.stderr}"
    assert f"job {job_id} FAILED: " in result.stdout
    assert str(missing) in result.stdout  # the driver's own one-line error, from the job's logs


def test_submitted_sweep_keeps_its_state_in_the_bucket_and_tracks_on_the_server(
    ray_cluster: RayCluster, mlflow_server: MlflowServer, s3_server: S3Server, tmp_path: Path
) -> None:
    """Two trials: checkpoints in the bucket, one parent and two children on the MLflow server,
    no checkpoint, sqlite file or mlruns/ on the local disk."""
    from mlflow import MlflowClient

    work = f"s3://{s3_server.bucket}/sweep-submit"
    experiment = write_experiment(tmp_path, "tiny-s3", work, tracking_uri=mlflow_server.url)
    sweep = write_sweep(
        tmp_path,
        "sweep-submit",
        experiment,
        "  model.drop_path_schedule: {grid: [linear, constant]}",
        concurrent=2,  # one trial per node
    )
    job_id, listing = submit_and_list(ray_cluster, sweep, cwd=tmp_path)
    (line,) = [line for line in listing.stdout.splitlines() if line.startswith(job_id)]
    assert " SUCCEEDED " in line and f"{mlflow_server.url}/#/experiments/" in line, line

    client = MlflowClient(tracking_uri=mlflow_server.url)
    found = client.get_experiment_by_name("sweep-submit")
    runs = client.search_runs([found.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 2
    assert all(r.info.status == "FINISHED" for r in runs)
    for child in children:
        assert {"val/pq", "val/pq_thing", "val/pq_stuff"} <= set(child.data.metrics)
        assert child.info.artifact_uri.startswith("mlflow-artifacts:")  # served, in the bucket
    pages = s3_server.client().get_paginator("list_objects_v2")
    stored = [
        item["Key"]
        for page in pages.paginate(Bucket=s3_server.bucket, Prefix="sweep-submit/")
        for item in page.get("Contents", [])
    ]
    trial_runs = {k.split("/")[2] for k in stored if k.startswith("sweep-submit/ray/")} - {""}
    assert len(trial_runs) == 2, stored
    for run in trial_runs:
        assert f"sweep-submit/ray/{run}/checkpoint_000000004/state.pt" in stored, stored
    assert any(k.startswith("sweep-submit/sweeps/sweep-submit/") for k in stored), stored
    artifacts = s3_server.client().list_objects_v2(Bucket=s3_server.bucket, Prefix="mlartifacts/")
    assert any(o["Key"].endswith("model.pt") for o in artifacts.get("Contents", []))
    local = [*tmp_path.rglob("*.pt"), *tmp_path.rglob("mlflow.db"), *tmp_path.rglob("mlruns")]
    assert local == [], local

    # The views read the same server: `dashboard --uri` prints its links and starts nothing.
    shown = maxdeeplab("dashboard", "--uri", mlflow_server.url, env=ray_cluster.env, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert f"runs of sweep-submit: {mlflow_server.url}/#/experiments/" in shown.stdout
    table = maxdeeplab("table", "--uri", mlflow_server.url, env=ray_cluster.env, cwd=tmp_path)
    assert table.returncode == 0, table.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["common", "experiments", "sweeps"])

    # `sweep --resume` from a fresh directory elsewhere reads the sweep's state from the bucket:
    # both trials are done, so it only reports them (no new run, the same parent).
    fresh = tmp_path.parent / f"{tmp_path.name}-fresh"
    shutil.copytree(tmp_path, fresh)
    resumed = maxdeeplab(
        "sweep",
        str(fresh / "sweeps" / "sweep-submit.yaml"),
        "--resume",
        "--address",
        ray_cluster.gcs_address,
        env=ray_cluster.env,
        cwd=fresh,
        timeout=JOB_TIMEOUT_S,
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "sweep sweep-submit: 2 trials" in resumed.stdout, resumed.stdout
    assert len(client.search_runs([found.experiment_id])) == 3
