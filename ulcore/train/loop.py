"""One trainer for both stages: a Ray Train TorchTrainer worker loop (DDP: gloo on CPU, NCCL on GPU).

A stage is a `StageSpec` (what to build, which data, how to monitor and export); everything else — AdamW with
warm-up, gradient clipping, EMA, the NaN/Inf guard, progress in samples seen, checkpoints and resume — lives here
once. Resume is rerunning the same command: a fresh driver finds the latest intact checkpoint whose config digest
matches (checkpoint.latest_checkpoint). The driver also retries an attempt that lost a worker or a node, up to
`ray.max_failures` times, from that same checkpoint; an error a retry cannot fix (ulcore.errors: divergence, bad
params, corrupt checkpoint or data) ends the run at once with its own message. Ray's FailureConfig cannot tell
the two apart (it retries every worker error), so Ray itself is told never to retry.
"""

from __future__ import annotations

import dataclasses
import resource
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ulcore import layout, storage, tracking
from ulcore.config import Config, TrainConfig, check_model_matches_data, config_from_dict
from ulcore.data.shards import content_digest
from ulcore.errors import first_non_retryable
from ulcore.models import export_modules
from ulcore.runtime import autocast, ensure_ray, requested_address, resolve_precision
from ulcore.train.checkpoint import META_FILE, Progress, latest_checkpoint, load_state, materialize, save_state
from ulcore.train.clipping import GradClipper
from ulcore.train.ema import EMA
from ulcore.train import warm_start

Batch = dict[str, Any]


@dataclass(frozen=True)
class StageSpec:
    """What makes a training stage different from another; the loop below is shared."""

    name: str  # "stage1" | "stage2": also the params section with the TrainConfig
    build: Callable[[Config], nn.Module]  # the objective: forward(batch, generator) -> its terms dataclass
    batches: Callable[[Config, int, int, int, int], Iterator[Batch]]  # (cfg, per-rank batch, rank, world, seed)
    monitor: Callable[[Config, nn.Module, int, str, str], dict[str, float]]  # rank 0, EMA objective -> metrics
    sections: tuple[str, ...]  # params sections whose change invalidates checkpoints and exports

    def train_config(self, cfg: Config) -> TrainConfig:
        return getattr(cfg, self.name)


def named_terms(terms: Any) -> dict[str, torch.Tensor]:
    """`loss` and every per-example term of an objective's forward (a dataclass with a `loss`), as logged."""
    return {"loss": terms.loss, **vars(terms)}


# Keys that change how a step is computed, not what it computes: switching activation checkpointing on after an
# out-of-memory error, or allowing an unreadable shard after CorruptDataError, must resume the run, not start anew.
EXECUTION_ONLY_KEYS = ("activation_checkpointing", "max_bad_shards", "max_bad_samples")
DATA_ERROR_KEYS = ("bad_shards", "bad_samples")  # what the readers skipped (loaders.ReadErrors), summed over ranks
# `init_from` counts as what it resolved to (the champion versions, or nothing for a cold start), not as written
INIT_KEYS = ("init_from",)


def run_digest(cfg: Config, spec: StageSpec, inputs_digest: str, warm: warm_start.WarmStart | None = None) -> str:
    """Identity of a training run: the sections it depends on, a digest of its input data and, when warm-started,
    the champion versions it starts from (a cold run's identity does not mention them)."""
    relevant = {s: {k: v for k, v in cfg.to_dict()[s].items() if k not in EXECUTION_ONLY_KEYS + INIT_KEYS}
                for s in spec.sections}
    doc = {"params": relevant, "inputs": inputs_digest}
    if warm is not None:
        doc["warm_start"] = warm.identity()
    return layout.digest(doc)


def lr_at(samples: int, t: TrainConfig) -> float:
    """The LR multiplier of the step that starts at `samples`: linear warm-up to the peak over `warmup_samples`,
    then constant (edm2 keeps LR flat for short runs), then, with `decay_fraction`, a linear cool-down over that
    fraction of the samples after the warm-up, D of them: the step starting k samples before the end trains at k / D
    (the last one above zero)."""
    warm = min(1.0, (samples + t.batch_size) / t.warmup_samples) if t.warmup_samples else 1.0
    decay = t.decay_fraction * (t.total_samples - t.warmup_samples)
    return min(warm, (t.total_samples - samples) / decay) if decay else warm


