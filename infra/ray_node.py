"""`ray start` for a Ray node whose every socket listens on 127.0.0.1, for clusters of several nodes on one machine.

Ray 2.60 binds its servers to loopback only when a node's IP is exactly 127.0.0.1, but it rewrites an address of
127.0.0.1 to the host's interface address (`services.resolve_ip_for_localhost`) unless
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 — and with that set, `ray start` refuses to add a worker node. So nodes start
through this wrapper: `ray start` itself runs with multi-node allowed and 127.0.0.1 kept as given, while the
processes it spawns (raylet, dashboard agent, workers, Ray job drivers) inherit RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0,
so that they, too, reach the GCS on 127.0.0.1 instead of the interface address nothing listens on.
Used by infra/cluster.sh; a real cluster's nodes use plain `ray start` with their own addresses.
"""

import os
import sys

import ray._private.services as services
from ray._private import ray_constants
from ray.scripts.scripts import main

ray_constants.ENABLE_RAY_CLUSTER = True
os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
services.resolve_ip_for_localhost = lambda host: host

if __name__ == "__main__":
    sys.argv = ["ray", *sys.argv[1:]]
    main()
