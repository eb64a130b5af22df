"""Flow `ul-raw_manifest`: List the raw data (data.root) and record its digest (data/raw_manifest.json).

Run: `python -m flows.raw_manifest [--params params.yaml] [--set section.key=value ...]` (also the DVC stage command).
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows._common import stage_flow_body, stop_jobs_on_cancel


@flow(name="ul-raw_manifest", log_prints=True, validate_parameters=True, on_cancellation=[stop_jobs_on_cancel])
def raw_manifest(params: str = "params.yaml", overrides: list[str] = []) -> dict[str, Any]:  # noqa: B006
    """List the raw data (data.root) and record its digest (data/raw_manifest.json)."""
    return stage_flow_body("raw_manifest", params, overrides)


if __name__ == "__main__":
    from flows._cli import main

    main(raw_manifest)
