"""What people look at after an evaluation: loss curves and the rate-distortion plot (image grids: ulcore.images).

Every plot is written twice: a CSV for `dvc plots` (one row per point, plain columns) and a PNG for MLflow and
humans. Loss curves come from the MLflow metric history of the latest stage1 / stage2 runs of the experiment;
the rate-distortion plot puts every evaluate run of the experiment on bits/pixel vs PSNR and vs FID.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

LOSS_HINTS = ("loss", "elbo", "bits", "bpp", "nats", "psnr")  # metric keys whose history is drawn as a curve
LOG_SCALE_DECADES = 2.0  # a panel whose positive values span more than this many decades gets a log axis


def write_csv(path: str | Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})


# ---------------------------------------------------------------------------------------------- MLflow queries


def _experiment_runs(client: Any, experiment: str) -> list[Any]:
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return list(client.search_runs([exp.experiment_id], "", order_by=["attributes.start_time DESC"],
                                   max_results=1000))


def loss_histories(client: Any, experiment: str, stages: tuple[str, ...] = ("stage1", "stage2")) -> list[dict]:
    """Rows {stage, run_id, key, step, value} of loss-like metrics of the latest finished run of each stage."""
    rows: list[dict] = []
    runs = _experiment_runs(client, experiment)
    for stage in stages:
        run = next((r for r in runs if r.data.tags.get("stage") == stage and r.info.status == "FINISHED"), None)
        if run is None:
            run = next((r for r in runs if r.data.tags.get("stage") == stage), None)
        if run is None:
            continue
        for key in sorted(run.data.metrics):
            if key.startswith("final_") or not any(h in key.lower() for h in LOSS_HINTS):
                continue  # final_* are one-point summaries of the run (metrics/<stage>.json has them)
            for m in client.get_metric_history(run.info.run_id, key):
                rows.append({"stage": stage, "run_id": run.info.run_id, "key": key, "step": m.step, "value": m.value})
    rows.sort(key=lambda r: (r["stage"], r["key"], r["step"]))
    return rows


def rate_distortion_points(client: Any, experiment: str, current: dict | None = None) -> list[dict]:
    """One row per evaluate run: bits/pixel (prior and base), PSNR, gFID, rFID, plus the run's loss factor."""
    rows = []
    for run in _experiment_runs(client, experiment):
        if run.data.tags.get("stage") != "evaluate":
            continue
        m = run.data.metrics
        if "psnr" not in m and "gfid" not in m:
            continue
        rows.append({"run_id": run.info.run_id, "loss_factor": run.data.params.get("stage1.loss_factor"),
                     **{k: m.get(k) for k in ("bits_per_pixel_prior", "bits_per_pixel_base", "psnr", "ssim",
                                              "gfid", "rfid")}})
    if current and not any(r["run_id"] == current.get("run_id") for r in rows):
        rows.append(current)
    return rows


# ---------------------------------------------------------------------------------------------- plots


def quantity(row: dict) -> str:
    """The panel a metric belongs to: its stage's objective or measure; the held-out EMA value (`ema_` prefix)
    shares the panel of the training value it tracks."""
    return f"{row['stage']} {row['key'].removeprefix('ema_')}"


def loss_figure(rows: list[dict]) -> Any:
    """One panel per quantity (each stage's loss, bits/pixel, PSNR, ...), a line each for the training and the
    held-out EMA value: a nats-per-example loss in the thousands and a bits/pixel below 1 never share an axis.
    Log y where values span > 2 decades."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({quantity(r) for r in rows}, key=lambda q: (q.split()[0], not q.endswith(" loss"), q))
    columns = min(3, len(names))
    grid_rows = math.ceil(len(names) / columns)
    fig, axes = plt.subplots(grid_rows, columns, figsize=(5 * columns, 3.6 * grid_rows), squeeze=False)
    for ax in axes.flat[len(names):]:
        fig.delaxes(ax)
    for ax, name in zip(axes.flat, names):
        values = []
        for key in sorted({r["key"] for r in rows if quantity(r) == name}):
            pts = [(r["step"], r["value"]) for r in rows if quantity(r) == name and r["key"] == key]
            values += [v for _, v in pts]
            label = "held-out EMA" if key.startswith("ema_") else "train"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if len(pts) < 20 else None, ms=3,
                    label=label)
        positive = [v for v in values if v > 0 and math.isfinite(v)]
        if len(positive) == len(values) and positive and math.log10(max(positive) / min(positive)) > LOG_SCALE_DECADES:
            ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("samples seen")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_losses(rows: list[dict], png: str | Path) -> bool:
    """Write loss_figure(rows) as a PNG; False (no file) when there is no history."""
    if not rows:
        return False
    import matplotlib.pyplot as plt

    fig = loss_figure(rows)
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return True


def plot_rate_distortion(rows: list[dict], png: str | Path) -> bool:
    """bits/pixel (x) against PSNR and against FID (y), one point per evaluate run."""
    usable = [r for r in rows if r.get("bits_per_pixel_prior") is not None]
    if not usable:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for ax, keys, label in ((a, ("psnr",), "PSNR (dB)"), (b, ("gfid", "rfid"), "FID")):
        for key in keys:
            pts = [(float(r["bits_per_pixel_prior"]), float(r[key])) for r in usable if r.get(key) is not None]
            if pts:
                ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=key)
        ax.set_xlabel("bits/pixel (stage-1 prior bound)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    a.set_title("rate vs distortion")
    b.set_title("rate vs FID")
    fig.tight_layout()
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return True


def write_reports(client: Any, experiment: str, out_dir: str | Path, current: dict | None = None) -> dict[str, str]:
    """Write plots/{losses.csv,loss_curves.png,rate_distortion.csv,rate_distortion.png}; returns name -> path."""
    out = Path(out_dir)
    written: dict[str, str] = {}
    losses = loss_histories(client, experiment)
    write_csv(out / "losses.csv", losses, ["stage", "key", "step", "value", "run_id"])
    written["losses.csv"] = str(out / "losses.csv")
    if plot_losses(losses, out / "loss_curves.png"):
        written["loss_curves.png"] = str(out / "loss_curves.png")
    points = rate_distortion_points(client, experiment, current)
    write_csv(out / "rate_distortion.csv", points,
              ["run_id", "loss_factor", "bits_per_pixel_prior", "bits_per_pixel_base", "psnr", "ssim", "gfid", "rfid"])
    written["rate_distortion.csv"] = str(out / "rate_distortion.csv")
    if plot_rate_distortion(points, out / "rate_distortion.png"):
        written["rate_distortion.png"] = str(out / "rate_distortion.png")
    return written


__all__ = ["write_csv", "loss_histories", "rate_distortion_points", "quantity", "loss_figure", "plot_losses",
           "plot_rate_distortion", "write_reports"]
