"""Every placement group a Ray Train run creates is removed when the run ends, however it ends.

Ray Train V2 reserves each worker group's CPUs/GPUs in a placement group that its controller
creates. A placement group made by an actor that is not detached lives as long as the *job's
driver*, not as long as the actor. When a controller ends without shutting its worker group down
(a Tune trial stopped by ASHA kills the trial actor mid-run, ray-project/ray#54305), the
reservation stays until the driver exits; Ray's own `PlacementGroupCleaner` is meant to catch that
but gives up silently whenever the state API does not answer. In a long-lived driver (a sweep, a
test session) the next run then waits forever for CPUs that look free.

So the platform keeps its own record: `PlacementGroupRecorder`, a Ray Train worker-group callback
running in the controller, writes the id of every placement group it starts into Ray's key-value
store (GCS, reachable from every node) under the run's storage path; the driver calls
`remove_placement_groups` when `fit()` returns or raises, and a sweep's driver does so for every
trial that ends, including those the scheduler stopped.
"""

from __future__ import annotations

import logging
from typing import Any

import ray
from ray.experimental import internal_kv
from ray.train.v2._internal.execution.callback import WorkerGroupCallback
from ray.util.placement_group import (
    PlacementGroup,
    placement_group_table,
    remove_placement_group,
)

log = logging.getLogger(__name__)
KV_NAMESPACE = "maxdeeplab.placement_groups"
_SEPARATOR = "::"


def _prefix(run_key: str) -> str:
    return f"{run_key}{_SEPARATOR}"


class PlacementGroupRecorder(WorkerGroupCallback):
    """Records the placement group of each worker group a run starts (restarts included).

    Args:
        run_key: identifies the run across a cluster: its storage path and name.
    """

    def __init__(self, run_key: str) -> None:
        self.run_key = run_key

    def after_worker_group_start(self, worker_group: Any) -> None:
        handle = worker_group.get_worker_group_state().placement_group_handle
        group: PlacementGroup = handle.placement_group
        internal_kv._internal_kv_put(
            _prefix(self.run_key) + group.id.hex(), b"", namespace=KV_NAMESPACE
        )


def remove_placement_groups(run_key: str) -> int:
    """Remove every recorded placement group of a run that Ray still holds; the number removed."""
    if not ray.is_initialized():
        return 0
    removed = 0
    for key in internal_kv._internal_kv_list(_prefix(run_key), namespace=KV_NAMESPACE):
        group_hex = key.decode().rsplit(_SEPARATOR, 1)[1]
        group = PlacementGroup(ray.PlacementGroupID(bytes.fromhex(group_hex)))
        if placement_group_table(group).get("state", "REMOVED") != "REMOVED":
            try:
                remove_placement_group(group)
                removed += 1
            except Exception as exc:  # already gone between the check and the call
                log.debug("placement group %s: %s", group_hex, exc)
        internal_kv._internal_kv_del(key, namespace=KV_NAMESPACE)
    if removed:
        log.info("removed %d placement group(s) left by run %s", removed, run_key)
    return removed


def live_placement_groups() -> list[dict[str, Any]]:
    """Ray's table entries of the placement groups that still reserve resources."""
    return [g for g in placement_group_table().values() if g["state"] != "REMOVED"]
