"""Flow `ul-encode`: Pre-encode the shards with the frozen stage-1 encoder (data/latents/).

Run: `python -m flows.encode [--params params.yaml] [--set section.key=value ...]` (also the DVC stage command).
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows._common import stage_flow_body, stop_jobs_on_cancel


@flow(name="ul-encode", log_prints=True, validate_parameters=True, on_cancellation=[stop_jobs_on_cancel])
def encode(params: str = "params.yaml", overrides: list[str] = []) -> dict[str, Any]:  # noqa: B006
    """Pre-encode the shards with the frozen stage-1 encoder (data/latents/)."""
    return stage_flow_body("encode", params, overrides)


if __name__ == "__main__":
    from flows._cli import main

    main(encode)
