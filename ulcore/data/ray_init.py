"""Connect to Ray once per process: the configured cluster, or a local one bound to loopback.

A local `ray.init` on a closed machine needs three settings (research/stack.md §3): no auth token written to
~/.ray, every socket on 127.0.0.1 rather than the host's interface address, and no usage-stats reporting. They are
environment variables read at init time, so they are set here (without overriding a value the user chose).
"""

from __future__ import annotations

import logging
import os

from ulcore.config import RayConfig

log = logging.getLogger(__name__)

LOCAL_RAY_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
}
LOCAL_OBJECT_STORE_BYTES = 2**30  # the default (30 % of RAM) is far more than sharding or tiny training needs


def ensure_ray(ray_cfg: RayConfig) -> None:
    """`ray.init` unless already connected: `ray.address`, else RAY_ADDRESS, else a local cluster on 127.0.0.1."""
    import ray

    if ray.is_initialized():
        return
    for key, value in LOCAL_RAY_ENV.items():
        os.environ.setdefault(key, value)
    address = ray_cfg.address or os.environ.get("RAY_ADDRESS", "")
    if address:
        log.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
        return
    ray.init(num_cpus=ray_cfg.num_cpus or None, include_dashboard=True, dashboard_host="127.0.0.1",
             object_store_memory=LOCAL_OBJECT_STORE_BYTES, log_to_driver=True)
    log.info("started a local Ray cluster: %s", ray.cluster_resources())


__all__ = ["ensure_ray", "LOCAL_RAY_ENV"]
