"""Orchestration overhead: the embedded pipeline through Prefect (`ul` flow, ephemeral API) vs the same stage
functions called directly in one process, and the time of a no-op `dvc repro`.

    python benchmarks/pipeline.py [--set section.key=value ...] [--repeats N]
                                  (smoke scale by default: --full for params.yaml)

Each run happens in a fresh temporary git + DVC copy of the project, so nothing here touches your outputs.
Reports: direct wall time, Prefect wall time, ratio direct/Prefect (target >= 0.9), no-op `dvc repro` (target <= 10 s),
and where the difference goes: each stage's time both ways (through Prefect a stage includes its subflow, its
`dvc status` check and its `dvc commit`) and the rest (process start-up, Prefect's temporary API server, MLflow
parent run, summaries). The CPU seconds of every process each run started (polled twice a second: the driver,
Prefect's server, Ray's services and workers, ffmpeg, ...) show which process the difference runs in.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "flows"))

import flowkit as conftest  # noqa: E402  (project copies and the smoke-scale params)


def _category(proc: psutil.Process, driver: int) -> str:
    """Which part of the system a process belongs to, from its command line."""
    if proc.pid == driver:
        return "driver (stages / flow engine)"
    try:
        cmd = " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return "other"
    for needle, label in (("ray::", "ray workers"), ("default_worker.py", "ray workers"),
                          ("ray/", "ray services (gcs, raylet, dashboard, agents)"), ("uvicorn", "prefect server"),
                          ("prefect", "prefect server"), ("ffmpeg", "ffmpeg"), ("dvc", "dvc")):
        if needle in cmd:
            return label
    return "other"


def _cpu_poller(root: psutil.Process, seen: dict[int, tuple[str, float]], stop: threading.Event) -> None:
    """Record each descendant's latest CPU seconds (user + system) until stopped."""
    while not stop.is_set():
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        for proc in procs:
            try:
                times = proc.cpu_times()
                label = seen[proc.pid][0] if proc.pid in seen else _category(proc, root.pid)
                seen[proc.pid] = (label, times.user + times.system)
            except psutil.NoSuchProcess:
                continue
        stop.wait(0.5)


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, dict[str, float], dict[str, float]]:
    """Wall time of the command, the per-stage seconds it printed on a `STAGE_SECONDS {json}` line, and the CPU
    seconds of its process tree by category."""
    start = time.perf_counter()
    proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: dict[int, tuple[str, float]] = {}
    stop = threading.Event()
    poller = threading.Thread(target=_cpu_poller, args=(psutil.Process(proc.pid), seen, stop), daemon=True)
    poller.start()
    try:
        stdout, stderr = proc.communicate(timeout=3600)
    finally:
        stop.set()
        poller.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed (rc {proc.returncode}):\n{stdout[-2000:]}\n{stderr[-3000:]}")
    lines = [line for line in stdout.splitlines() if line.startswith("STAGE_SECONDS ")]
    cpu: dict[str, float] = defaultdict(float)
    for label, seconds in seen.values():
        cpu[label] += seconds
    return time.perf_counter() - start, json.loads(lines[-1].split(" ", 1)[1]) if lines else {}, dict(cpu)


DIRECT = """
import json, time
from ulcore.config import load_config
from ulcore.stages import STAGES
cfg = load_config("params.yaml")
seconds = {}
for stage in STAGES:
    start = time.perf_counter()
    stage.run(cfg)
    seconds[stage.name] = time.perf_counter() - start
print("STAGE_SECONDS", json.dumps(seconds))
"""

# What `python -m flows.pipeline` runs, plus printing the per-stage seconds the flow returns.
THROUGH_PREFECT = """
import json
from flows.pipeline import ul
from flows._common import STAGES
result = ul(params="params.yaml", overrides=[])
print("STAGE_SECONDS", json.dumps({stage: result[stage + "_s"] for stage in STAGES}))
"""


