"""`maxdeeplab dashboard [--port P] [--uri URI] [--work-dir DIR]`: the MLflow UI on 127.0.0.1.

The store is the one training runs write to by default (`tracking.tracking_uri`: `--uri`, else
`MLFLOW_TRACKING_URI`, else `<work-dir>/mlflow.db`). Ctrl-C stops the UI and its workers.
"""

from __future__ import annotations

import argparse
import signal

UI_LOG = "mlflow_ui.log"  # in the work dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from maxdeeplab.dashboards.mlflow_ui import DEFAULT_PORT

    parser.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help=f"loopback port (0: any free port; default {DEFAULT_PORT})",
    )
    add_store_arguments(parser)


def add_store_arguments(parser: argparse.ArgumentParser) -> None:
    """`--uri` and `--work-dir`: which MLflow store to read (the runs' default unless given)."""
    from maxdeeplab.platform.config import ExperimentConfig

    parser.add_argument(
        "--uri",
        default="",
        help="tracking store URI (default: MLFLOW_TRACKING_URI, else the work dir's)",
    )
    parser.add_argument(
        "--work-dir",
        default=ExperimentConfig.work_dir,
        help=f"the runs' work dir, holding mlflow.db (default: {ExperimentConfig.work_dir})",
    )


def run(args: argparse.Namespace) -> int:
    from maxdeeplab.dashboards.mlflow_ui import free_port, start_ui, stop_ui, wait_until_ready
    from maxdeeplab.platform.config import ExperimentConfig, TrackingConfig, work_dir
    from maxdeeplab.platform.tracking import artifact_root, check_server, tracking_uri

    cfg = ExperimentConfig(work_dir=args.work_dir, tracking=TrackingConfig(uri=args.uri))
    uri = tracking_uri(cfg)
    if uri.startswith(("http://", "https://")):
        # A tracking server already serves its own UI: nothing to start.
        check_server(uri)
        print(f"runs are tracked on a server: {uri}", flush=True)
        for name, link in runs_links(uri, uri.rstrip("/")):
            print(f"  runs of {name}: {link}", flush=True)
        return 0
    if uri.startswith("sqlite:"):
        database = uri.split(":///", 1)[-1]
        note = "" if _exists(database) else " (no runs there yet: it will be created)"
        print(f"tracking store: {uri}{note}", flush=True)
    port = args.port or free_port()
    default_root = artifact_root(cfg) if uri.startswith("sqlite:") else None
    # The UI logs every request: that goes to a file, not over our messages.
    log_path = work_dir(cfg).local_path() / UI_LOG  # a sqlite store: the work dir is local
    log_path.parent.mkdir(parents=True, exist_ok=True)
    process = start_ui(uri, port, artifact_root=default_root, log_path=log_path)
    # `kill PID` stops it as cleanly as Ctrl-C does (the UI is in its own process group).
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        print(f"starting the MLflow UI (its log: {log_path})...", flush=True)
        url = wait_until_ready(process, port, log_path=log_path)
        print(f"MLflow UI: {url}  (Ctrl-C to stop)", flush=True)
        for name, link in runs_links(uri, url):
            print(f"  runs of {name}: {link}", flush=True)
        code = process.wait()
        print(f"the MLflow UI exited with status {code}", flush=True)
        return 1 if code else 0
    except KeyboardInterrupt:
        print("stopping the MLflow UI", flush=True)
        return 0
    finally:
        stop_ui(process)
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def runs_links(uri: str, url: str, limit: int = 10) -> list[tuple[str, str]]:
    """(experiment name, URL of its runs table) for the store's most recent experiments.

    MLflow 3's UI opens an experiment on its GenAI overview; `workflowType=machine_learning`
    selects the classic runs table, where `val/pq` and the other metrics are columns.
    """
    from mlflow import MlflowClient

    experiments = MlflowClient(tracking_uri=uri).search_experiments(
        max_results=limit, order_by=["last_update_time DESC"]
    )
    return [
        (e.name, f"{url}/#/experiments/{e.experiment_id}/runs?workflowType=machine_learning")
        for e in experiments
        if e.name != "Default"
    ]


def _exists(path: str) -> bool:
    from pathlib import Path

    return Path(path).is_file()
