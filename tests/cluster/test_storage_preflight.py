"""Object storage through the real S3 API server, and the pre-flight checks of `train`/`sweep`.

Each pre-flight failure must be one line naming the URI and the cause, exit 2, with nothing
written: neither a run in the bucket nor anything on the local disk. They all fail before Ray
starts, so they run in this process.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from maxdeeplab.cli.main import main
from maxdeeplab.platform import storage
from maxdeeplab.platform.storage import Location, StorageError
from maxdeeplab.platform.training.launch import free_port

if TYPE_CHECKING:  # the fixtures' types (conftest.py is not imported by name)
    from conftest import MlflowServer, S3Server

pytestmark = [pytest.mark.cluster]


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Server]:
    """This process talks to the S3 server (pyarrow's filesystem is cached per process)."""
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    storage._remote_filesystem.cache_clear()
    yield s3_server
    storage._remote_filesystem.cache_clear()


def keys(server: S3Server, prefix: str) -> list[str]:
    answer = server.client().list_objects_v2(Bucket=server.bucket, Prefix=prefix)
    return [item["Key"] for item in answer.get("Contents", [])]


def test_bucket_locations_round_trip(s3_env: S3Server) -> None:
    root = Location.parse(f"s3://{s3_env.bucket}/storage-test/")
    assert not (root / "a.txt").exists()
    (root / "a.txt").write_text("hello")
    (root / "sub" / "b.bin").write_bytes(b"\x00\x01")
    assert (root / "a.txt").read_text() == "hello" and (root / "a.txt").is_file()
    assert sorted(p.uri for p in root.list_files()) == [
        f"s3://{s3_env.bucket}/storage-test/a.txt",
        f"s3://{s3_env.bucket}/storage-test/sub/b.bin",
    ]
    root.remove_tree()
    assert keys(s3_env, "storage-test/") == []


def experiment(tmp_path: Path) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(
        "model: {variant: max_deeplab_tiny}\n"
        "data: {crop_size: 65, synthetic_train: 2, synthetic_val: 1, synthetic_size: [33, 33]}\n"
        "train: {steps: 2, batch_size: 1}\n"
        "resources: {num_workers: 1}\n"
    )
    return path


def closed_port_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


def run_train(tmp_path: Path, env: dict[str, str], *args: str) -> str:
    """`maxdeeplab train` in a fresh process with exactly `env`, failing pre-flight: its error."""
    done = subprocess.run(
        [sys.executable, "-m", "maxdeeplab.cli", "train", "exp.yaml", "--name", "preflight", *args],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    err = done.stderr.strip()
    assert done.returncode == 2, done.stdout + err
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("no bucket", "s3://no-such-bucket/runs: bucket 'no-such-bucket' does not exist"),
        ("no endpoint", "s3://{bucket}/runs: storage unreachable or refused: .*Could not connect"),
        ("no credentials", "s3://{bucket}/runs: no AWS credentials found"),
        ("no tracking server", "tracking server http://127.0.0.1:\\d+: unreachable"),
        ("no Ray cluster", "Ray cluster at 127.0.0.1:\\d+: unreachable"),
        ("no tracking uri", "work_dir s3://{bucket}/runs is object storage.*set tracking.uri"),
    ],
)
def test_preflight_failures_are_one_line_and_write_nothing(
    case: str, expected: str, s3_server: S3Server, mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    experiment(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "RAY_"))}
    env |= s3_server.env | {"HOME": str(tmp_path)}  # HOME: no ~/.aws or ~/.ray of the machine
    work = f"s3://{s3_server.bucket}/runs"
    args = [f"work_dir={work}", f"tracking.uri={mlflow_server.url}"]
    if case == "no bucket":
        args[0] = "work_dir=s3://no-such-bucket/runs"
    elif case == "no endpoint":
        env["AWS_ENDPOINT_URL"] = closed_port_url()
    elif case == "no credentials":
        del env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]
    elif case == "no tracking server":
        args[1] = f"tracking.uri={closed_port_url()}"
    elif case == "no Ray cluster":
        args += ["--address", closed_port_url().removeprefix("http://")]
    elif case == "no tracking uri":
        args = args[:1]
    error = run_train(tmp_path, env, *args)
    assert re.search(expected.format(bucket=s3_server.bucket), error), error
    assert keys(s3_server, "runs/") == []  # nothing in the bucket (the probe is gone too)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp.yaml"]  # nothing on the disk


def test_a_bad_scheme_is_a_config_error(tmp_path: Path, capsys) -> None:
    code = main(["config", "show", str(experiment(tmp_path)), "work_dir=ftp://host/x"])
    err = capsys.readouterr().err
    assert code == 2 and "bad value 'ftp://host/x' for 'work_dir'" in err, err
    with pytest.raises(StorageError):
        Location.parse("ftp://host/x")


def test_bench_checkpoint_reports_bucket_vs_local(s3_server: S3Server, tmp_path: Path) -> None:
    import json

    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | s3_server.env
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "maxdeeplab.cli",
            "bench",
            "checkpoint",
            "--to",
            f"s3://{s3_server.bucket}/bench",
            "--variant",
            "max_deeplab_tiny",
            "--crop",
            "65",
            "--repeats",
            "1",
            "--work-dir",
            str(tmp_path / "cache"),
            "--json",
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(out.read_text())
    assert result["checkpoint_mib"] > 1 and result["upload_bucket_s"] > 0
    assert result["upload_ratio_bucket_to_local"] == pytest.approx(
        result["upload_bucket_s"] / result["upload_local_s"]
    )
    assert result["checkpoint_interval"] == 1000  # the model-zoo configs'
    assert "ratio (bucket / local upload)" in done.stdout.splitlines()[-1]
    assert keys(s3_server, "bench/") == []  # the uploads are cleaned up
