"""Flow `ul-promote`: the candidate lineage becomes the champion only if it beats it (metrics/promotion.json).

Run: `python -m flows.promote [--params params.yaml] [--set section.key=value ...]` (also the DVC stage command).
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows._common import stage_flow_body, stop_jobs_on_cancel


@flow(name="ul-promote", log_prints=True, validate_parameters=True, on_cancellation=[stop_jobs_on_cancel])
def promote(params: str = "params.yaml", overrides: list[str] = []) -> dict[str, Any]:  # noqa: B006
    """Promote: move the champion alias to the evaluated lineage when it passes the gate (metrics/promotion.json)."""
    return stage_flow_body("promote", params, overrides)


if __name__ == "__main__":
    from flows._cli import main

    main(promote)
