"""Flow `ul-shard`: Shard the raw images or clips into WebDataset tars (data/shards/).

Run: `python -m flows.shard [--params params.yaml] [--set section.key=value ...]` (also the DVC stage command).
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows._common import stage_flow_body, stop_jobs_on_cancel


@flow(name="ul-shard", log_prints=True, validate_parameters=True, on_cancellation=[stop_jobs_on_cancel])
def shard(params: str = "params.yaml", overrides: list[str] = []) -> dict[str, Any]:  # noqa: B006
    """Shard the raw images or clips into WebDataset tars (data/shards/)."""
    return stage_flow_body("shard", params, overrides)


if __name__ == "__main__":
    from flows._cli import main

    main(shard)
