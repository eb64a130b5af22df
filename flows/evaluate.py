"""Flow `ul-evaluate`: gFID, rFID, PSNR, bits/pixel (FVD for video), sample grids and plots (metrics/eval.json).

Run: `python -m flows.evaluate [--params params.yaml] [--set section.key=value ...]` (also the DVC stage command).
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows._common import stage_flow_body, stop_jobs_on_cancel


@flow(name="ul-evaluate", log_prints=True, validate_parameters=True, on_cancellation=[stop_jobs_on_cancel])
def evaluate(params: str = "params.yaml", overrides: list[str] = []) -> dict[str, Any]:  # noqa: B006
    """Evaluate: gFID, rFID, PSNR, bits/pixel (FVD for video), sample grids and plots (metrics/eval.json)."""
    return stage_flow_body("evaluate", params, overrides)


if __name__ == "__main__":
    from flows._cli import main

    main(evaluate)
