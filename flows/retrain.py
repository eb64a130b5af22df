"""Flow `ul-retrain` (deployment `ul-retrain/scheduled-retrain`): retrain on new raw data, promote only if better.

Each trigger (the schedule, or `prefect deployment run ul-retrain/scheduled-retrain`) lists the raw data
(`data.root`, ulcore.data.manifest) and compares its digest with the one the last *finished* retrain ran on
(`metrics/retrain.json`). Unchanged and not forced: the run ends at once and says so. Otherwise it runs the whole
pipeline as a subflow (flow `ul`: raw_manifest -> shard -> ... -> evaluate -> promote), in which only the changed
shards are rebuilt and the promote stage moves `champion` only when the new lineage beats it (ulcore.promotion).
With `warm_start: true` stage 1 and stage 2 start from the champion's weights instead of a random initialisation
(`stage1.init_from` / `stage2.init_from` = champion for this run; ulcore/train/warm_start.py).

Failures: every stage is idempotent and resumable, so the pipeline is rerun as a whole, continuing where it
stopped, for infrastructure failures only (storage unreachable, a lost connection or timeout, a Ray job whose
driver or node was lost), at most `infra_retries` times, `retry_delay_s` apart. A failure of our code or data (a
stage's own error, a bad config, a job whose command exited non-zero) fails the run at once: a rerun would fail
the same way. One run at a time: the deployment drops triggers that arrive while a run is active
(infra/prefect.yaml: concurrency_limit 1, collision_strategy CANCEL_NEW).

Run: `python -m flows.retrain [--params params.yaml] [--set section.key=value ...]`.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger

from flows._common import load, stop_jobs_on_cancel
from flows.pipeline import ul
from ulcore import layout, storage
from ulcore.config import Config
from ulcore.data.manifest import fingerprints, raw_manifest
from ulcore.jobs import JobFailed

MARKER = "retrain"  # under metrics/: the raw digest of the last retrain that finished
WARM_START = ["stage1.init_from=champion", "stage2.init_from=champion"]  # what `warm_start: true` adds to overrides
# A Ray job that ended FAILED because its command exited non-zero failed on our code or data; any other FAILED
# (the job's driver or its node lost, the runtime environment not set up) is the cluster's.
COMMAND_FAILED = "Job entrypoint command failed"


def marker_uri(cfg: Config) -> str:
    return layout.metrics(cfg.storage.root, MARKER)


def infrastructure_failure(exc: BaseException) -> bool:
    """Whether a rerun can fix the failure: the cluster or an endpoint was away, not our code or data.

    Walks the exception's causes: a stage wraps what it caught (a botocore error in a ConnectionError, ...)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (storage.StorageUnreachable, ConnectionError, TimeoutError)):
            return True
        if isinstance(exc, JobFailed):
            return exc.status == "FAILED" and COMMAND_FAILED not in str(exc)
        if type(exc).__module__.startswith(("requests.", "urllib3.")) and "Connection" in type(exc).__name__:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def new_raw_data(cfg: Config) -> tuple[bool, str, str]:
    """(changed, why, current digest) of the raw data against what the last finished retrain ran on."""
    current = raw_manifest(cfg)
    what = f"{current['root']}: {current['files']} files, digest {current['digest']}"
    try:
        last = storage.read_json(marker_uri(cfg))
    except FileNotFoundError:
        return True, f"no finished retrain recorded yet ({what})", current["digest"]
    if last.get("raw_digest") == current["digest"]:
        return False, f"raw data unchanged since the retrain of {last.get('finished_at', '?')} ({what})", \
            current["digest"]
    before, now = last.get("fingerprints", {}), fingerprints(current)
    added = sum(k not in before for k in now)
    removed = sum(k not in now for k in before)
    changed = sum(k in before and before[k] != v for k, v in now.items())
    return True, f"raw data changed: {added} added, {changed} changed, {removed} removed ({what})", current["digest"]


def record_finished(cfg: Config, digest: str) -> None:
    """The marker: the raw digest and every file's fingerprint (so the next trigger can say what changed)."""
    manifest = raw_manifest(cfg)
    if manifest["digest"] != digest:  # raw data changed during the run: leave the marker, the next trigger retrains
        return
    storage.write_json(marker_uri(cfg), {"raw_digest": digest, "fingerprints": fingerprints(manifest),
                                         "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})


@flow(name="ul-retrain", log_prints=True, validate_parameters=True, on_cancellation=[stop_jobs_on_cancel])
def retrain(params: str = "params.yaml", overrides: list[str] = [], force: bool = False,  # noqa: B006
            infra_retries: int = 2, retry_delay_s: float = 60.0, warm_start: bool = False) -> dict[str, Any]:
    """Retrain on new raw data (or when forced): the whole pipeline, then promotion by evaluation."""
    logger = get_run_logger()
    if infra_retries < 0 or retry_delay_s < 0:
        raise ValueError(f"infra_retries={infra_retries}, retry_delay_s={retry_delay_s}: expected both >= 0")
    overrides = [*overrides, *(WARM_START if warm_start else [])]
    cfg = load(params, overrides)
    changed, why, digest = new_raw_data(cfg)
    if not (changed or force):
        logger.info("nothing to do: %s", why)
        return {"skipped": why}
    logger.info("retraining (%s): %s", "forced" if force and not changed else "new raw data", why)
    for attempt in range(infra_retries + 1):
        try:
            result = ul(params=params, overrides=overrides)
            break
        except Exception as exc:
            if attempt == infra_retries or not infrastructure_failure(exc):
                raise
            logger.warning("infrastructure failure (%s: %s); rerunning the pipeline in %g s, it continues where "
                           "it stopped (retry %d of %d)", type(exc).__name__, exc, retry_delay_s, attempt + 1,
                           infra_retries)
            time.sleep(retry_delay_s)
    record_finished(cfg, digest)
    promotion = result.get("stages", {}).get("promote", {})
    return {"why": why, "attempts": attempt + 1, "promoted": promotion.get("promoted"),
            "promotion_reason": promotion.get("reason"), "pipeline": result}


if __name__ == "__main__":
    from flows._cli import main

    main(retrain)
