"""Run one training on a simulated 2-node Ray cluster (`ray.cluster_utils.Cluster`, 1 CPU each).

Usage: python multinode_run.py EXPERIMENT.yaml RESULT.json. Writes the reached step, PQ, and the
node of every Ray Train worker (from Ray's state API) to RESULT.json.
"""

from __future__ import annotations

import json
import logging
import sys

import ray
from ray.cluster_utils import Cluster
from ray.util.state import list_actors

from maxdeeplab.platform import tracking
from maxdeeplab.platform.config import load_experiment
from maxdeeplab.platform.training.launch import free_port, train


def main(config_path: str, result_path: str) -> None:
    cluster = Cluster(
        initialize_head=True,
        # its own dashboard port: the test session's Ray may hold the default one
        head_node_args={"num_cpus": 1, "include_dashboard": True, "dashboard_port": free_port()},
    )
    cluster.add_node(num_cpus=1)
    try:
        ray.init(address=cluster.address, logging_level=logging.ERROR)
        cluster.wait_for_nodes()
        cfg = load_experiment(config_path)
        outcome = train(cfg, run_name="two-nodes", track=False)
        workers = list_actors(filters=[("class_name", "=", "RayTrainWorker")], detail=True)
        result = {
            "num_nodes": len([n for n in ray.nodes() if n["Alive"]]),
            "worker_nodes": [a.node_id for a in workers],
            "step": outcome.metrics["step"],
            "pq": outcome.metrics[tracking.VAL_PQ],
        }
        with open(result_path, "w") as f:
            json.dump(result, f)
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
