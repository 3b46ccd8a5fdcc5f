"""Drivers as a user runs them (subprocesses, each with its own local Ray): two `train` commands
started together both start, each local Ray listens on 127.0.0.1 only, and Ctrl-C leaves a KILLED
run, a resume command and exit code 130.
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
from maxdeeplab.platform.config import load_experiment

pytestmark = [pytest.mark.ray, pytest.mark.slow]

EXPERIMENT = """\
name: tiny
work_dir: {work}
model: {{variant: max_deeplab_tiny}}
data: {{crop_size: 65, synthetic_train: 4, synthetic_val: 2, synthetic_size: [97, 97],
        num_workers: 0}}
train: {{steps: {steps}, batch_size: 2, log_interval: 1, checkpoint_interval: 1000}}
optim: {{warmup_steps: 0}}
eval: {{interval: 1000, batch_size: 2, max_images: 2, num_visualizations: 0}}
resources: {{num_workers: 1}}
"""


def start_train(tmp_path: Path, name: str, steps: int) -> tuple[subprocess.Popen, Path, Path]:
    work = tmp_path / name
    work.mkdir()
    yaml = work / "exp.yaml"
    yaml.write_text(EXPERIMENT.format(work=work, steps=steps))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log = work / "console.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "maxdeeplab.cli", "train", str(yaml), "--name", name],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group, as a terminal's foreground job
        env=env,
    )
    return process, yaml, log


def wait_for(log: Path, text: str, process: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if text in log.read_text():
            return
        if process.poll() is not None:
            break
        time.sleep(1)
    raise AssertionError(
        f"{text!r} never appeared (rc {process.poll()}):\n{log.read_text()[-3000:]}"
    )


LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def listening_addresses(pid: int) -> set[str]:
    """The addresses that a driver and Ray's processes under it (GCS, raylet, dashboard, agents,
    workers) listen on. A Ray Train worker also holds torch.distributed's TCPStore, which torch
    binds to every interface whatever host it is given; that one is torch's, not Ray's."""
    import psutil

    root = psutil.Process(pid)
    addresses = set()
    for process in [root, *root.children(recursive=True)]:
        try:
            if process.name().startswith("ray::RayTrainWo"):
                continue
            connections = process.net_connections(kind="inet")
        except psutil.Error:
            continue
        addresses |= {c.laddr.ip for c in connections if c.status == psutil.CONN_LISTEN}
    assert addresses, "found no listening socket of the driver's Ray"
    return addresses


def test_concurrent_starts_both_run_and_ctrl_c_marks_the_run_killed(tmp_path: Path) -> None:
    long_run, long_yaml, long_log = start_train(tmp_path, "long", steps=10_000)
    short_run, _, short_log = start_train(tmp_path, "short", steps=2)
    try:
        assert short_run.wait(timeout=420) == 0, short_log.read_text()[-3000:]
        wait_for(long_log, "step 2/10000", long_run, timeout_s=300)
        assert listening_addresses(long_run.pid) <= LOOPBACK  # the local Ray: this machine only
        os.killpg(long_run.pid, signal.SIGINT)  # what Ctrl-C in the terminal sends
        assert long_run.wait(timeout=120) == 130, long_log.read_text()[-3000:]
    finally:
        for process in (long_run, short_run):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    last = long_log.read_text().strip().splitlines()[-1]
    assert "interrupted (SIGINT): run long stopped and marked KILLED in MLflow" in last, last
    assert f"maxdeeplab train --resume long --work-dir {tmp_path / 'long'}" in last
    (run,) = tracking.find_runs(load_experiment(str(long_yaml), []), "long")
    assert run.info.status == "KILLED"
    assert not (tmp_path / "long" / "ray" / "long" / "driver.lock").exists()
