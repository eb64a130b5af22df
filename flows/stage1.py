"""Flow `ul-stage1`: Stage 1: train encoder, diffusion prior and diffusion decoder jointly (models/stage1/).

Run: `python -m flows.stage1 [--params params.yaml] [--set section.key=value ...]` (also the DVC stage command).
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows._common import stage_flow_body, stop_jobs_on_cancel


@flow(name="ul-stage1", log_prints=True, validate_parameters=True, on_cancellation=[stop_jobs_on_cancel])
def stage1(params: str = "params.yaml", overrides: list[str] = []) -> dict[str, Any]:  # noqa: B006
    """Stage 1: train encoder, diffusion prior and diffusion decoder jointly (models/stage1/)."""
    return stage_flow_body("stage1", params, overrides)


if __name__ == "__main__":
    from flows._cli import main

    main(stage1)
