"""Flow `ul-stage2`: Stage 2: train the base model on the frozen latents (models/stage2/).

Run: `python -m flows.stage2 [--params params.yaml] [--set section.key=value ...]` (also the DVC stage command).
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows._common import stage_flow_body, stop_jobs_on_cancel


@flow(name="ul-stage2", log_prints=True, validate_parameters=True, on_cancellation=[stop_jobs_on_cancel])
def stage2(params: str = "params.yaml", overrides: list[str] = []) -> dict[str, Any]:  # noqa: B006
    """Stage 2: train the base model on the frozen latents (models/stage2/)."""
    return stage_flow_body("stage2", params, overrides)


if __name__ == "__main__":
    from flows._cli import main

    main(stage2)
