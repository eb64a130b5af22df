"""The study's report: a table and a verdict per trend, a rate–distortion and a rate–FID plot across the settings,
written to `reports/study.md` (+ PNGs and a CSV) under the storage root."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ulcore.eval.reports import write_csv
from ulcore.study import verdicts as v
from ulcore import storage
from ulcore.study.plan import LOGSNR_0S, Setting

REPORT = "study.md"
RATE_DISTORTION = "study_rate_distortion.png"
RATE_FID = "study_rate_fid.png"
TABLE = "study.csv"
COLUMNS = ["setting", "loss_factor", "logsnr_0", "bits_per_pixel_prior", "psnr", "ssim", "rfid", "gfid_prior", "gfid",
           "fid_floor", "bits_per_pixel_base", "latent_std", "num_samples", "reused", "mlflow_run_id", "error"]


@dataclass
class Outcome:
    """What one setting gave: its numbers (metrics/eval.json's, see plan.measured) or the error that stopped it."""
    setting: Setting
    root: str
    metrics: dict[str, Any] = field(default_factory=dict)
    run_id: str | None = None  # the MLflow run that measured the numbers
    reused: bool = False  # numbers from an earlier run of the study (the setting's marker matched)
    seconds: float = 0.0
    error: str | None = None

    def get(self, key: str) -> float | None:
        value = self.metrics.get(key)
        return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None

    def row(self) -> dict[str, Any]:
        return {"setting": self.setting.slug, "loss_factor": self.setting.loss_factor,
                "logsnr_0": self.setting.logsnr_0, **{k: self.get(k) for k in COLUMNS if k in self.metrics},
                "reused": self.reused, "mlflow_run_id": self.run_id, "error": self.error}


def _value(outcome: Outcome | None, key: str) -> float | None:
    return outcome.get(key) if outcome else None


def _at(outcomes: list[Outcome], loss_factor: float, logsnr_0: float) -> Outcome | None:
    return next((o for o in outcomes if (o.setting.loss_factor, o.setting.logsnr_0) == (loss_factor, logsnr_0)), None)


def trend_verdicts(outcomes: list[Outcome], reference_loss_factor: float) -> list[v.Verdict]:
    """The three verdicts from the settings' numbers: the c_lf sweep at λ(0) = 5, λ(0) 5 vs 10 at the reference
    c_lf, and the stage-2 setting's base model against its prior."""
    baseline, ablation = LOGSNR_0S
    sweep = [(o.setting.loss_factor, o.get("bits_per_pixel_prior"), o.get("psnr")) for o in outcomes
             if o.setting.logsnr_0 == baseline]
    low, high = _at(outcomes, reference_loss_factor, baseline), _at(outcomes, reference_loss_factor, ablation)
    base = next((o for o in outcomes if o.setting.stage2), None)
    n = base.metrics.get("num_samples") if base else None
    return [v.loss_factor_verdict(sweep),
            v.logsnr_0_verdict(_value(low, "bits_per_pixel_prior"), _value(high, "bits_per_pixel_prior"),
                               _value(low, "psnr"), _value(high, "psnr")),
            v.base_vs_prior_verdict(_value(base, "gfid"), _value(base, "gfid_prior"), num_samples=n)]


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _label(s: Setting) -> str:
    return f"c_lf {s.loss_factor:g}, λ(0) {s.logsnr_0:g}"


def _figure(outcomes: list[Outcome], series: list[tuple[str, str, str]], ylabel: str, title: str, png: Path) -> bool:
    """bits/pixel (x) against each (metric, legend, marker) in `series`, one labelled point per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    drawn = False
    for key, legend, marker in series:  # the settings are named at the first series' points
        pts = [(o.get("bits_per_pixel_prior"), o.get(key), o.setting) for o in outcomes]
        pts = [p for p in pts if p[0] is not None and p[1] is not None]
        if not pts:
            continue
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, s=45, label=legend)
        for x, y, s in pts if not drawn else ():
            ax.annotate(_label(s), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        drawn = True
    if drawn:
        ax.set_xlabel("bits/pixel (stage-1 prior bound)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        png.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(png, dpi=100)
    plt.close(fig)
    return drawn


def _trend_tables(outcomes: list[Outcome], reference_loss_factor: float) -> list[str]:
    lines = ["## Loss factor c_lf at λ(0) = 5 (UL Table 2)", "",
             "| c_lf | bits/pixel | PSNR (dB) | rFID | gFID of prior samples | latent std |",
             "| --- | --- | --- | --- | --- | --- |"]
    for o in sorted((o for o in outcomes if o.setting.logsnr_0 == LOGSNR_0S[0]), key=lambda o: o.setting.loss_factor):
        lines.append(f"| {o.setting.loss_factor:g} | {_fmt(o.get('bits_per_pixel_prior'), '.4f')} | "
                     f"{_fmt(o.get('psnr'), '.2f')} | {_fmt(o.get('rfid'), '.1f')} | "
                     f"{_fmt(o.get('gfid_prior'), '.1f')} | {_fmt(o.get('latent_std'), '.3f')} |")
    lines += ["", f"## λ(0) at c_lf = {reference_loss_factor:g} (UL Table 6, ablation B)", "",
              "| λ(0) | bits/pixel | PSNR (dB) | rFID | latent std |", "| --- | --- | --- | --- | --- |"]
    for o in sorted((o for o in outcomes if o.setting.loss_factor == reference_loss_factor),
                    key=lambda o: o.setting.logsnr_0):
        lines.append(f"| {o.setting.logsnr_0:g} | {_fmt(o.get('bits_per_pixel_prior'), '.4f')} | "
                     f"{_fmt(o.get('psnr'), '.2f')} | {_fmt(o.get('rfid'), '.1f')} | "
                     f"{_fmt(o.get('latent_std'), '.3f')} |")
    base = next((o for o in outcomes if o.setting.stage2), None)
    lines += ["", "## Stage-2 base model against the stage-1 prior (UL §3.3)", ""]
    if base is not None:
        lines += [f"Setting {_label(base.setting)}; both decoded by the same decoder under one protocol "
                  f"(N = {base.metrics.get('num_samples', '–')}).", "",
                  "| samples from | gFID | FID floor (real vs real) |", "| --- | --- | --- |",
                  f"| stage-2 base model | {_fmt(base.get('gfid'), '.1f')} | {_fmt(base.get('fid_floor'), '.1f')} |",
                  f"| stage-1 prior | {_fmt(base.get('gfid_prior'), '.1f')} | {_fmt(base.get('fid_floor'), '.1f')} |"]
    return lines


def write_report(out_dir: str | Path, outcomes: list[Outcome], reference_loss_factor: float, *, title_line: str,
                 mlflow_line: str) -> tuple[list[v.Verdict], dict[str, str]]:
    """reports/study.md (+ study.csv and the two plots); returns the verdicts and name -> path of what it wrote."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    verdicts = trend_verdicts(outcomes, reference_loss_factor)
    written = {TABLE: str(out / TABLE)}
    write_csv(out / TABLE, [o.row() for o in outcomes], COLUMNS)
    if _figure(outcomes, [("psnr", "PSNR", "o")], "PSNR (dB)", "rate vs distortion", out / RATE_DISTORTION):
        written[RATE_DISTORTION] = str(out / RATE_DISTORTION)
    if _figure(outcomes, [("rfid", "rFID (reconstructions)", "o"), ("gfid_prior", "gFID (stage-1 prior samples)", "^"),
                          ("gfid", "gFID (stage-2 base model samples)", "*")], "FID", "rate vs FID", out / RATE_FID):
        written[RATE_FID] = str(out / RATE_FID)
    lines = ["# The paper's trends at tiny scale", "", title_line, "", mlflow_line, "",
             "Tiny models, few samples: the directions are what to read, not the paper's values (its numbers are "
             "ImageNet 512² at 50k samples). A difference within the tolerance counts as a tie: "
             f"{v.BITS_TOL:g} bits/pixel, {v.PSNR_TOL:g} dB, {v.FID_TOL:g} FID.", "", "## Verdicts", ""]
    lines += [f"- {verdict.line}" for verdict in verdicts]
    lines += ["", *_trend_tables(outcomes, reference_loss_factor), "", "## Across all settings", ""]
    lines += [f"![{name}]({name})" for name in (RATE_DISTORTION, RATE_FID) if name in written]
    lines += ["", "## Settings", "", "| setting | overrides | storage root | MLflow run | this run |",
              "| --- | --- | --- | --- | --- |"]
    for o in outcomes:
        state = f"failed: {o.error}" if o.error else ("reused" if o.reused else f"ran ({o.seconds:.0f} s)")
        where = os.path.relpath(o.root, out.parent)
        lines.append(f"| {o.setting.slug} | `{' '.join(o.setting.overrides)}` | `{where}` | `{o.run_id or '–'}` | "
                     f"{state} |")
    storage.write_text(str(out / REPORT), "\n".join(lines) + "\n")
    written[REPORT] = str(out / REPORT)
    return verdicts, written


__all__ = ["Outcome", "trend_verdicts", "write_report", "REPORT", "RATE_DISTORTION", "RATE_FID", "TABLE"]
