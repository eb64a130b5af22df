"""The study's report from synthetic outcomes: verdicts, tables, plots, settings (failed ones included)."""

from __future__ import annotations

import csv

from ulcore.study.plan import Setting
from ulcore.study.report import Outcome, trend_verdicts, write_report

NUMBERS = {(1.3, 5.0): (0.02, 14.0), (1.7, 5.0): (0.04, 15.5), (2.1, 5.0): (0.05, 16.2), (3.0, 5.0): (0.08, 17.9),
           (3.0, 10.0): (0.004, 12.1)}


def _outcomes(tmp_path) -> list[Outcome]:
    out = []
    for (lf, l0), (bits, psnr) in NUMBERS.items():
        s = Setting(lf, l0, stage2=(lf, l0) == (3.0, 5.0))
        metrics = {"bits_per_pixel_prior": bits, "psnr": psnr, "rfid": 300 - 10 * psnr, "gfid_prior": 320.0,
                   "num_samples": 100}
        if s.stage2:
            metrics.update(gfid=280.0, fid_floor=90.0)
        out.append(Outcome(s, str(tmp_path / "runs" / s.slug), metrics, run_id=f"run-{s.slug}", seconds=61.0))
    return out


def test_report_has_a_verdict_per_trend_tables_plots_and_the_settings(tmp_path):
    outcomes = _outcomes(tmp_path)
    outcomes[1].reused = True
    verdicts, written = write_report(tmp_path / "reports", outcomes, 3.0, title_line="T", mlflow_line="M")
    assert [v.reproduced for v in verdicts] == [True, True, True]
    text = (tmp_path / "reports" / "study.md").read_text()
    assert all(f"- {v.line}" in text for v in verdicts)
    assert "| 1.7 | 0.0400 | 15.50 | 145.0 | 320.0 | – |" in text  # c_lf table (no latent std given)
    assert "| 10 | 0.0040 | 12.10 | 179.0 | – |" in text  # λ(0) table
    assert "| stage-2 base model | 280.0 | 90.0 |" in text and "| stage-1 prior | 320.0 | 90.0 |" in text
    assert "| clf1.7_lambda5 | `stage1.loss_factor=1.7 model.logsnr_0=5 eval.prior_gfid=true` | " \
           "`runs/clf1.7_lambda5` | `run-clf1.7_lambda5` | reused |" in text
    assert "ran (61 s)" in text and "![study_rate_fid.png](study_rate_fid.png)" in text
    for name in ("study.md", "study.csv", "study_rate_distortion.png", "study_rate_fid.png"):
        assert (tmp_path / "reports" / name).stat().st_size > 0, name
    rows = list(csv.DictReader(open(tmp_path / "reports" / "study.csv")))
    assert [r["setting"] for r in rows] == [o.setting.slug for o in outcomes] and rows[3]["gfid"] == "280.0"


def test_a_failed_setting_is_listed_and_its_trend_is_not_measured(tmp_path):
    outcomes = _outcomes(tmp_path)
    outcomes[4] = Outcome(outcomes[4].setting, outcomes[4].root, error="RuntimeError: stage1 diverged")
    verdicts = trend_verdicts(outcomes, 3.0)
    assert verdicts[0].reproduced and not verdicts[1].reproduced and verdicts[1].text.startswith("not measured")
    write_report(tmp_path / "reports", outcomes, 3.0, title_line="T", mlflow_line="M")
    assert "| failed: RuntimeError: stage1 diverged |" in (tmp_path / "reports" / "study.md").read_text()
