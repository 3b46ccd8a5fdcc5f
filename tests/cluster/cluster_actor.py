"""Hold or release the head node's CPU on a test cluster, so a run's worker must go elsewhere.

Usage: python cluster_actor.py hold|release GCS_ADDRESS. `hold` starts a detached actor that takes
the head's only CPU and prints the head's node id; `release` kills it. (A separate process: the
test process keeps its own Ray instance.)
"""

from __future__ import annotations

import logging
import sys
import time

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

NAME = "maxdeeplab-test-cpu-holder"
HEAD_RESOURCE = "node:__internal_head__"


@ray.remote(num_cpus=1)
class Holder:
    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()


def main(action: str, address: str) -> None:
    ray.init(address=address, logging_level=logging.ERROR, namespace="maxdeeplab-tests")
    if action == "hold":
        (head,) = [
            n["NodeID"] for n in ray.nodes() if n["Alive"] and HEAD_RESOURCE in n["Resources"]
        ]
        holder = Holder.options(
            name=NAME,
            lifetime="detached",
            scheduling_strategy=NodeAffinitySchedulingStrategy(head, soft=False),
        ).remote()
        assert ray.get(holder.node.remote(), timeout=120) == head
        print(head, flush=True)
    else:
        ray.kill(ray.get_actor(NAME))
        time.sleep(1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
