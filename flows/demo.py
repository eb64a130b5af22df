"""`make demo`: the whole pipeline on the embedded dataset through Prefect (ephemeral API, no server), then
the metric table, where the sample grids are, and the command that opens the MLflow UI.

Run: `python -m flows.demo [--params params.yaml] [--set section.key=value ...]`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from ulcore import layout, storage
from ulcore.config import Config, add_config_args, config_or_exit


def _flatten(values: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(values, dict):
        out: dict[str, Any] = {}
        for key, value in values.items():
            out.update(_flatten(value, f"{prefix}{key}." if not isinstance(value, (int, float, str, bool))
                                else f"{prefix}{key}"))
        return out
    return {prefix.rstrip("."): values} if isinstance(values, (int, float, str, bool)) or values is None else {}


def read_metrics(cfg: Config) -> dict[str, dict[str, Any]]:
    """metrics/*.json under storage.root (a folder or s3://), flattened to `key -> scalar`."""
    return {uri.rsplit("/", 1)[-1]: _flatten(json.loads(storage.read_text(uri)))
            for uri in storage.list_uris(layout.metrics(cfg.storage.root), suffix=".json")}


def metric_table(metrics: dict[str, dict[str, Any]]) -> str:
    rows = [(name, key, value) for name, values in metrics.items() for key, value in values.items()]
    if not rows:
        return "(no metrics/*.json found)"
    w1 = max(len(r[0]) for r in rows)
    w2 = max(len(r[1]) for r in rows)
    lines = [f"{'file':<{w1}}  {'metric':<{w2}}  value", f"{'-' * w1}  {'-' * w2}  -----"]
    for name, key, value in rows:
        text = f"{value:.5g}" if isinstance(value, float) else str(value)
        lines.append(f"{name:<{w1}}  {key:<{w2}}  {text}")
    return "\n".join(lines)


def report(cfg: Config, result: dict[str, Any] | None) -> str:
    from ulcore import tracking

    root = cfg.storage.root
    out = ["", "=" * 72, "Unified Latents demo: done", "=" * 72, "", metric_table(read_metrics(cfg)), ""]
    if not root.startswith("s3://"):
        grids = sorted(str(p) for p in (Path(root) / "outputs").rglob("*.png"))
        plots = sorted(str(p) for p in (Path(root) / "plots").glob("*.png"))
        out.append(f"sample grids ({len(grids)}): {Path(root, 'outputs').resolve()}")
        out += [f"  {g}" for g in grids[:12]]
        if plots:
            out.append(f"plots ({len(plots)}): {Path(root, 'plots').resolve()}")
    else:
        out.append(f"sample grids: {root.rstrip('/')}/outputs/")
    if result:
        out += ["", f"DVC: {result.get('dvc')}; push: {result.get('dvc_push')}",
                f"MLflow pipeline run: {result.get('mlflow_run_id')}"]
    out += ["", "Review runs, metrics, grids and registered models in the MLflow UI:",
            f"  {tracking.ui_command(cfg)}", f"  then open {tracking.experiment_url(cfg)}", ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.demo", description=__doc__.splitlines()[0])
    add_config_args(parser)
    args = parser.parse_args(argv)
    cfg = config_or_exit(args.params, args.overrides)
    print(f"Unified Latents demo: preset {cfg.preset}, storage root {Path(cfg.storage.root).resolve()}, "
          f"config {cfg.digest()}\nRunning raw_manifest -> shard -> reference -> stage1 -> encode -> stage2 -> "
          "evaluate -> promote through Prefect (ephemeral API; the first start takes ~10 s)...", flush=True)
    from flows._cli import start_local_services
    from flows.pipeline import ul

    start = time.perf_counter()
    start_local_services(cfg)
    state = ul(params=args.params, overrides=args.overrides, return_state=True)
    if not state.is_completed():
        print(f"error: the pipeline finished in state {state.type.value}: {state.message}", file=sys.stderr)
        raise SystemExit(1)
    result = state.result()
    print(report(cfg, result))
    print(f"total wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
