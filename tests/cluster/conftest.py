"""Real cluster parts as session fixtures: each a subprocess on 127.0.0.1 at a free port.

    s3_server      `moto_server`, the S3 API server of moto[server]; one bucket; the standard
                   AWS_* variables a client (boto3, pyarrow, MLflow, Ray Train) needs to reach it
    mlflow_server  `mlflow server`: a sqlite store, artifacts served by it and kept in the bucket
    ray_cluster    a two-node Ray cluster (head + one worker node, 1 CPU each), token auth on

Each part runs in its own process group and is stopped by PID: the group gets SIGTERM, then SIGKILL,
and is waited for. Never `ray stop`: it stops every Ray instance of the machine, the test session's
own (`ray_session`) included.

A two-node cluster on one machine, on loopback only. Given `--node-ip-address 127.0.0.1`,
`ray start` substitutes the machine's routable address, and every Ray process does the same to a
127.0.0.1 GCS address (`resolve_ip_for_localhost`); Ray's servers then listen on every interface.
With RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (Ray's "this machine only" switch) every Ray process
keeps 127.0.0.1, and everything binds to it alone. The same switch makes `ray start --address`
refuse to add a node, so both nodes start through `ray_node.py`, `ray start` with that refusal
lifted. Each node has its own `--temp-dir` (short: Ray's socket paths must fit in 107 bytes) and
process group, so either can be stopped (or its raylet killed) on its own. A real cluster needs
none of this: README.md, "Run on a cluster".

The cluster's processes get the test's environment with the venv's `bin/` first on PATH (so a job's
`python` is this venv's: the cluster "has the package"), the S3 variables (so jobs can write to the
bucket) and the token variables.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from maxdeeplab.platform.training.launch import free_port

HERE = Path(__file__).resolve().parent
VENV_BIN = Path(sys.executable).parent
LOOPBACK = "127.0.0.1"
BUCKET = "maxdeeplab-test"
START_TIMEOUT_S = 120.0
# Variables of the test process that must not leak into the cluster parts or their clients.
SCRUBBED = (
    "RAY_ADDRESS",
    "RAY_AUTH_MODE",
    "RAY_AUTH_TOKEN",
    "RAY_AUTH_TOKEN_PATH",
    "RAY_API_SERVER_ADDRESS",
    "MLFLOW_TRACKING_URI",
    "AWS_ENDPOINT_URL",
    "AWS_PROFILE",
)


def base_env() -> dict[str, str]:
    """The test's environment, the venv first on PATH, without Ray, MLflow or AWS pointers."""
    env = {k: v for k, v in os.environ.items() if k not in SCRUBBED}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


# ---------------------------------------------------------------------------------------------
# Processes


