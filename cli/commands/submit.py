"""`maxdeeplab submit EXP_OR_SWEEP.yaml [key=value ...] [--address URL] [--no-wait]`.

Runs `maxdeeplab train` (an experiment YAML) or `maxdeeplab sweep` (a sweep YAML: one with a
`search:` key, told apart as `maxdeeplab config check` does) as a Ray job on a running cluster,
through the cluster's job server (the head's dashboard, `http://HEAD:8265` by default) with
`ray.job_submission.JobSubmissionClient`. The YAML and the overrides are validated here first, as
`config check` validates them, so a bad key or value fails with its one-line error before anything
reaches the cluster.

What the job gets (its `runtime_env`):

- `working_dir`: a temporary folder holding the YAML and every file of its `base:` chain (for a
  sweep, its base experiment and that file's own bases), at their layout below their common
  folder, so that every `base:` path resolves on the cluster as it does here. The entrypoint is
  `python -m maxdeeplab.cli train FILE key=value ... --name RUN` or `... sweep FILE`, run by the
  cluster's `python`, which must have the project's dependencies (torch, Ray, MLflow, ...).
- `py_modules`: a copy of this `maxdeeplab` package, unless `--no-ship-package`. Detecting whether
  the cluster has the package would take a probe job (its start-up on every submit), and a cluster
  that has *a* version need not have this one; the copy (under 1 MB) makes the job run the code
  that validated the YAML, as Ray puts it on `sys.path` ahead of any installed copy. The copy is
  materialised (links followed, `__pycache__` left out): `maxdeeplab/` is a folder of links to the
  top-level folders, and Ray's own packaging of a link tree would depend on how it treats links and
  which `.gitignore` files it finds. `--no-ship-package` runs the cluster's installed package (an
  image built from this repository, say).

Paths in the config (`work_dir`, `data.root`, a sqlite `tracking.uri`) are read on the cluster: a
relative `work_dir` would land in the job's temporary working directory, hence the warning.

Tracking: the run name is chosen here (`tracking.run_name`, else `<name>-<UTC time>`; a sweep's
parent run is named after the sweep) and stored, with the MLflow experiment and `tracking.uri`, in
the job's metadata, which `maxdeeplab jobs` shows. When `tracking.uri` is an http(s) server, the
experiment is looked up (or created) there and its URL printed.

Token authentication (Ray's `RAY_AUTH_MODE=token` clusters): the token is read where Ray reads it,
in Ray's order: `RAY_AUTH_TOKEN`, else the file named by `RAY_AUTH_TOKEN_PATH`, else
`~/.ray/auth_token`, and sent as `Authorization: Bearer <token>`. Ray's own client sends it only
when `RAY_AUTH_MODE=token` is also set on the client; this command sends it whenever it finds one.
A cluster that refuses the request (no token, or a wrong one) gives one line naming the variables.

Exit status, after following the job's logs until it ends: 0 SUCCEEDED, 1 FAILED, 130 STOPPED.
Ctrl-C while following also exits 130 but leaves the job running, and prints how to re-attach
(`maxdeeplab jobs --follow ID`) or stop it (`maxdeeplab jobs --stop ID`). With `--no-wait`: 0 once
the job is submitted. 2: the YAML is invalid, or the cluster cannot be reached or refuses the
token; nothing was submitted.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

# The job's metadata keys (`maxdeeplab jobs` reads them back).
META_KIND = "maxdeeplab_kind"  # train | sweep
META_FILE = "maxdeeplab_file"  # the YAML, relative to the job's working directory
META_EXPERIMENT = "maxdeeplab_experiment"  # the MLflow experiment
META_EXPERIMENT_ID = "maxdeeplab_experiment_id"  # only when looked up on an http(s) server
META_RUN = "maxdeeplab_run"  # the MLflow run name (a sweep: its parent run)
META_TRACKING_URI = "maxdeeplab_tracking_uri"  # empty: the cluster's default store

ENTRYPOINT = ("python", "-m", "maxdeeplab.cli")
EXIT_STATUS = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 130}
TERMINAL = frozenset(EXIT_STATUS)
CONNECT_TIMEOUT_S = 5.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "file", metavar="EXP_OR_SWEEP.yaml", help="an experiment, or a sweep (a YAML with search:)"
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="experiment overrides (not for sweeps)"
    )
    add_address_argument(parser)
    parser.add_argument(
        "--no-wait", action="store_true", help="print the job id and return once submitted"
    )
    parser.add_argument(
        "--no-ship-package",
        action="store_true",
        help="run the cluster's installed maxdeeplab instead of shipping this copy",
    )


def add_address_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address",
        default=os.environ.get("RAY_ADDRESS", ""),
        metavar="URL",
        help="the cluster's job server, http://HEAD:8265 (default: RAY_ADDRESS)",
    )


def run(args: argparse.Namespace) -> int:
    import tempfile

    plan = make_plan(Path(args.file), args.overrides)  # validated before any connection
    url = dashboard_url(args.address)
    with cluster_errors(url):
        client = connect(url)
        for warning in plan.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        plan.metadata.update(mlflow_experiment(plan))
        with tempfile.TemporaryDirectory(prefix="maxdeeplab-submit-") as tmp:
            runtime_env = stage(plan, Path(tmp), ship_package=not args.no_ship_package)
            job_id = client.submit_job(
                entrypoint=plan.entrypoint, runtime_env=runtime_env, metadata=plan.metadata
            )
        try:
            print(f"submitted {plan.kind} {plan.relative} as job {job_id} to {url}", flush=True)
            link = mlflow_link(plan.metadata)
            if link:
                print(f"MLflow: {link}", flush=True)
            if args.no_wait:
                print(f"follow it: maxdeeplab jobs --address {url} --follow {job_id}")
                return 0
            return follow(client, url, job_id)
        except KeyboardInterrupt:
            return detached(url, job_id)


# ---------------------------------------------------------------------------------------------
# What to submit


@dataclass
class Plan:
    """One validated submission: the files to ship, the command and the job's metadata."""

    kind: str  # train | sweep
    files: list[Path]  # absolute: the YAML first, then every file of its base: chain
    root: Path  # their common folder, the job's working directory
    relative: str  # the YAML, relative to root
    entrypoint: str
    metadata: dict[str, str]
    tracking_cfg: Any  # the ExperimentConfig whose tracking section names the MLflow experiment
    warnings: list[str] = field(default_factory=list)


