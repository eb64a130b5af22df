"""Where a process runs: the device and precision of its passes, and its connection to Ray.

Device and precision: a driver-side pass (encode tasks, evaluation) runs on the first CUDA device when
`ray.use_gpu` is set and one is visible, else on the CPU; bf16 autocast is used where the hardware runs it fast
(fp32 elsewhere).

Ray: connect once per process, to the cluster the user named or to a local instance of our own on 127.0.0.1.

A cluster is joined only when `ray.address` names it. RAY_ADDRESS in the environment is not a request to join: it
is what Ray's `ray job` commands read (a cluster's Jobs API, e.g. `.cluster/env` of `make cluster`). Without
`ray.address`, `ray.init(address="local")` starts a private instance:
plain `ray.init()` would join whatever cluster the machine last started with `ray start` (Ray's "current cluster"
file), even a dead one left by a crash, and warn about every other instance running on the machine. A named
address that cannot be reached fails at once, naming it and where it came from. One line says which it was.

A local `ray.init` on a closed machine needs three settings (docs/design.md §5): no auth token written to
~/.ray, every socket on 127.0.0.1 rather than the host's interface address, and no usage-stats reporting. They are
environment variables read at init time, so they are set here (without overriding a value the user chose).
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
from pathlib import Path

import torch

from ulcore.config import Config, ConfigError, RayConfig
from ulcore.jobs import is_jobs_endpoint, refuse_ray_client

# ---------------------------------------------------------------------------------------------- device, precision


def cpu_has_fast_bf16() -> bool:
    """True when the CPU advertises AMX-BF16 or AVX512-BF16; without them bf16 matmuls are emulated and slow
    (measured ~60x slower than fp32 on an AVX2-only EPYC)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def compute_device(cfg: Config) -> torch.device:
    """Where a driver-side pass (encode tasks, evaluation) runs: the first CUDA device when `ray.use_gpu` is set
    and one is visible, else the CPU."""
    return torch.device("cuda" if cfg.ray.use_gpu and torch.cuda.is_available() else "cpu")


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` -> bf16 on CUDA and on CPUs with AMX / AVX512-bf16, else fp32."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast context for the forward pass; a no-op in fp32."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------- Ray

# RAY_worker_niceness: a local instance's workers run at the driver's priority, not Ray's default nice 15. At 15
# every other process (Ray's own daemons, the Prefect server, the driver) preempts a training worker, and each
# preemption stalls both of its OpenMP threads at the next barrier: the tiny stage 1 alone (768 steps of 16, one
# checkpoint, back to back on the 2-CPU AMD EPYC) trained 112-117 samples/s at 0 against 98-114 at 15, 115 s
# against 123 s. A cluster joined through ray.address keeps its own setting.
LOCAL_RAY_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_worker_niceness": "0",
}
# Read by the driver and handed to Ray Train's controller and workers (Train's ENV_VARS_TO_PROPAGATE), on a cluster
# too. The print patch sends a worker's print both to stdout and to its logger when stdout is wrapped (it is, in a
# Ray worker), so every status line arrived twice. The controller sleeps a health-check interval (2 s by default)
# between steps of its state machine, start and end included: at 0.25 s a fit of 4 tiny steps took 13.9 s instead
# of 18.2 (same machine, back to back; 0.5 s gave 15.3, 0.1 s 14.3), and a lost worker is noticed sooner.
DRIVER_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25"}
LOCAL_OBJECT_STORE_BYTES = 2**30  # the default (30 % of RAM) is far more than sharding or tiny training needs
REACH_TIMEOUT_S = 10.0  # a named cluster's head must accept a TCP connection within this


def requested_address(ray_cfg: RayConfig) -> tuple[str, str]:
    """(address, where it came from): `ray.address`, or ("", "") for a local instance."""
    return (ray_cfg.address, "ray.address") if ray_cfg.address else ("", "")


def _check_reachable(address: str, source: str) -> None:
    """Fail in seconds, naming the address, instead of Ray's long reconnect loop on a dead head node."""
    host, sep, port = address.split("://", 1)[-1].rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto" and other forms Ray resolves itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=REACH_TIMEOUT_S).close()
    except OSError as exc:
        raise ConnectionError(
            f"the Ray cluster at {address} (from {source}) is not reachable ({exc}): start it or fix {source}; "
            f"leave ray.address empty to run on a local Ray instance") from None


def _free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ephemeral_port_range(path: Path = Path("/proc/sys/net/ipv4/ip_local_port_range")) -> tuple[int, int]:
    """The ports the kernel hands to outgoing connections (Linux's default where the file is unreadable)."""
    try:
        low, high = (int(v) for v in path.read_text().split())
    except (OSError, ValueError):
        return 32768, 60999
    return low, high


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_block(size: int, *, first: int = 10000, step: int = 100, tries: int = 200) -> int:
    """The first of `size` consecutive loopback ports that are free now and, where the machine leaves room, outside
    the ephemeral range: a port the kernel may give any outgoing connection can be taken between this check and a
    server's bind, and a Ray raylet whose port is taken dies at start ("Failed to start the grpc server")."""
    low, high = ephemeral_port_range()
    bases = range(first, 65536 - size, step)
    outside = [b for b in bases if b + size <= low or b > high]
    candidates = outside or list(bases)
    for base in random.sample(candidates, min(tries, len(candidates))):
        if all(_bindable(p) for p in range(base, base + size)):
            return base
    raise RuntimeError(f"no {size} consecutive free loopback ports from {first} (ephemeral range {low}-{high})")


def ensure_ray(ray_cfg: RayConfig) -> None:
    """`ray.init` unless already connected: the named cluster, else a local instance on 127.0.0.1."""
    import ray
    from ray._private import ray_constants

    for key, value in {**LOCAL_RAY_ENV, **DRIVER_ENV}.items():
        os.environ.setdefault(key, value)
    if ray.is_initialized():
        return
    address, source = requested_address(ray_cfg)
    if address:
        refuse_ray_client(address)
        if is_jobs_endpoint(address):
            raise ConfigError(f"ray.address={address} is a Ray Jobs endpoint: a stage submits itself there "
                              "(ulcore.stages.run_stage); code that joins a cluster in process needs its GCS "
                              "address, ray.address=<head>:6379")
        _check_reachable(address, source)
        ray.init(address=address, log_to_driver=True)
        print(f"[ray] joined the Ray cluster at {address} (from {source}): {ray.cluster_resources()}", flush=True)
        return
    # Ray Train's helper actors ask the state API about "the" cluster; without this address they pick the machine's
    # latest `ray start` cluster or fail with "Found multiple active Ray instances" when others run. Workers inherit it.
    dashboard_port = _free_loopback_port()
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dashboard_port}"
    # Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER when it is imported; if that came before the setting above, this
    # process would still give the instance the host's interface address and Ray would listen on all interfaces.
    ray_constants.ENABLE_RAY_CLUSTER = False
    # Spot-instance preemption cannot happen to a local instance; its watcher only logs a spurious "E" line.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    ray.init(address="local", num_cpus=ray_cfg.num_cpus or None, include_dashboard=True,
             dashboard_host="127.0.0.1", dashboard_port=dashboard_port, object_store_memory=LOCAL_OBJECT_STORE_BYTES,
             log_to_driver=True)
    print(f"[ray] started a local Ray instance (ray.address is empty): "
          f"{ray.cluster_resources().get('CPU', 0):g} CPUs", flush=True)


__all__ = ["cpu_has_fast_bf16", "compute_device", "resolve_precision", "autocast", "ensure_ray", "requested_address",
           "LOCAL_RAY_ENV"]