@dataclass
class Service:
    """A subprocess in its own process group (session), its output in `log`."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    family: dict[int, float] = field(default_factory=dict)  # pid -> create time, for stop()

    @classmethod
    def start(cls, name: str, cmd: list[str], env: dict[str, str], log_dir: Path) -> Service:
        log = log_dir / f"{name}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(
                [str(c) for c in cmd],
                env=env,
                cwd=log_dir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return cls(name, popen, log)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def check_alive(self) -> None:
        code = self.popen.poll()
        if code is not None:
            raise RuntimeError(f"{self.name} exited with {code}; {self.log}:\n{self.tail()}")

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM to the group, SIGKILL after `grace_s`, then any recorded straggler by PID.

        Stragglers are processes this service started that left its group; a PID is killed only
        if it still belongs to the process recorded (same creation time).
        """
        for child in self.descendants():
            with contextlib.suppress(psutil.NoSuchProcess):
                self.family[child.pid] = child.create_time()
        _signal_group(self.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=grace_s)
        _signal_group(self.pid, signal.SIGKILL)
        self.popen.wait()
        deadline = time.monotonic() + 5
        for pid, created in self.family.items():
            try:
                proc = psutil.Process(pid)
                if proc.create_time() != created:
                    continue
                proc.kill()
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except (psutil.NoSuchProcess, psutil.TimeoutExpired):
                pass


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def wait_until(
    what: str, ready: Callable[[], bool], services: list[Service], timeout_s: float
) -> None:
    """Poll `ready` until it holds; fail early (with the log) when a service exits."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        for service in services:
            service.check_alive()
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {s.log}:\n{s.tail()}" for s in services)
            raise TimeoutError(f"{what} not ready after {timeout_s:.0f} s\n{logs}")
        time.sleep(0.25)


def http_get(url: str, headers: dict[str, str] | None = None, timeout: float = 2.0) -> bytes:
    request = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return bytes(response.read())


def answers(url: str, headers: dict[str, str] | None = None) -> bool:
    try:
        http_get(url, headers)
    except (urllib.error.URLError, OSError):
        return False
    return True


# ---------------------------------------------------------------------------------------------
# S3


@dataclass(frozen=True)
class S3Server:
    bucket: str
    endpoint: str  # http://127.0.0.1:PORT
    env: dict[str, str]  # AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, region
    pid: int

    def client(self):  # a boto3 S3 client with these settings, whatever the test's environment
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
            region_name=self.env["AWS_DEFAULT_REGION"],
        )


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    exe = VENV_BIN / "moto_server"
    if not exe.exists():
        pytest.fail("moto_server not installed: pip install -e '.[dev]' (moto[server])")
    port = free_port()
    endpoint = f"http://{LOOPBACK}:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",  # no instance-metadata lookups for credentials
    }
    service = Service.start(
        "moto_server",
        [exe, "-H", LOOPBACK, "-p", str(port)],
        base_env(),
        tmp_path_factory.mktemp("s3_server"),
    )
    try:
        wait_until("moto_server", lambda: answers(endpoint), [service], START_TIMEOUT_S)
        server = S3Server(BUCKET, endpoint, env, service.pid)
        server.client().create_bucket(Bucket=BUCKET)
        yield server
    finally:
        service.stop()


# ---------------------------------------------------------------------------------------------
# MLflow


@dataclass(frozen=True)
class MlflowServer:
    url: str  # http://127.0.0.1:PORT
    artifacts: str  # s3://<bucket>/mlartifacts, where the server stores artifacts
    pid: int


@pytest.fixture(scope="session")
def mlflow_server(
    s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MlflowServer]:
    folder = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    url = f"http://{LOOPBACK}:{port}"
    artifacts = f"s3://{s3_server.bucket}/mlartifacts"
    cmd = [
        VENV_BIN / "mlflow",
        "server",
        "--host",
        LOOPBACK,
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{folder / 'server.db'}",
        "--artifacts-destination",
        artifacts,
    ]
    # no job runner: it is 7 processes (huey consumers) that nothing here uses
    env = base_env() | s3_server.env | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    service = Service.start("mlflow_server", cmd, env, folder)
    try:
        wait_until("mlflow server", lambda: answers(f"{url}/health"), [service], START_TIMEOUT_S)
        yield MlflowServer(url, artifacts, service.pid)
    finally:
        service.stop()


# ---------------------------------------------------------------------------------------------
# Ray


@dataclass(frozen=True)
class RayCluster:
    address: str  # the job server (dashboard): http://127.0.0.1:PORT
    gcs_address: str  # 127.0.0.1:PORT, for `ray start --address` / `ray.init(address=...)`
    token: str
    token_path: Path  # the token's file (RAY_AUTH_TOKEN_PATH)
    env: dict[str, str]  # a client's environment: venv PATH, the token file, the S3 variables
    node_raylet_pid: int  # the second node's raylet: kill it to lose that node
    head_pid: int  # `ray start --head --block`, its process group's leader
    node_pid: int  # the second node's `ray start --block`

    def env_without_token(self, home: Path) -> dict[str, str]:
        """`env` with no token anywhere Ray looks (HOME moved away from ~/.ray/auth_token)."""
        env = {k: v for k, v in self.env.items() if k not in ("RAY_AUTH_TOKEN_PATH",)}
        env["HOME"] = str(home)
        return env

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def alive_nodes(self) -> int:
        summary = json.loads(
            http_get(f"{self.address}/nodes?view=summary", self.auth_headers(), timeout=5)
        )
        nodes = summary["data"]["summary"]
        return sum(1 for node in nodes if node["raylet"]["state"] == "ALIVE")


def _node_ports() -> list[str]:
    """Every port a node opens, chosen free here (the session's own Ray may hold the defaults)."""
    return [
        "--node-manager-port",
        str(free_port()),
        "--object-manager-port",
        str(free_port()),
        "--dashboard-agent-listen-port",
        str(free_port()),
        "--dashboard-agent-grpc-port",
        str(free_port()),
        "--runtime-env-agent-port",
        str(free_port()),
        "--metrics-export-port",
        str(free_port()),
        "--min-worker-port",  # 0 and 0: workers take ports the OS picks
        "0",
        "--max-worker-port",
        "0",
    ]


def _node_command(temp_dir: Path, *args: str) -> list[str]:
    return [
        sys.executable,
        str(HERE / "ray_node.py"),
        "start",
        "--block",
        "--num-cpus",
        "1",
        "--node-ip-address",
        LOOPBACK,
        "--temp-dir",
        str(temp_dir),
        "--object-store-memory",
        str(128 * 2**20),
        "--disable-usage-stats",
        *_node_ports(),
        *args,
    ]


@pytest.fixture(scope="session")
def ray_cluster(
    s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RayCluster]:
    folder = tmp_path_factory.mktemp("ray_cluster")
    token = secrets.token_hex(24)
    token_path = folder / "auth_token"
    token_path.write_text(token)
    temp_root = Path(tempfile.mkdtemp(prefix="mxd-ray-", dir="/tmp"))
    node_env = base_env() | s3_server.env
    node_env |= {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token_path),
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # stop at once on SIGTERM
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    gcs_port, dashboard_port = free_port(), free_port()
    address = f"http://{LOOPBACK}:{dashboard_port}"
    gcs_address = f"{LOOPBACK}:{gcs_port}"
    headers = {"Authorization": f"Bearer {token}"}
    started: list[Service] = []
    try:
        head = Service.start(
            "ray_head",
            _node_command(
                temp_root / "head",
                "--head",
                "--port",
                str(gcs_port),
                "--include-dashboard",
                "true",
                "--dashboard-host",
                LOOPBACK,
                "--dashboard-port",
                str(dashboard_port),
                "--ray-client-server-port",
                str(free_port()),
            ),
            node_env,
            folder,
        )
        started.append(head)
        wait_until(
            "Ray head", lambda: answers(f"{address}/api/version", headers), started, START_TIMEOUT_S
        )
        node = Service.start(
            "ray_node",
            _node_command(temp_root / "node", "--address", gcs_address),
            node_env,
            folder,
        )
        started.append(node)
        # A driver joining the cluster (ray.init) needs the loopback-only switch the nodes run
        # with; the token mode it turns on itself when it finds the token (ray_auth.py).
        client_env = base_env() | s3_server.env
        client_env |= {
            "RAY_AUTH_TOKEN_PATH": str(token_path),
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        }
        cluster = RayCluster(address, gcs_address, token, token_path, client_env, 0, head.pid, 0)

        def two_nodes() -> bool:
            try:
                return cluster.alive_nodes() == 2
            except (urllib.error.URLError, OSError, KeyError, ValueError):
                return False

        wait_until("the second Ray node", two_nodes, started, START_TIMEOUT_S)
        raylets = [p.pid for p in node.descendants() if p.name() == "raylet"]
        assert len(raylets) == 1, f"the second node's raylet: {raylets}"
        yield RayCluster(
            address, gcs_address, token, token_path, client_env, raylets[0], head.pid, node.pid
        )
    finally:
        for service in reversed(started):
            service.stop()
        shutil.rmtree(temp_root, ignore_errors=True)
