"""Flow `ul-study`: the paper's trends at tiny scale in one command, with a verdict per trend (ulcore/study/).

The raw_manifest, shard and reference stages run once on `runs/study/shared/`; then every setting (a loss factor
and a λ(0), see ulcore/study/plan.py) runs stage 1 (+ encode and stage 2 for the one setting that compares the base
model with the prior) and evaluate, as subflows, on its own storage root linked to the shared shards and FID
references. A setting whose done marker matches its config and data is reused, not rerun. MLflow (experiment
`<tracking.experiment>-study`, models `<tracking.model_prefix>-study-*`, so nothing reaches the pipeline's
registry): one parent run `study` with a child run per setting, the stage runs nested under it, and the report and
plots as artefacts of the parent. The report: `<storage.root>/reports/study.md`.

Run: `python -m flows.study [--quick] [--params params.yaml] [--set section.key=value ...]`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.settings import temporary_settings

from flows._common import flow_run_lineage, load, publish_summary, summary_markdown
from flows.pipeline import SUBFLOW_SETTINGS, SUBFLOWS
from ulcore import tracking
from ulcore.config import Config, add_config_args, config_or_exit
from ulcore.study import plan, report


def study_overrides(cfg: Config, overrides: list[str], quick: bool) -> list[str]:
    """What every run of the study adds to the user's overrides: the --quick budget and one MLflow store and
    experiment for all settings (each setting's root would otherwise get a SQLite store of its own)."""
    t = cfg.tracking
    return [*overrides, *(plan.QUICK if quick else ()), f"tracking.uri={tracking.tracking_uri(cfg)}",
            f"tracking.experiment={t.experiment}-study", f"tracking.model_prefix={t.model_prefix}-study"]


def _subflows(stages: tuple[str, ...], params: str, overrides: list[str]) -> None:
    for stage in stages:
        with temporary_settings(updates=SUBFLOW_SETTINGS):
            SUBFLOWS[stage](params=params, overrides=overrides)


def run_setting(setting: plan.Setting, params: str, common: list[str], quick: bool, shared: str) -> report.Outcome:
    """One setting under the study's parent run: its numbers from its marker when up to date, else from its stages.
    Its child run is FAILED when a stage fails; the study goes on with the other settings."""
    base = load(params, common)
    root = plan.setting_root(base, setting, quick)
    overrides = [*common, *setting.overrides, f"storage.root={root}"]
    cfg = load(params, overrides)
    outcome = report.Outcome(setting, root)
    start = time.perf_counter()
    try:
        with tracking.pipeline_run(cfg, stage="study-setting", name=f"study {setting.slug}") as child:
            c = tracking.client(tracking.tracking_uri(cfg))
            c.set_tag(child, "study.setting", setting.slug)
            c.set_tag(child, "study.overrides", json.dumps(setting.overrides))
            plan.link_shared(root, shared)
            done = plan.finished(cfg)
            if done is not None:
                print(f"[study] {setting.slug}: up to date ({root}/{plan.MARKER}): numbers of run "
                      f"{done['mlflow_run_id']}", flush=True)
                outcome.metrics, outcome.run_id, outcome.reused = done["metrics"], done["mlflow_run_id"], True
                c.set_tag(child, "study.reused_from", done["mlflow_run_id"])
            else:
                print(f"[study] {setting.slug}: {' -> '.join(setting.stages)} on {root}", flush=True)
                _subflows(setting.stages, params, overrides)
                outcome.metrics, outcome.run_id = plan.measured(cfg), child
                plan.record(cfg, setting, outcome.metrics, child, time.perf_counter() - start)
            tracking.log_metrics(child, outcome.metrics, step=0)
    except Exception as exc:  # noqa: BLE001 - one failed setting must not hide the others' numbers
        outcome.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
        print(f"[study] {setting.slug} failed: {outcome.error}", flush=True)
    outcome.seconds = time.perf_counter() - start
    return outcome


@flow(name="ul-study", log_prints=True, validate_parameters=True)
def study(params: str = "params.yaml", overrides: list[str] = [], quick: bool = False,  # noqa: B006
          loss_factors: list[float] = list(plan.LOSS_FACTORS),  # noqa: B006
          logsnr_0s: list[float] = list(plan.LOGSNR_0S)) -> dict[str, Any]:  # noqa: B006
    """The paper's trends at tiny scale: the loss factor (UL Table 2), λ(0) (UL Table 6), base model vs prior
    (UL §3.3), with a verdict per trend in reports/study.md."""
    logger = get_run_logger()
    user = load(params, overrides)  # bad params fail here, before any stage starts
    common = study_overrides(user, list(overrides), quick)
    cfg = load(params, common)
    shared = plan.shared_root(cfg)
    settings = plan.settings(cfg, tuple(loss_factors), tuple(logsnr_0s))
    logger.info("study (%s): %d settings: %s", "quick" if quick else "full", len(settings),
                ", ".join(s.slug for s in settings))
    start = time.perf_counter()
    name = f"study {'quick' if quick else 'full'}"
    with flow_run_lineage(), tracking.pipeline_run(cfg, stage="study", name=name) as parent:
        _subflows(plan.SHARED_STAGES, params, [*common, f"storage.root={shared}"])
        outcomes = [run_setting(s, params, common, quick, shared) for s in settings]
        wall = time.perf_counter() - start
        out = Path(user.storage.root) / "reports"
        command = "python -m flows.study" + (" --quick" if quick else "")
        verdicts, written = report.write_report(
            out, outcomes, cfg.stage1.loss_factor,
            title_line=(f"`{command}`: preset {cfg.preset}, {len(settings)} settings, wall time {wall / 60:.1f} min, "
                        f"finished {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC."),
            mlflow_line=(f"MLflow: experiment `{cfg.tracking.experiment}`, parent run `{parent}` with one child run "
                         f"per setting (`{tracking.ui_command(cfg)}`)."))
        for path in written.values():
            tracking.log_artifact(parent, path, "report")
        tracking.log_metrics(parent, {"wall_s": wall, "settings": len(settings),
                                      **{f"reproduced.{i}": float(x.reproduced) for i, x in enumerate(verdicts)}})
        for verdict in verdicts:
            print(f"[study] {verdict.claim}: {verdict.text}", flush=True)
    result = {"mlflow_run_id": parent, "report": written[report.REPORT], "wall_s": round(wall, 1),
              "verdicts": [{"claim": x.claim, "reproduced": x.reproduced, "text": x.text} for x in verdicts],
              "settings": {o.setting.slug: ("failed: " + o.error) if o.error else ("reused" if o.reused else "ran")
                           for o in outcomes}}
    publish_summary("study", summary_markdown("study", {**result, "markdown": Path(result["report"]).read_text()},
                                              [], cfg))
    failed = [o.setting.slug for o in outcomes if o.error]
    if failed:
        raise RuntimeError(f"study: settings {', '.join(failed)} failed (their errors are in {result['report']}); "
                           "rerun the same command to retry them, the finished ones are reused")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.study", description=__doc__.splitlines()[0])
    add_config_args(parser)
    parser.add_argument("--quick", action="store_true", help="a short version: stage 1 and stage 2 at a quarter of "
                        "the demo's length, evaluation on 100 samples with 16 steps")
    parser.add_argument("--loss-factors", type=float, nargs="+", default=list(plan.LOSS_FACTORS), metavar="C_LF",
                        help=f"the c_lf sweep at λ(0) = 5 (default: {' '.join(map(str, plan.LOSS_FACTORS))})")
    parser.add_argument("--logsnr-0s", type=float, nargs="+", default=list(plan.LOGSNR_0S), metavar="LAMBDA0",
                        help="λ(0)s at the config's c_lf; the first is the sweep's (default: 5 10)")
    args = parser.parse_args(argv)
    config_or_exit(args.params, args.overrides)
    state = study(params=args.params, overrides=args.overrides, quick=args.quick, loss_factors=args.loss_factors,
                  logsnr_0s=args.logsnr_0s, return_state=True)
    if not state.is_completed():
        print(f"error: the study finished in state {state.type.value}: {state.message}", file=sys.stderr)
        raise SystemExit(1)
    result = state.result()
    print("\n".join(["", f"report: {result['report']}", *(f"- {x['claim']}: {x['text']}" for x in result["verdicts"]),
                     f"wall time {result['wall_s'] / 60:.1f} min"]))


if __name__ == "__main__":
    main()
