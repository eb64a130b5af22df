"""Stage 1 through the Ray Jobs path on the loopback cluster (`make cluster`) vs the same stage in process.

    python benchmarks/cluster.py [--cluster-env .cluster/env] [--samples N] [--submissions 3]

Starts its own loopback cluster (infra/cluster.sh, in a temp folder) unless --cluster-env names a running one's env
file. Both runs train the same tiny Stage 1 (two Ray Train workers of one CPU each, the preset's samples unless
--samples) on the same embedded shards: in process on a local Ray instance with a local storage root, and as a Ray
job on the cluster with everything on S3. Prints the overhead ratio (in-process time / jobs time; goal >= 0.9 at
demo scale), the fixed cost of one job submission (a job that does nothing: package, upload, start, wait for the
end), and the CPU it ran on.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ulcore import jobs
from ulcore.config import load_config
from ulcore.data.sharding import run_shard
from ulcore.runtime import free_port_block
from ulcore.train.stage1 import run_stage1

REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "params.yaml"
WORKERS = ["ray.num_workers=2", "ray.cpus_per_worker=1"]


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} CPUs)"
    return "unknown CPU"


def cluster_env(path: Path) -> dict[str, str]:
    out = subprocess.run(["bash", "-c", f"source {path} && env -0"], capture_output=True, timeout=30, check=True)
    return dict(item.split("=", 1) for item in out.stdout.decode().split("\0") if "=" in item)


def start_cluster(folder: Path) -> dict[str, str]:
    base = free_port_block(306)
    ports = {"RAY_NODE_PORT_BASE": base, "RAY_PORT": base + 300, "RAY_DASHBOARD_PORT": base + 301,
             "RAY_CLIENT_PORT": base + 302, "S3_PORT": base + 303, "PG_PORT": base + 304, "MLFLOW_PORT": base + 305}
    env = {**os.environ, **{k: str(v) for k, v in ports.items()}, "CLUSTER_DIR": str(folder),
           "BIN": str(Path(sys.executable).parent)}
    subprocess.run(["bash", "infra/cluster.sh", "up"], cwd=REPO, env=env, check=True, timeout=600,
                   stdout=subprocess.DEVNULL)
    return env


def submission_cost(address: str, n: int) -> float:
    """Median seconds for a job that does nothing, from submit to its end as the submitter sees it."""
    client = jobs.client(address)
    times = []
    for _ in range(n):
        start = time.perf_counter()
        job_id = client.submit_job(entrypoint="python -c pass", runtime_env={"working_dir": str(REPO / "ulcore")})
        jobs.follow(client, job_id, lambda _line: None)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cluster-env", type=Path, default=None, help="env file of a running `make cluster`")
    parser.add_argument("--samples", type=int, default=0, help="stage-1 samples (default: the preset's)")
    parser.add_argument("--submissions", type=int, default=3, help="empty jobs timed for the fixed cost")
    args = parser.parse_args()
    samples = [f"stage1.total_samples={args.samples}"] if args.samples else []
    folder, started = None, {}
    if args.cluster_env:
        env = cluster_env(args.cluster_env)
    else:
        folder = Path(tempfile.mkdtemp(prefix="ulb-", dir="/tmp"))  # short: Ray's socket paths stay < 108 chars
        folder.chmod(0o755)  # PostgreSQL runs as its own account and must enter it
        started = start_cluster(folder)
        env = cluster_env(folder / "env")
    try:
        local_root = tempfile.mkdtemp(prefix="ul-bench-local-")
        local = load_config(PARAMS, [f"storage.root={local_root}", *WORKERS, *samples])
        run_shard(local)
        start = time.perf_counter()
        run_stage1(local)
        in_process = time.perf_counter() - start

        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL"):
            os.environ[key] = env[key]
        flags = env["UL_CLUSTER_ARGS"].replace("--set ", "").split()
        root = next(f for f in flags if f.startswith("storage.root=")).split("=", 1)[1]
        remote = load_config(PARAMS, [*flags, f"storage.root={root}/bench-{int(time.time())}", *WORKERS, *samples])
        jobs.submit_stage(remote, "shard", on_line=lambda _line: None)
        start = time.perf_counter()
        jobs.submit_stage(remote, "stage1", on_line=lambda _line: None)
        through_jobs = time.perf_counter() - start
        fixed = submission_cost(env["RAY_ADDRESS"], args.submissions)
    finally:
        if folder is not None:
            subprocess.run(["bash", "infra/cluster.sh", "down"], cwd=REPO, env=started, timeout=300,
                           stdout=subprocess.DEVNULL)
            shutil.rmtree(folder, ignore_errors=True)
    n = local.stage1.total_samples
    print(f"CPU: {cpu_model()}")
    print(f"stage 1, {n} samples, 2 Ray Train workers x 1 CPU")
    print(f"in process (local Ray, local storage): {in_process:8.1f} s")
    print(f"Ray job on the loopback cluster (S3):  {through_jobs:8.1f} s   ratio {in_process / through_jobs:.3f} "
          f"(goal >= 0.9)")
    print(f"fixed cost of one job submission:      {fixed:8.1f} s (median of {args.submissions} empty jobs)")


if __name__ == "__main__":
    main()
