"""MLflow tracking: every MLflow call of the project lives here (docs/architecture.md#tracking).

One MLflow run per training run. The driver creates it (`create_run`: params = every flattened
config key, `config.yaml`) before Ray starts the workers, and hands its id to them; world rank 0
alone logs metrics and artifacts into it (`RunLogger`). Creating the run in the driver keeps it
unique when Ray restarts the worker group (even before the first checkpoint) and lets a sweep make
it a child of its parent run. A resumed run reopens the same id, stored in the run directory.

The store defaults to `sqlite:////<work_dir>/mlflow.db` with artifacts under
`<work_dir>/mlartifacts` (MLflow 3 refuses new `file:` stores, and a sqlite store without an
explicit artifact location puts artifacts under the current directory).

Metric names are the constants below; dashboards and sweeps read them from here.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from maxdeeplab.platform import provenance
from maxdeeplab.platform.config import ExperimentConfig, to_params, to_yaml, work_dir
from maxdeeplab.platform.errors import MaXDeepLabError

log = logging.getLogger(__name__)


class TrackingError(MaXDeepLabError):
    """The tracking store cannot be used (an unreachable server, no store for remote storage)."""


# --- metric names (slash-namespaced, defined once) -------------------------------------------
# Each loss term `k` of `maxdeeplab.models.losses.criterion.LOSS_KEYS` is logged as `loss/k`.
LOSS_TOTAL = "loss/total"
TRAIN_LR = "train/lr"
TRAIN_IMAGES_PER_S = "train/images_per_s"
TRAIN_BAD_STEPS = "train/bad_steps"  # non-finite losses skipped so far
VAL_PQ = "val/pq"
VAL_PQ_THING = "val/pq_thing"
VAL_PQ_STUFF = "val/pq_stuff"
VAL_SQ = "val/sq"
VAL_RQ = "val/rq"
# deeplab2's online PQ: crowd counted as void (docs/deeplab2.md#pipeline-pq)
VAL_PQ_PIPELINE = "val/pq_pipeline"
VAL_PQ_CLASS_PREFIX = "val/pq_class/"
VAL_METRICS = (VAL_PQ, VAL_PQ_THING, VAL_PQ_STUFF, VAL_SQ, VAL_RQ, VAL_PQ_PIPELINE)

_OURS = ("loss/", "train/", "val/")  # what the training loop logs (system/* is MLflow's)
MLFLOW_RUN_ID_FILE = "mlflow_run_id"  # in the run directory, for `train --resume`
# --- tags of a sweep's trials (child runs) ---------------------------------------------------
RUN_NAME_TAG = "mlflow.runName"  # MLflow's own: the run's name, shown in its UI
TRIAL_TAG = "maxdeeplab.trial"  # the trial's name (`sweep_config.trial_name`), for plot legends
TRIAL_ID_TAG = "maxdeeplab.trial_id"  # Ray Tune's trial id (its Train run is `<sweep>-<id>`)
SEARCH_TAG_PREFIX = "search."  # + a searched key: the trial's value (the parent's params alike)
_MAX_PARAMS_PER_BATCH = 100  # MLflow's log_batch limit


def loss_metric(term: str) -> str:
    """`pq_class` -> `loss/pq_class`."""
    return f"loss/{term}"


def class_metric(class_name: str) -> str:
    """Per-class PQ metric name; characters MLflow rejects become `_`."""
    return VAL_PQ_CLASS_PREFIX + re.sub(r"[^0-9A-Za-z_\-. ]", "_", class_name)


# --- store location -------------------------------------------------------------------------
def tracking_uri(cfg: ExperimentConfig) -> str:
    """`tracking.uri`, else `MLFLOW_TRACKING_URI`, else a sqlite file in the work dir."""
    if cfg.tracking.uri:
        return cfg.tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    root = work_dir(cfg)
    if not root.is_local:
        raise TrackingError(
            f"work_dir {root} is object storage, where MLflow cannot keep its database: set "
            "tracking.uri (or MLFLOW_TRACKING_URI) to an MLflow server, http://HOST:PORT"
        )
    return f"sqlite:///{root.local_path() / 'mlflow.db'}"  # an absolute path gives four slashes


def check_server(uri: str, timeout_s: float = 10.0) -> None:
    """Pre-flight for a tracking server: it answers `/health` (other stores need no check).

    Raises:
        TrackingError: one line naming the URI and the cause.
    """
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s) as answer:
            if answer.status == 200:
                return
            cause = f"HTTP {answer.status}"
    except urllib.error.HTTPError as exc:
        cause = f"HTTP {exc.code} {exc.reason}"
    except (urllib.error.URLError, OSError) as exc:
        cause = str(getattr(exc, "reason", exc))
    raise TrackingError(f"tracking server {uri}: unreachable ({cause})")


def artifact_root(cfg: ExperimentConfig) -> str:
    """Where a new experiment keeps artifacts when the store is the default local one."""
    return (work_dir(cfg).local_path() / "mlartifacts").as_uri()


def _client(uri: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def experiment_id(cfg: ExperimentConfig, uri: str | None = None) -> str:
    """The id of `tracking.experiment`, creating it (with an explicit artifact location) if new."""
    uri = uri or tracking_uri(cfg)
    client = _client(uri)
    found = client.get_experiment_by_name(cfg.tracking.experiment)
    if found is not None:
        return str(found.experiment_id)
    location = artifact_root(cfg) if uri.startswith("sqlite:") else None
    if uri.startswith("sqlite:"):
        work_dir(cfg).mkdir()
    return str(
        client.create_experiment(
            cfg.tracking.experiment,
            artifact_location=location,
            tags=provenance.experiment_tags(),
        )
    )


def create_run(
    cfg: ExperimentConfig,
    run_name: str,
    *,
    parent_run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> str:
    """Create the MLflow run of one training run, log every config key and `config.yaml`.

    Args:
        cfg: the resolved experiment.
        run_name: the training run's name (also Ray Train's run name).
        parent_run_id: the sweep's parent run, making this one its child.
        tags: extra run tags; a `mlflow.runName` tag (`RUN_NAME_TAG`) names the MLflow run
            instead of `run_name` (a sweep's trial is named by what it tries).

    Returns:
        The run id, to pass to the workers (`RunLogger`) and to store in the run directory.
    """
    from mlflow.entities import Param

    uri = tracking_uri(cfg)
    client = _client(uri)
    all_tags = {**provenance.run_tags(), **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run_name = all_tags.get(RUN_NAME_TAG, run_name)  # MLflow refuses two different names
    run = client.create_run(experiment_id(cfg, uri), run_name=run_name, tags=all_tags)
    run_id = run.info.run_id
    params = [Param(k, v[:6000]) for k, v in sorted(to_params(cfg).items())]
    for start in range(0, len(params), _MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, params=params[start : start + _MAX_PARAMS_PER_BATCH])
    client.log_text(run_id, to_yaml(cfg), "config.yaml")
    return run_id


def reopen_run(cfg: ExperimentConfig, run_id: str) -> str:
    """Mark a stopped run as running again (a resumed training run continues its own run).

    Returns:
        Its status before (FINISHED, FAILED, KILLED, ...).
    """
    client = _client(tracking_uri(cfg))
    before = str(client.get_run(run_id).info.status)
    client.update_run(run_id, status="RUNNING")
    return before


def finish_run(cfg: ExperimentConfig, run_id: str, status: str = "FINISHED") -> None:
    """Set the run's final status: FINISHED, FAILED or KILLED."""
    _client(tracking_uri(cfg)).set_terminated(run_id, status=status)


def find_runs(cfg: ExperimentConfig, run_name: str | None = None) -> list[Any]:
    """The runs of `tracking.experiment` (optionally with this run name), newest first."""
    client = _client(tracking_uri(cfg))
    found = client.get_experiment_by_name(cfg.tracking.experiment)
    if found is None:
        return []
    query = f"attributes.run_name = '{run_name}'" if run_name else ""
    return list(client.search_runs([found.experiment_id], filter_string=query))


class RunLogger:
    """What world rank 0 logs into an existing run: metrics, tables, images, files.

    Every other rank must not construct one (the training loop passes `None` there).

    A restarted worker group replays the steps since its checkpoint; each metric key keeps one
    point per step because a point at or below the last step already logged for its key is
    dropped (`is_replay`), and system metrics continue their own step count.
    """

    def __init__(self, uri: str, run_id: str, *, system_metrics: bool = True) -> None:
        self.uri = uri
        self.run_id = run_id
        self._client = _client(uri)
        self._logged_through = self._last_steps()
        self._monitor = _start_system_metrics(uri, run_id) if system_metrics else None

    def _last_steps(self) -> dict[str, int]:
        """The last step logged so far for each metric key of the run (empty for a new run)."""
        keys = [k for k in self._client.get_run(self.run_id).data.metrics if k.startswith(_OURS)]
        return {
            key: max(
                (m.step for m in self._client.get_metric_history(self.run_id, key)), default=-1
            )
            for key in keys
        }

    def is_replay(self, key: str, step: int) -> bool:
        """Whether `key` already has a point at `step` or later (from an earlier attempt)."""
        return step <= self._logged_through.get(key, -1)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [
            Metric(k, float(v), now, step)
            for k, v in metrics.items()
            if not self.is_replay(k, step)
        ]
        for start in range(0, len(batch), 1000):  # MLflow's per-batch metric limit
            self._client.log_batch(self.run_id, metrics=batch[start : start + 1000])

    def log_text(self, text: str, artifact_file: str) -> None:
        self._client.log_text(self.run_id, text, artifact_file)

    def log_image(self, image: Any, artifact_file: str) -> None:
        """`image`: an H x W x 3 uint8 array."""
        self._client.log_image(self.run_id, image, artifact_file=artifact_file)

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        self._client.log_artifact(self.run_id, str(local_path), artifact_path)

    def close(self) -> None:
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None


def _start_system_metrics(uri: str, run_id: str) -> Any:
    """MLflow's CPU/GPU/memory sampler for the run, or None when psutil is not installed."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
    except ImportError:  # psutil is an optional MLflow dependency
        log.debug("psutil is not installed: no system metrics")
        return None
    # An explicit URI: mlflow.set_tracking_uri would leak into the process (e.g. local mode).
    # resume_logging: a restarted worker group continues the run's system/* steps, not from 0.
    monitor = SystemMetricsMonitor(run_id, tracking_uri=uri, resume_logging=True)
    monitor.start()
    return monitor


# --- sweeps ---------------------------------------------------------------------------------
def create_sweep_run(
    cfg: ExperimentConfig, sweep_name: str, sweep_yaml: str | Path, search: Mapping[str, Any]
) -> str:
    """The parent run of a sweep: the search space as params, the sweep YAML as an artifact.

    `cfg` is the sweep's base experiment with `tracking.experiment` set to the sweep name.
    """
    from mlflow.entities import Param

    uri = tracking_uri(cfg)
    client = _client(uri)
    tags = {**provenance.run_tags(), "sweep": sweep_name}
    run = client.create_run(experiment_id(cfg, uri), run_name=sweep_name, tags=tags)
    run_id = run.info.run_id
    params = [Param(f"search.{k}", str(v)[:6000]) for k, v in sorted(search.items())]
    if params:
        client.log_batch(run_id, params=params)
    client.log_artifact(run_id, str(sweep_yaml))
    return run_id


def log_sweep_summary(
    cfg: ExperimentConfig, parent_run_id: str, table: str, *, wall_s: float, train_s: float
) -> None:
    """End a sweep's parent run: its summary table and its wall time vs the trials' training."""
    client = _client(tracking_uri(cfg))
    client.log_text(parent_run_id, table + "\n", "sweep_summary.txt")
    now = int(time.time() * 1000)
    from mlflow.entities import Metric

    client.log_batch(
        parent_run_id,
        metrics=[
            Metric("sweep/wall_s", wall_s, now, 0),
            Metric("sweep/trials_train_s", train_s, now, 0),
        ],
    )
    client.set_terminated(parent_run_id, status="FINISHED")


def finish_sweep_runs(cfg: ExperimentConfig, parent_run_id: str, status: str) -> None:
    """End a sweep's parent run and its still-running child runs with `status` (e.g. KILLED)."""
    client = _client(tracking_uri(cfg))
    parent = client.get_run(parent_run_id)
    running = f"tags.mlflow.parentRunId = '{parent_run_id}' and attributes.status = 'RUNNING'"
    children = client.search_runs([parent.info.experiment_id], filter_string=running)
    for run in [*children, parent]:
        client.set_terminated(run.info.run_id, status=status)


def latest_metrics(cfg: ExperimentConfig, run_id: str) -> tuple[dict[str, float], int]:
    """A run's latest value of every metric, and the last step at which `val/pq` was logged."""
    client = _client(tracking_uri(cfg))
    metrics = dict(client.get_run(run_id).data.metrics)
    history = client.get_metric_history(run_id, VAL_PQ)
    return metrics, max((m.step for m in history), default=0)