def step_generator(seed: int, rank: int, step: int, device: torch.device | str = "cpu") -> torch.Generator:
    """Per-step randomness from (seed, rank, step): identical after a resume, distinct across ranks. On the nets'
    device: drawing a step's noise on the CPU and copying it over took 11 % of an imagenet512 stage-1 step on an
    H200 (measured, benchmarks/step.py). CUDA and CPU generators give different streams for the same seed, so a
    run resumed on the other kind of device continues with other (equally valid) noise."""
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + rank) * 1_000_003 + step)


def _all_finite(loss: torch.Tensor, world: int) -> bool:
    """Every rank must agree to skip a step, or DDP's all-reduce would deadlock."""
    flag = torch.tensor([float(torch.isfinite(loss).all())], device=loss.device)
    if world > 1:
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item() == 1.0)


def _data_errors(batch: Batch, world: int, device: torch.device) -> dict[str, int]:
    """The readers' skipped shards and samples so far, summed over ranks (every rank calls this at the same step)."""
    counts = torch.tensor([float(batch.get(k, 0)) for k in DATA_ERROR_KEYS], device=device)
    if world > 1:
        torch.distributed.all_reduce(counts, op=torch.distributed.ReduceOp.SUM)
    return {k: int(v) for k, v in zip(DATA_ERROR_KEYS, counts.tolist(), strict=True)}


def _status(stage: str, samples: int, total: int, metrics: dict[str, float], rate: float) -> str:
    """One status line with a progress bar, printed by rank 0 and forwarded to the driver by Ray."""
    frac = samples / total
    bar = "#" * int(frac * 20) + "." * (20 - int(frac * 20))
    eta = (total - samples) / rate if rate > 0 else float("nan")
    shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items()
                     if k in ("loss", "bits_per_pixel", "ema_psnr", "ema_bits_per_pixel")
                     or (k in DATA_ERROR_KEYS and v))
    return f"[{stage}] [{bar}] {samples}/{total} samples {rate:.0f}/s eta {eta:.0f}s {shown}"


