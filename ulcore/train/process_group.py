"""The DDP process group of a training run, with every socket it opens on one chosen address.

Ray Train's own setup starts torch's TCPStore on rank 0 with `init_method="env://"`, and that store listens on all
interfaces (`*:PORT`) whatever MASTER_ADDR says; gloo binds to whatever the host name resolves to. Here rank 0
binds the store's socket itself, on `bind_address`, and hands it over (`TCPStore(master_listen_fd=...)`), and gloo /
NCCL are pointed at the interface holding that address. A local run binds 127.0.0.1; on a cluster the address is
the rank-0 worker's Ray node IP, i.e. the interface chosen with `ray start --node-ip-address`.
"""

from __future__ import annotations

import datetime
import os
import socket
from typing import Any

import ray
from ray.train.torch.config import TorchConfig, _set_torch_distributed_env_vars, _TorchBackend

_listener: socket.socket | None = None  # rank 0's bound socket, kept open for the store that serves on it


def _interface_of(address: str) -> str | None:
    """Name of the network interface that holds `address` ("lo" for 127.0.0.1), if any."""
    import psutil

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address.split("%")[0] == address for a in addrs):
            return name
    return None


def _open_listener(bind_address: str) -> tuple[str, int]:
    """On rank 0: bind the store's socket (any free port) before anyone connects; returns (address, port)."""
    global _listener
    host = bind_address or ray.util.get_node_ip_address()
    _listener = socket.create_server((host, 0), backlog=1024)
    return host, _listener.getsockname()[1]


def _join(backend: str, world_rank: int, world_size: int, host: str, port: int, timeout_s: int) -> None:
    """On every rank: point gloo / NCCL at the interface of `host`, connect to rank 0's store, start the group."""
    import torch.distributed as dist

    interface = _interface_of(host)
    if interface:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", interface)
        os.environ.setdefault("NCCL_SOCKET_IFNAME", interface)
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, port, world_size, is_master=world_rank == 0, timeout=timeout,
                          master_listen_fd=_listener.fileno() if world_rank == 0 else None)
    dist.init_process_group(backend, store=store, rank=world_rank, world_size=world_size, timeout=timeout)


class _BoundTorchBackend(_TorchBackend):
    def on_start(self, worker_group: Any, backend_config: BoundTorchConfig) -> None:
        gpus = worker_group.get_resources_per_worker().get("GPU", 0)
        backend = backend_config.backend or ("nccl" if gpus > 0 else "gloo")
        host, port = worker_group.execute_single(0, _open_listener, backend_config.bind_address)
        worker_group.execute(_set_torch_distributed_env_vars)
        world_size = len(worker_group)
        ray.get([worker_group.execute_single_async(i, _join, backend=backend, world_rank=i, world_size=world_size,
                                                   host=host, port=port, timeout_s=backend_config.timeout_s)
                 for i in range(world_size)])


class BoundTorchConfig(TorchConfig):
    """TorchConfig whose process group listens on `bind_address` only ("" = rank 0's Ray node IP)."""

    def __init__(self, bind_address: str = "", **kwargs: Any):
        self.bind_address = bind_address
        super().__init__(**kwargs)

    @property
    def backend_cls(self) -> type:
        return _BoundTorchBackend


__all__ = ["BoundTorchConfig"]
