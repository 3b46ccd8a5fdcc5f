"""Checks made before any training starts: storage, tracking server and Ray cluster answer.

Each failure is one line naming the URI and the cause; nothing is written before they pass (the
storage check writes and deletes one empty probe object, which is how a bucket proves writable).
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlsplit

from maxdeeplab.platform import tracking
from maxdeeplab.platform.config import ExperimentConfig, work_dir
from maxdeeplab.platform.errors import ClusterError
from maxdeeplab.platform.storage import check_writable

CONNECT_TIMEOUT_S = 5.0


def check_run_prerequisites(cfg: ExperimentConfig, address: str | None = None) -> None:
    """Storage writable, tracking server up, Ray cluster reachable (each only where it applies).

    Raises:
        StorageError, TrackingError, ClusterError: one line naming the URI and the cause.
        ConfigError: object storage without a tracking server (MLflow needs somewhere to live).
    """
    check_writable(work_dir(cfg))
    tracking.check_server(tracking.tracking_uri(cfg))
    check_ray_address(address or cfg.resources.address or os.environ.get("RAY_ADDRESS", ""))


def check_ray_address(address: str) -> None:
    """A `host:port` (GCS), `ray://host:port` or `http://host:port` address accepts connections.

    `auto`, `local` and the empty address (a local instance) need no check.
    """
    if address in ("", "auto", "local"):
        return
    parts = urlsplit(address if "://" in address else f"gcs://{address}")
    if not parts.hostname or not parts.port:
        raise ClusterError(f"Ray address {address!r}: expected HOST:PORT")
    try:
        with socket.create_connection((parts.hostname, parts.port), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        cause = exc.strerror or type(exc).__name__
        raise ClusterError(f"Ray cluster at {address}: unreachable ({cause})") from None
