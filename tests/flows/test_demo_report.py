"""The end of `make demo`: the metric table and where the grids are, from what the stages wrote (local and S3)."""

from __future__ import annotations

from flows.demo import read_metrics, report
from ulcore import storage
from ulcore.config import load_config


def _write_run(root: str) -> None:
    storage.write_json(f"{root}/metrics/eval.json", {"gfid": 375.25, "psnr": 18.2, "protocol": {"n": 200}})
    storage.write_json(f"{root}/metrics/promotion.json", {"promoted": True, "reason": "first promotion",
                                                          "candidate": {"gfid": 375.25}, "champion": None})
    storage.write_bytes(f"{root}/outputs/samples.png", b"\x89PNG")


def test_demo_report_lists_every_metric_and_the_grids(tmp_path):
    root = str(tmp_path)
    _write_run(root)
    cfg = load_config(None, [f"storage.root={root}"])
    assert read_metrics(cfg) == {
        "eval.json": {"gfid": 375.25, "psnr": 18.2, "protocol.n": 200},
        "promotion.json": {"promoted": True, "reason": "first promotion", "candidate.gfid": 375.25, "champion": None}}
    text = report(cfg, {"dvc": "versions recorded in dvc.lock", "dvc_push": "no DVC remote configured",
                        "mlflow_run_id": "abc123"})
    assert "eval.json" in text and "375.25" in text and "promotion.json" in text
    assert f"sample grids (1): {tmp_path / 'outputs'}" in text and "MLflow pipeline run: abc123" in text


def test_demo_report_reads_metrics_on_s3(s3_bucket, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an S3 root's MLflow store defaults to ./mlflow.db: not the checkout's
    root = f"{s3_bucket}/demo"
    _write_run(root)
    cfg = load_config(None, [f"storage.root={root}"])
    assert read_metrics(cfg)["eval.json"] == {"gfid": 375.25, "psnr": 18.2, "protocol.n": 200}
    assert f"sample grids: {root}/outputs/" in report(cfg, None)
