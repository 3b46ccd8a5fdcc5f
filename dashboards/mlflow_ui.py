"""The MLflow UI over the project's tracking store, bound to the loopback interface.

See docs/architecture.md#command-line.

`mlflow ui` runs as a child process in its own process group: it starts web-server workers of its
own, and a group lets one signal stop all of them (and keeps the terminal's Ctrl-C for us, so we
stop the UI in order rather than racing it). It listens on 127.0.0.1 only: the store holds
file paths and configs that should not be served to the network.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from maxdeeplab.platform.errors import MaXDeepLabError

LOOPBACK = "127.0.0.1"
DEFAULT_PORT = 5000  # MLflow's own default
# One web worker and no background job runner (it serves GenAI judges, not training runs): on a
# small machine the UI then starts faster and stops at once. The user's environment still wins.
UI_ENVIRONMENT = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
UI_WORKERS = 1
# measured ~12 s on a 2-core machine (docs/architecture.md#other-observations); slower under load
STARTUP_TIMEOUT_S = 120.0


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that is free on `host` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int, host: str = LOOPBACK) -> bool:
    """Whether nothing listens on `host:port` (connections closing in TIME_WAIT do not count,
    as for the web server, which binds with SO_REUSEADDR too)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def ui_url(port: int, host: str = LOOPBACK) -> str:
    return f"http://{host}:{port}"


def ui_command(uri: str, port: int, *, artifact_root: str | None = None) -> list[str]:
    """The `mlflow ui` command line for a store.

    Args:
        uri: the backend store (`sqlite:////abs/mlflow.db`, a database URL).
        port: the loopback port to listen on.
        artifact_root: where experiments created from the UI keep artifacts (the project's runs
            create their experiments with an explicit location, so this only keeps UI-made ones
            beside them instead of under the current directory).
    """
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri]
    command += ["--host", LOOPBACK, "--port", str(port), "--workers", str(UI_WORKERS)]
    if artifact_root:
        command += ["--default-artifact-root", artifact_root]
    return command


def start_ui(
    uri: str, port: int, *, artifact_root: str | None = None, log_path: str | Path | None = None
) -> subprocess.Popen[bytes]:
    """Start the MLflow UI in a new process group; returns at once (see `wait_until_ready`).

    Args:
        uri: the backend store URI.
        port: the loopback port; must be free.
        artifact_root: see `ui_command`.
        log_path: a file for the UI's output; None lets it write to this terminal.

    Raises:
        MaXDeepLabError: the port is already taken.
    """
    if not port_is_free(port):
        raise MaXDeepLabError(
            f"port {port} on {LOOPBACK} is in use; pass another with --port (or --port 0 for any)"
        )
    output = open(log_path, "ab") if log_path is not None else None  # noqa: SIM115 (child owns it)
    try:
        return subprocess.Popen(
            ui_command(uri, port, artifact_root=artifact_root),
            stdout=output,
            stderr=subprocess.STDOUT if output is not None else None,
            stdin=subprocess.DEVNULL,
            env={**UI_ENVIRONMENT, **os.environ},
            start_new_session=True,
        )
    finally:
        if output is not None:
            output.close()  # the child holds its own descriptor


def wait_until_ready(
    process: subprocess.Popen[bytes],
    port: int,
    timeout_s: float = STARTUP_TIMEOUT_S,
    *,
    log_path: str | Path | None = None,
) -> str:
    """Poll the UI's `/health` endpoint until it answers; returns the UI's URL.

    Args:
        process: the UI (`start_ui`).
        port: its port.
        timeout_s: how long to wait.
        log_path: the UI's log file, whose last line is quoted if it fails.

    Raises:
        MaXDeepLabError: the UI exited, or did not answer within `timeout_s` (it is then stopped).
    """
    url = ui_url(port)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        code = process.poll()
        if code is not None:
            raise MaXDeepLabError(
                f"the MLflow UI exited with status {code} before serving {url}"
                + _last_line(log_path)
            )
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return url
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    stop_ui(process)
    raise MaXDeepLabError(
        f"the MLflow UI did not answer on {url} within {timeout_s:.0f} s" + _last_line(log_path)
    )


def _last_line(log_path: str | Path | None) -> str:
    if log_path is None or not Path(log_path).is_file():
        return ""
    lines = [line for line in Path(log_path).read_text(errors="replace").splitlines() if line]
    return f" ({log_path}: {lines[-1].strip()})" if lines else ""


def stop_ui(process: subprocess.Popen[bytes], timeout_s: float = 10.0) -> int | None:
    """Stop the UI and every process of its group: SIGTERM, then SIGKILL after `timeout_s`.

    Returns:
        The UI's exit status (None if it could not be reaped).
    """
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:  # the whole group is already gone
            break
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            continue
        # The leader is gone; its workers may still be draining: give the group the same time.
        if _group_exited(process.pid, timeout_s):
            break
    return process.poll()


def _group_exited(pgid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False