def worker_loop(loop_config: dict[str, Any]) -> None:
    """Ray Train worker: build, restore, train to `total_samples`, report metrics and checkpoints."""
    import ray
    import ray.train
    import ray.train.torch

    cfg = config_from_dict(loop_config["config"])
    if not storage.is_s3(cfg.storage.root):  # Ray workers run in their own folder: resolve against the driver's
        cfg = dataclasses.replace(cfg, storage=dataclasses.replace(
            cfg.storage, root=str(Path(loop_config["driver_cwd"], cfg.storage.root).resolve())))
    spec: StageSpec = loop_config["spec"]  # pickled by reference: its functions and classes are module-level

    # Build: nets, EMA, optimiser, LR schedule and clipper, identical on every rank.
    t = spec.train_config(cfg)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    print(f"[{spec.name}] rank {rank}/{world} on Ray node {ray.get_runtime_context().get_node_id()}",
          flush=True)
    device = ray.train.torch.get_device()
    precision = resolve_precision(t.precision, device)
    torch.manual_seed(t.seed)  # identical initial weights on every rank
    objective = spec.build(cfg).to(device)
    resume_uri = loop_config.get("resume_from")  # the driver's pick, checked intact (not Ray's newest, unchecked)
    warm: warm_start.WarmStart | None = loop_config.get("warm_start")
    if warm is not None and not resume_uri:  # a checkpoint of this run wins: it was warm-started already
        warm_start.initialise(objective, warm, cfg, loop_config["tracking_uri"])
        if rank == 0:
            print(f"[{spec.name}] initialised from {warm.describe()}", flush=True)
    ema = EMA(objective, t.ema_halflife_samples)  # made from the initialised nets: equal to them
    # fused: one kernel for every tensor (tiny preset on the CPU: 1.6 ms a step instead of 10.2 ms, same update)
    optimizer = torch.optim.AdamW(objective.parameters(), lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay,
                                  fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step * t.batch_size, t))
    clipper = GradClipper(t.grad_clip_mode, t.grad_clip)
    progress = Progress(samples=0, step=0)

    # Resume from the checkpoint the driver picked.
    if resume_uri:
        with tempfile.TemporaryDirectory() as tmp:
            state = load_state(materialize(resume_uri, Path(tmp)))
        objective.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        if "grad_clip" in state:  # checkpoints written before relative clipping start its running norm afresh
            clipper.load_state_dict(state["grad_clip"])
        progress = Progress(samples=int(state["samples"]), step=int(state["step"]), bad_steps=int(state["bad_steps"]))
        if rank == 0:
            print(f"[{spec.name}] resumed at {progress.samples} samples (step {progress.step})", flush=True)

    # Wrap for DDP; open the data at the resumed position.
    model = ray.train.torch.prepare_model(objective) if world > 1 else objective
    per_rank = t.batch_size // world
    data_seed = (t.seed * 1_000_003 + progress.samples) % 2**31  # a fresh, reproducible stream after each resume
    batches = spec.batches(cfg, per_rank, rank, world, data_seed)
    run_id, uri = loop_config.get("mlflow_run_id"), loop_config.get("tracking_uri")
    sums: dict[str, float] = {}
    count, tic, first_step = 0, time.perf_counter(), progress.step
    while progress.samples < t.total_samples:
        # Forward: the per-example terms, reduced once here.
        batch = next(batches)
        gen = step_generator(t.seed, rank, progress.step, device)
        with autocast(precision, device):
            terms = named_terms(model({k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}, gen))
        loss = terms["loss"].mean()

        # Guard: skip a non-finite step on every rank; stop after max_bad_steps in a row.
        if not _all_finite(loss, world):
            progress = Progress(progress.samples + t.batch_size, progress.step + 1, progress.bad_steps + 1)
            if rank == 0:
                print(f"[{spec.name}] non-finite loss at step {progress.step}: skipped "
                      f"({progress.bad_steps}/{t.max_bad_steps})", flush=True)
            if progress.bad_steps >= t.max_bad_steps:
                raise FloatingPointError(f"{spec.name}: {progress.bad_steps} consecutive non-finite losses; "
                                         f"lower {spec.name}.lr or check the data")
            optimizer.zero_grad(set_to_none=True)
            continue

        # Step: backward, clip, AdamW, LR schedule, EMA.
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm, clipped = clipper.clip_(objective.parameters())  # DDP: the same all-reduced norm on every rank
        optimizer.step()
        scheduler.step()
        ema.update(objective, t.batch_size)
        progress = Progress(progress.samples + t.batch_size, progress.step + 1, 0)
        for key, value in terms.items():
            sums[key] = sums.get(key, 0.0) + float(value.detach().float().mean())
        sums["grad_norm"] = sums.get("grad_norm", 0.0) + grad_norm
        sums["clip_fraction"] = sums.get("clip_fraction", 0.0) + float(clipped)  # share of the interval's steps
        count += 1

        # Metrics: interval means on every rank, EMA monitoring at checkpoints on rank 0.
        at_log = progress.samples % t.log_every_samples == 0 or progress.samples >= t.total_samples
        at_ckpt = progress.samples % t.ckpt_every_samples == 0 or progress.samples >= t.total_samples
        if not (at_log or at_ckpt):
            continue
        rate = count * t.batch_size / max(time.perf_counter() - tic, 1e-9)
        metrics = {k: v / max(count, 1) for k, v in sums.items()}
        metrics.update(samples=progress.samples, lr=optimizer.param_groups[0]["lr"], samples_per_s=rate,
                       peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                       **_data_errors(batch, world, loss.device))
        if at_ckpt and rank == 0:
            metrics.update(spec.monitor(cfg, ema.module, progress.samples, run_id, uri))
        if rank == 0:
            print(_status(spec.name, progress.samples, t.total_samples, metrics, rate), flush=True)
            if run_id:
                tracking.log_metrics(run_id, metrics, step=progress.samples, tracking_uri=uri)
        sums, count, tic = {}, 0, time.perf_counter()

        # Checkpoint: rank 0 saves the full training state; every rank reports (Ray Train needs all of them).
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if at_ckpt and rank == 0:
                save_state(Path(tmp), model=objective, ema=ema.module, optimizer=optimizer, scheduler=scheduler,
                           progress=progress, grad_clip=clipper.state_dict(), config_yaml=cfg.to_yaml(),
                           digest=loop_config["digest"])
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)
    if rank == 0:
        print(f"[{spec.name}] finished at {progress.samples} samples: {progress.step - first_step} steps in this run",
              flush=True)


def _check_resources(cfg: Config) -> None:
    """A local cluster cannot grow: fail now, naming the params, instead of waiting forever for workers."""
    import ray

    if requested_address(cfg.ray)[0]:
        return  # a real cluster may autoscale
    have = ray.cluster_resources()
    need_cpu = cfg.ray.num_workers * cfg.ray.cpus_per_worker
    if need_cpu > have.get("CPU", 0) or (cfg.ray.use_gpu and cfg.ray.num_workers > have.get("GPU", 0)):
        raise ValueError(
            f"ray.num_workers = {cfg.ray.num_workers} x ray.cpus_per_worker = {cfg.ray.cpus_per_worker:g}"
            f"{' (+1 GPU each)' if cfg.ray.use_gpu else ''} does not fit the local Ray cluster "
            f"({have.get('CPU', 0):g} CPUs, {have.get('GPU', 0):g} GPUs); lower them or set ray.address")


