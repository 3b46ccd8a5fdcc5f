"""`ray start` for a test cluster that lives on 127.0.0.1 alone: `python ray_node.py start ...`.

Run with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 in the environment (conftest.py says why). Two changes
to `ray start`, in this process only: `--node-ip-address 127.0.0.1` is kept as given instead of
being replaced by the machine's routable address, and `--address` may add a node although that
variable says "this machine only". The processes it starts (GCS, raylet, dashboard, agents,
workers) are Ray's own, unchanged.
"""

from __future__ import annotations

import sys

import ray._private.ray_constants as ray_constants
import ray._private.services as services
from ray.scripts.scripts import main

ray_constants.ENABLE_RAY_CLUSTER = True
services.resolve_ip_for_localhost = lambda host: host

if __name__ == "__main__":
    sys.argv[0] = "ray"
    sys.exit(main())