def _median_table(runs: list[dict[str, float]]) -> dict[str, float]:
    """Per key, the median over the runs (a key missing from a run counts as 0)."""
    keys = dict.fromkeys(k for run in runs for k in run)
    return {k: statistics.median(run.get(k, 0.0) for run in runs) for k in keys}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--full", action="store_true", help="use the repository's params.yaml instead of smoke scale")
    parser.add_argument("--repeats", type=int, default=1,
                        help="direct and Prefect runs, interleaved, each in a fresh copy; tables show medians "
                             "(one run of the embedded pipeline varies by ~4 %% from the next on 2 cores)")
    args = parser.parse_args()
    params = (REPO / "params.yaml").read_text() if args.full else conftest.smoke_params_yaml(args.overrides)
    py = sys.executable
    walls: dict[str, list[float]] = {"direct": [], "prefect": []}
    stages: dict[str, list[dict[str, float]]] = {"direct": [], "prefect": []}
    cpus: dict[str, list[dict[str, float]]] = {"direct": [], "prefect": []}
    with tempfile.TemporaryDirectory(prefix="ul-bench-") as tmp:
        env = conftest.env_for(Path(tmp), PREFECT_HOME=str(Path(tmp) / "prefect-home"))
        env.pop("MLFLOW_TRACKING_URI", None)
        for repeat in range(args.repeats):
            for way, code in (("direct", DIRECT), ("prefect", THROUGH_PREFECT)):
                project = conftest.copy_project(Path(tmp) / f"{way}-{repeat}", params)
                if way == "prefect" and repeat == 0:  # warm the Prefect home once (its database), as later runs are
                    _run([py, "-c", "import flows; from prefect import flow\n@flow\ndef w(): pass\nw()"], project, env)
                wall, per_stage, cpu = _run([py, "-c", code], project, env)
                walls[way].append(wall)
                stages[way].append(per_stage)
                cpus[way].append(cpu)
                print(f"run {repeat + 1}/{args.repeats} {way}: {wall:.1f} s", flush=True)
        dvc = str(Path(py).parent / "dvc")
        noop_s, _, _ = _run([dvc, "repro"], project, env)  # the ul flow recorded every stage: nothing to run
    direct_s, prefect_s = statistics.median(walls["direct"]), statistics.median(walls["prefect"])
    direct_stages, prefect_stages = _median_table(stages["direct"]), _median_table(stages["prefect"])
    direct_cpu, prefect_cpu = _median_table(cpus["direct"]), _median_table(cpus["prefect"])
    ratio = direct_s / prefect_s
    median = " (medians)" if args.repeats > 1 else ""
    print(f"| stage{median} | direct s | through Prefect s (incl. dvc status + commit) |")
    print("| --- | --- | --- |")
    for stage, seconds in direct_stages.items():
        print(f"| {stage} | {seconds:.1f} | {prefect_stages.get(stage, float('nan')):.1f} |")
    print(f"| rest of the process | {direct_s - sum(direct_stages.values()):.1f} "
          f"| {prefect_s - sum(prefect_stages.values()):.1f} |")
    print()
    print(f"| process (CPU seconds, user + system){median} | direct | through Prefect |")
    print("| --- | --- | --- |")
    for label in sorted(set(direct_cpu) | set(prefect_cpu), key=lambda k: -prefect_cpu.get(k, 0.0)):
        print(f"| {label} | {direct_cpu.get(label, 0.0):.1f} | {prefect_cpu.get(label, 0.0):.1f} |")
    print(f"| all | {sum(direct_cpu.values()):.1f} | {sum(prefect_cpu.values()):.1f} |")
    print()
    print("| measure | value | target |")
    print("| --- | --- | --- |")
    print(f"| stage functions called directly{median} | {direct_s:.1f} s | |")
    print(f"| `ul` flow through Prefect (ephemeral, incl. DVC recording){median} | {prefect_s:.1f} s | |")
    print(f"| ratio direct / Prefect{median} | {ratio:.3f} | >= 0.9 |")
    if args.repeats > 1:
        pairs = ", ".join(f"{d / p:.3f}" for d, p in zip(walls["direct"], walls["prefect"]))
        print(f"| ratio of each interleaved pair | {pairs} | |")
    print(f"| no-op `dvc repro` after the flow | {noop_s:.1f} s | <= 10 s |")
    print(f"(cpus: {os.cpu_count()}, python {sys.version.split()[0]})")


if __name__ == "__main__":
    main()