@dataclass(frozen=True)
class FitResult:
    state_dir: Path  # local folder holding the final state.pt
    metrics: dict[str, Any]  # the last metrics the workers reported ({} when the run was already complete)


def fit(cfg: Config, spec: StageSpec, *, digest: str, run_id: str | None,
        warm: warm_start.WarmStart | None = None) -> FitResult:
    """Driver side: start (or join) Ray, run the TorchTrainer, return a local copy of the final state. `warm`: the
    champion versions a run without a checkpoint starts from (the workers load them from the registry)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from ulcore.train.process_group import BoundTorchConfig

    ensure_ray(cfg.ray)
    _check_resources(cfg)
    t = spec.train_config(cfg)
    ckpt_root = layout.checkpoints(cfg.storage.root)
    run_name = f"{spec.name}-{digest}"
    storage_path = ckpt_root if storage.is_s3(ckpt_root) else str(Path(ckpt_root).resolve())
    local = Path(tempfile.mkdtemp(prefix=f"ul-{spec.name}-final-"))
    for attempt in range(cfg.ray.max_failures + 1):
        resume_from = latest_checkpoint(storage.join(storage_path, run_name), digest)
        if resume_from:
            done = storage.read_json(storage.join(resume_from, META_FILE))["samples"] >= t.total_samples
            print(f"[{spec.name}] found checkpoint {resume_from}: {'already complete' if done else 'resuming'}",
                  flush=True)
            if done:
                return FitResult(materialize(resume_from, local), {})
        trainer = TorchTrainer(
            worker_loop,
            # a local run's process group listens on loopback only; on a cluster, on rank 0's Ray node IP
            torch_config=BoundTorchConfig(bind_address="" if requested_address(cfg.ray)[0] else "127.0.0.1"),
            train_loop_config={"config": cfg.to_dict(), "spec": spec, "digest": digest,
                               "resume_from": resume_from, "warm_start": warm, "mlflow_run_id": run_id,
                               "tracking_uri": tracking.tracking_uri(cfg), "driver_cwd": str(Path.cwd())},
            scaling_config=ray.train.ScalingConfig(
                num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
                resources_per_worker={"CPU": cfg.ray.cpus_per_worker, **({"GPU": 1} if cfg.ray.use_gpu else {})}),
            run_config=ray.train.RunConfig(
                name=run_name, storage_path=storage_path.removeprefix(storage.S3_PREFIX),
                storage_filesystem=storage.arrow_filesystem() if storage.is_s3(storage_path) else None,
                failure_config=ray.train.FailureConfig(max_failures=0),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=t.keep_checkpoints)),
        )
        try:
            result = trainer.fit()
            break
        except ray.train.TrainingFailedError as exc:
            errors = list(getattr(exc, "worker_failures", {}).values())
            fatal = first_non_retryable(errors)
            if fatal is not None:
                raise fatal from None  # the worker's own error and message (its traceback is in the log above)
            if attempt == cfg.ray.max_failures:
                raise
            cause = "; ".join(f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[-1]}"
                              for e in errors) or str(exc)
            print(f"[{spec.name}] attempt {attempt + 1} failed ({cause}): retrying from the latest checkpoint "
                  f"({attempt + 1}/{cfg.ray.max_failures} retries used)", flush=True)
    if result.checkpoint is None:
        raise RuntimeError(f"{spec.name}: training finished without a checkpoint under {storage_path}/{run_name}")
    return FitResult(Path(result.checkpoint.to_directory(str(local))), dict(result.metrics or {}))


def final_monitor(cfg: Config, spec: StageSpec, ema: nn.Module, fitted: FitResult, samples: int,
                  run_id: str | None) -> dict[str, float]:
    """The EMA monitor's numbers at the final checkpoint. Rank 0 computed them for its last report, on the EMA
    weights that checkpoint holds, with the monitor's fixed seeds: reused rather than recomputed (seconds per stage
    on a CPU). Computed here when the fit reported none for these samples (the run was already complete)."""
    reported = {k: float(v) for k, v in fitted.metrics.items() if k.startswith("ema_")}
    if reported and int(fitted.metrics.get("samples", -1)) == samples:
        return reported
    return spec.monitor(cfg, ema, samples, run_id, tracking.tracking_uri(cfg))


def input_digest(uri: str, what: str) -> str:
    """Content hash of a stage's input manifest (without its run statistics: shards.content_digest); a clear
    error when the upstream stage has not run."""
    if not storage.exists(uri):
        raise FileNotFoundError(f"{uri} not found: run the {what} stage first (python -m flows.{what})")
    return content_digest(storage.read_json(uri))


def run_training_stage(cfg: Config, spec: StageSpec, *, inputs: str,
                       export: Callable[[Config, nn.Module], dict[str, nn.Module]],
                       stage1_run: Callable[[Config], str] | None = None) -> dict[str, Any]:
    """Shared driver of stage 1 and stage 2: skip when up to date, else train, export the EMA nets, write
    metrics/<stage>.json, and register the models in MLflow under tracking.candidate_alias (the promote stage
    alone moves tracking.champion_alias). Each version is tagged with its lineage, the stage-1 run its nets come
    from: `stage1_run(cfg)` (stage 2: the run whose encoder made the latents), else this run. With
    `<stage>.init_from = champion` a run without a checkpoint starts from the champion's weights (warm_start)."""
    check_model_matches_data(cfg)
    warm = warm_start.resolve(cfg, spec.name)
    digest = run_digest(cfg, spec, inputs, warm)
    out = layout.model_dir(cfg.storage.root, spec.name)
    metrics_uri = layout.metrics(cfg.storage.root, spec.name)
    done_uri = layout.done_marker(cfg.storage.root, spec.name)
    if layout.is_done(done_uri, digest) and storage.exists(metrics_uri):
        print(f"[{spec.name}] up to date ({out}, digest {digest}): nothing to do", flush=True)
        return {"skipped": True, "models": out, "metrics": storage.read_json(metrics_uri)}
    with tracking.stage_run(cfg, spec.name) as run_id:
        lineage = stage1_run(cfg) if stage1_run else run_id  # before training: a mixed lineage fails at once
        warm_start.announce(cfg, spec.name, warm, run_id, lineage if stage1_run else None)
        started = time.perf_counter()
        fitted = fit(cfg, spec, digest=digest, run_id=run_id, warm=warm)
        state = load_state(fitted.state_dir)
        ema = spec.build(cfg)
        ema.load_state_dict(state["ema"])
        ema.eval()
        # final numbers are the EMA model's on held-out data: metrics/<stage>.json drops the ema_ prefix
        metrics = {k.removeprefix("ema_"): v for k, v in final_monitor(cfg, spec, ema, fitted, int(state["samples"]),
                                                                       run_id).items()}
        metrics.update(samples=int(state["samples"]), steps=int(state["step"]),
                       wall_seconds=time.perf_counter() - started,
                       **{k: int(fitted.metrics.get(k, 0)) for k in DATA_ERROR_KEYS})
        if "grad_clip" in state:  # share of the run's steps whose gradient was clipped
            metrics["clip_fraction"] = state["grad_clip"]["clipped_steps"] / max(int(state["step"]), 1)
        tracking.log_metrics(run_id, {f"final_{k}": v for k, v in metrics.items()}, step=int(state["samples"]))
        files = export_modules(export(cfg, ema), cfg, out)
        versions = {name: tracking.register_model(run_id, f"{cfg.tracking.model_prefix}-{name}",
                                                  {"weights": path}, cfg.tracking.candidate_alias, cfg.to_yaml(),
                                                  tags={tracking.STAGE1_RUN_TAG: lineage,
                                                        **(warm.tags() if warm else {})})
                    for name, path in files.items()}
        metrics_doc = {**metrics, "digest": digest, "mlflow_run_id": run_id}
        storage.write_json(metrics_uri, metrics_doc)
        storage.write_json(done_uri, {"digest": digest, "mlflow_run_id": run_id, "registered": versions,
                                      tracking.STAGE1_RUN_TAG: lineage,
                                      "warm_start": warm.identity() if warm else None})
    table = "\n".join(f"| {k} | {v:.4g} |" for k, v in metrics.items() if isinstance(v, float))
    return {"skipped": False, "models": out, "metrics": metrics_doc, "mlflow_run_id": run_id,
            "markdown": f"## {spec.name}\n\n| metric | value |\n|---|---|\n{table}\n\nModels: `{out}`"}