def make_plan(path: Path, overrides: list[str]) -> Plan:
    """Validate an experiment or sweep YAML (as `config check` does) and plan its job.

    Raises:
        ConfigError: the YAML or an override is invalid (one line naming file, key and value).
    """
    import shlex

    from maxdeeplab.platform.config import load_experiment, read_yaml, yaml_chain
    from maxdeeplab.platform.errors import ConfigError
    from maxdeeplab.platform.training.launch import default_run_name

    if "search" in read_yaml(path):
        from maxdeeplab.platform.sweep_config import load_sweep

        if overrides:
            raise ConfigError(
                f"{path}: a sweep takes no key=value overrides (put them under its `overrides:`)"
            )
        sweep = load_sweep(path)
        kind, cfg = "sweep", sweep.trial_config({})
        cfg.tracking.experiment = sweep.name  # as the sweep itself tracks it
        files = [sweep.path, *(p for p, _ in yaml_chain(sweep.base))]
        run_name = sweep.name
        args: list[str] = []
    else:
        cfg = load_experiment(path, overrides)
        kind = "train"
        files = [p for p, _ in reversed(yaml_chain(path))]  # the YAML first, then its bases
        run_name = default_run_name(cfg)
        args = [*overrides, "--name", run_name]
    root = Path(os.path.commonpath([p.parent for p in files]))
    relative = files[0].relative_to(root).as_posix()
    warnings = []
    if "://" not in cfg.work_dir and not Path(cfg.work_dir).expanduser().is_absolute():
        warnings.append(
            f"work_dir {cfg.work_dir!r} is relative: on the cluster it is inside the job's "
            "temporary working directory; give an absolute path or a bucket (s3://...)"
        )
    metadata = {
        META_KIND: kind,
        META_FILE: relative,
        META_EXPERIMENT: cfg.tracking.experiment,
        META_RUN: run_name,
        META_TRACKING_URI: cfg.tracking.uri,
    }
    entrypoint = shlex.join([*ENTRYPOINT, kind, relative, *args])
    return Plan(kind, files, root, relative, entrypoint, metadata, cfg, warnings)


