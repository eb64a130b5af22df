"""`python -m flows.<stage> [--params P] [--set section.key=value ...]`: validate, then run the flow.

Bad params exit with status 2 and a one-line message before Prefect starts; a failed flow run exits 1.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ulcore.config import add_config_args, config_or_exit


def main(flow: Any, argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog=f"python -m flows.{flow.fn.__module__.rsplit('.', 1)[-1]}",
                                     description=(flow.description or flow.name).splitlines()[0])
    add_config_args(parser)
    args = parser.parse_args(argv)
    config_or_exit(args.params, args.overrides)  # exits 2 on a bad file / key / value
    state = flow(params=args.params, overrides=args.overrides, return_state=True)
    if not state.is_completed():
        print(f"error: flow {flow.name!r} finished in state {state.type.value}: {state.message}", file=sys.stderr)
        raise SystemExit(1)
    return state.result()
