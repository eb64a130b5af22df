"""`python -m flows.<stage> [--params P] [--set section.key=value ...]`: validate, then run the flow.

Bad params exit with status 2 and a one-line message before Prefect starts; a failed flow run exits 1.
"""

from __future__ import annotations

import argparse
import sys
import threading
from typing import Any

from ulcore.config import Config, add_config_args, config_or_exit


def start_local_services(cfg: Config) -> None:
    """Start what a whole local run needs while Prefect's temporary API server starts: that takes 7-13 s, nearly all
    of it in the server's own process while this one only waits for it to answer. Meanwhile this process opens the
    MLflow store (creating its schema on a fresh root, ~3 s) and its local Ray instance (~5 s; in the main thread,
    where Ray installs its signal handlers). Nothing is started for a Prefect server named by PREFECT_API_URL or a
    Ray cluster named by `ray.address`; a temporary server that fails to start here is started again by the flow."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL

    from ulcore import runtime, tracking

    def start_prefect_api() -> None:
        try:
            SubprocessASGIServer().start()
        except Exception as exc:  # noqa: BLE001 - reported, and the flow's own start tries again
            print(f"Prefect's temporary API server did not start ({exc}); the flow will start it", file=sys.stderr)

    server = None
    if not PREFECT_API_URL.value():
        server = threading.Thread(target=start_prefect_api, name="prefect-api", daemon=True)
        server.start()
    tracking.client(tracking.tracking_uri(cfg))
    if not cfg.ray.address:
        runtime.ensure_ray(cfg.ray)
    if server is not None:
        server.join()


def main(flow: Any, argv: list[str] | None = None, *, services: bool = False) -> dict[str, Any]:
    """`services`: start the run's local services together first (start_local_services); for the whole pipeline."""
    parser = argparse.ArgumentParser(prog=f"python -m flows.{flow.fn.__module__.rsplit('.', 1)[-1]}",
                                     description=(flow.description or flow.name).splitlines()[0])
    add_config_args(parser)
    args = parser.parse_args(argv)
    cfg = config_or_exit(args.params, args.overrides)  # exits 2 on a bad file / key / value
    if services:
        start_local_services(cfg)
    state = flow(params=args.params, overrides=args.overrides, return_state=True)
    if not state.is_completed():
        print(f"error: flow {flow.name!r} finished in state {state.type.value}: {state.message}", file=sys.stderr)
        raise SystemExit(1)
    return state.result()