def stage(plan: Plan, tmp: Path, *, ship_package: bool) -> dict[str, Any]:
    """Write the job's files under `tmp` and return its `runtime_env`."""
    import shutil

    working_dir = tmp / "working_dir"
    for source in plan.files:
        target = working_dir / source.relative_to(plan.root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    runtime_env: dict[str, Any] = {"working_dir": str(working_dir)}
    if ship_package:
        runtime_env["py_modules"] = [str(copy_package(tmp / "py_modules"))]
    return runtime_env


def copy_package(dest: Path) -> Path:
    """A plain copy of the installed `maxdeeplab` package (links followed) under `dest`."""
    import shutil

    import maxdeeplab

    source = Path(maxdeeplab.__file__).parent
    target = dest / "maxdeeplab"
    shutil.copytree(
        source, target, symlinks=False, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )
    return target


# ---------------------------------------------------------------------------------------------
# MLflow


def mlflow_experiment(plan: Plan) -> dict[str, str]:
    """{META_EXPERIMENT_ID: id} when `tracking.uri` is an http(s) server that answers, else {}.

    The server may be reachable from the cluster and not from here: then a warning, and the job
    still goes ahead.
    """
    uri = plan.metadata[META_TRACKING_URI]
    if not uri.startswith(("http://", "https://")):
        return {}
    # fail fast instead of MLflow's minutes of retries
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    from maxdeeplab.platform import tracking

    try:
        return {META_EXPERIMENT_ID: tracking.experiment_id(plan.tracking_cfg, uri)}
    except Exception as exc:  # any MLflow or network failure: the job may still reach it
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        print(f"warning: MLflow server {uri} did not answer from here ({first})", file=sys.stderr)
        return {}


def mlflow_link(metadata: dict[str, str]) -> str:
    """The MLflow UI's URL of the job's experiment, or '' (no http(s) server or no id)."""
    uri = metadata.get(META_TRACKING_URI, "")
    experiment_id = metadata.get(META_EXPERIMENT_ID, "")
    if not (uri.startswith(("http://", "https://")) and experiment_id):
        return ""
    return f"{uri.rstrip('/')}/#/experiments/{experiment_id}"


# ---------------------------------------------------------------------------------------------
# The cluster


def dashboard_url(address: str) -> str:
    """`http://HOST:PORT` of the cluster's job server from `--address` (or RAY_ADDRESS).

    Raises:
        ClusterError: no address given.
    """
    from maxdeeplab.platform.errors import ClusterError

    address = address.strip().rstrip("/")
    if not address:
        raise ClusterError(
            "no Ray cluster given: pass --address http://HEAD:8265 or set RAY_ADDRESS"
        )
    return address if "://" in address else f"http://{address}"


def check_reachable(url: str) -> None:
    """Raises ClusterError unless something accepts TCP connections at the URL's host and port."""
    import socket
    from urllib.parse import urlsplit

    from maxdeeplab.platform.errors import ClusterError

    parts = urlsplit(url)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ClusterError(f"bad Ray cluster address {url!r}: expected http://HOST:PORT") from None
    if not parts.hostname:
        raise ClusterError(f"bad Ray cluster address {url!r}: expected http://HOST:PORT")
    try:
        with socket.create_connection((parts.hostname, port), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        cause = exc.strerror or str(exc) or type(exc).__name__
        raise ClusterError(f"cannot reach the Ray cluster at {url}: {cause}") from None


def connect(url: str) -> JobSubmissionClient:
    """A job client for `url`, sending the auth token when one is found (see the module doc).

    Call inside `cluster_errors(url)`, which turns Ray's refusals into one line.
    """
    from ray.job_submission import JobSubmissionClient

    from maxdeeplab.platform.ray_auth import auth_token

    check_reachable(url)
    token, _ = auth_token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    return JobSubmissionClient(url, headers=headers)


@contextmanager
def cluster_errors(url: str) -> Iterator[None]:
    """Ray's authentication and connection failures as one-line `ClusterError`s."""
    import requests
    from ray.exceptions import AuthenticationError

    from maxdeeplab.platform.errors import ClusterError
    from maxdeeplab.platform.ray_auth import DEFAULT_TOKEN_FILE, auth_token

    try:
        yield
    except AuthenticationError as exc:
        _, source = auth_token()
        if source and "Forbidden" in exc.message:
            detail = f"the token from {source} was refused"
        elif source:
            detail = f"the token from {source} was not accepted"
        else:
            detail = f"none found in RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or {DEFAULT_TOKEN_FILE}"
        raise ClusterError(
            f"the Ray cluster at {url} requires an auth token: set RAY_AUTH_TOKEN or "
            f"RAY_AUTH_TOKEN_PATH ({detail})"
        ) from None
    except (ConnectionError, requests.exceptions.RequestException) as exc:
        cause = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ClusterError(f"cannot reach the Ray cluster at {url}: {cause}") from None


# ---------------------------------------------------------------------------------------------
# Following a job


def follow(client: JobSubmissionClient, url: str, job_id: str) -> int:
    """Print the job's logs until it ends; the exit status (module doc). Ctrl-C: 130."""
    import asyncio

    printed = [0]  # characters of the log printed so far
    try:
        try:
            asyncio.run(_tail(client, job_id, printed))
        except Exception:  # the log stream broke (a proxy, a restart): poll instead
            _poll_logs(client, job_id, printed)
        status = _wait_for_end(client, job_id)
    except KeyboardInterrupt:
        return detached(url, job_id)
    info = client.get_job_info(job_id)
    first = (info.message or "").strip().splitlines()
    message = f": {first[0]}" if status != "SUCCEEDED" and first else ""
    print(f"job {job_id} {status}{message}")
    return EXIT_STATUS[status]


def detached(url: str, job_id: str) -> int:
    """After Ctrl-C: how to re-attach or stop the job, which keeps running; 130."""
    print(
        f"\nstopped following job {job_id}; it keeps running.\n"
        f"  re-attach: maxdeeplab jobs --address {url} --follow {job_id}\n"
        f"  stop it:   maxdeeplab jobs --address {url} --stop {job_id}",
        file=sys.stderr,
    )
    return 130


async def _tail(client: JobSubmissionClient, job_id: str, printed: list[int]) -> None:
    async for chunk in client.tail_job_logs(job_id):
        print(chunk, end="", flush=True)
        printed[0] += len(chunk)


def _poll_logs(client: JobSubmissionClient, job_id: str, printed: list[int]) -> None:
    import time

    while True:
        status = str(client.get_job_status(job_id))
        logs = client.get_job_logs(job_id)
        print(logs[printed[0] :], end="", flush=True)
        printed[0] = len(logs)
        if status in TERMINAL:
            return
        time.sleep(2)


def _wait_for_end(client: JobSubmissionClient, job_id: str) -> str:
    import time

    while (status := str(client.get_job_status(job_id))) not in TERMINAL:
        time.sleep(1)
    return status
