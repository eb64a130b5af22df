"""Flow `ul-reference`: FID reference statistics of the real images, once per dataset version (data/fid_refs/).

Run: `python -m flows.reference [--params params.yaml] [--set section.key=value ...]` (also the DVC stage command).
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows._common import stage_flow_body, stop_jobs_on_cancel


@flow(name="ul-reference", log_prints=True, validate_parameters=True, on_cancellation=[stop_jobs_on_cancel])
def reference(params: str = "params.yaml", overrides: list[str] = []) -> dict[str, Any]:  # noqa: B006
    """FID reference statistics of the real images, once per dataset version (data/fid_refs/)."""
    return stage_flow_body("reference", params, overrides)


if __name__ == "__main__":
    from flows._cli import main

    main(reference)
