"""The loss / rate-distortion reports read back from a real (SQLite) MLflow store."""

from __future__ import annotations

import csv

from ulcore.eval.reports import loss_figure, write_reports


def test_reports_from_mlflow_history(tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("ul-test", artifact_location=str(tmp_path / "artifacts"))
    s1 = client.create_run(exp, tags={"stage": "stage1"}).info.run_id
    for step in range(0, 5):
        client.log_metric(s1, "loss", 10.0 - step, step=step * 64)
        client.log_metric(s1, "prior_bits", 2.0 + step, step=step * 64)
        client.log_metric(s1, "lr", 1e-3, step=step * 64)
    client.set_terminated(s1)
    for bpp, psnr_value, gfid in ((0.5, 20.0, 80.0), (1.0, 24.0, 60.0)):
        r = client.create_run(exp, tags={"stage": "evaluate"}).info.run_id
        client.log_param(r, "stage1.loss_factor", 1.5)
        for k, v in {"bits_per_pixel_prior": bpp, "psnr": psnr_value, "gfid": gfid, "rfid": gfid / 2}.items():
            client.log_metric(r, k, v)
        client.set_terminated(r)
    written = write_reports(client, "ul-test", tmp_path / "plots",
                            current={"run_id": "now", "bits_per_pixel_prior": 2.0, "psnr": 28.0, "gfid": 40.0})
    assert set(written) == {"losses.csv", "loss_curves.png", "rate_distortion.csv", "rate_distortion.png"}
    losses = list(csv.DictReader(open(written["losses.csv"])))
    assert len(losses) == 10 and {r["key"] for r in losses} == {"loss", "prior_bits"}  # lr is not a loss
    assert [float(r["value"]) for r in losses if r["key"] == "loss"] == [10.0, 9.0, 8.0, 7.0, 6.0]
    rd = list(csv.DictReader(open(written["rate_distortion.csv"])))
    assert sorted(float(r["psnr"]) for r in rd) == [20.0, 24.0, 28.0]
    assert (tmp_path / "plots" / "rate_distortion.png").stat().st_size > 1000


def test_loss_figure_has_one_panel_per_quantity_with_log_scale_over_two_decades():
    """A loss in the thousands and a bits/pixel below 1 on one axis flattened the bits/pixel line at zero."""
    import matplotlib.pyplot as plt

    rows = []
    for i, step in enumerate(range(1024, 8193, 1024)):
        rows += [{"stage": "stage1", "key": "loss", "step": step, "value": 9000.0 / 10 ** (i * 0.5)},  # 3.5 decades
                 {"stage": "stage1", "key": "bits_per_pixel", "step": step, "value": 0.8 - 0.08 * i},
                 {"stage": "stage1", "key": "ema_bits_per_pixel", "step": step, "value": 0.7 - 0.07 * i},
                 {"stage": "stage1", "key": "ema_psnr", "step": step, "value": 10.0 + i},
                 {"stage": "stage2", "key": "loss", "step": step, "value": 400.0 - 10 * i}]
    fig = loss_figure(rows)
    panels = {ax.get_title(): ax for ax in fig.axes}
    assert list(panels) == ["stage1 loss", "stage1 bits_per_pixel", "stage1 psnr", "stage2 loss"]
    assert panels["stage1 loss"].get_yscale() == "log" and panels["stage2 loss"].get_yscale() == "linear"
    assert panels["stage1 bits_per_pixel"].get_yscale() == "linear" and panels["stage1 psnr"].get_yscale() == "linear"
    assert sorted(t.get_text() for t in panels["stage1 bits_per_pixel"].get_legend().get_texts()) == [
        "held-out EMA", "train"]
    low, high = panels["stage1 bits_per_pixel"].get_ylim()
    assert high < 1.0  # the axis is the bits/pixel's own, not the loss's thousands
    plt.close(fig)
