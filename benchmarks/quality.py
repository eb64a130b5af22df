"""Quality per CPU-second: the tiny UL pipeline against a bare pixel-space diffusion model on the same budget.

    python benchmarks/quality.py [--samples 1000] [--quick] [--root DIR]

Both see the same embedded training images and are judged by the same FID network against the same reference
statistics (the `reference` stage's, `eval.reference_samples` = N training images), on N generated samples.

- UL: the project's stages in this process as the demo runs them (`tiny` preset: stage 1, encode, stage 2 through
  Ray Train), then its own `evaluate` stage at N samples (gFID, rFID, PSNR, latent bits/pixel, FID floor, chroma).
- Baseline: written here, not in the library: a class-conditional pixel-space U-Net (v-prediction on the decoder's
  cosine log-SNR schedule, AdamW, EMA), sampled with the same ancestral sampler and step count as UL's decoder.

The budget is CPU-seconds, interleaved: after UL's stage 1 the baseline trains for the CPU-seconds stage 1 took,
after UL's encode + stage 2 for theirs. CPU-seconds are those of this run's processes only (`RunCPU`: this process,
its local Ray instance and Ray's workers; Ray's idle daemons count against the baseline's phases too), with OpenMP
threads that sleep instead of spinning (`passive_openmp`), so other work on the machine changes the wall time, not the
comparison.
Prints both metric sets, the ratio UL gFID / baseline gFID (goal <= 1.0: UL's latents make generation cheaper for
the same quality) and the CPU it ran on.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ulcore import layout, storage
from ulcore.config import Config, load_config
from ulcore.data.loaders import shard_uris, to_uint8
from ulcore.diffusion.losses import diffuse, v_from_x, x_from_v
from ulcore.diffusion.sampling import PerSampleNoise, SAMPLERS, logsnr_grid, sample_seeds
from ulcore.diffusion.schedule import alpha_sigma, decoder_schedule
from ulcore.eval.fid import RunningStats, fid_from_stats
from ulcore.eval.image_metrics import chroma
from ulcore.eval.inception import FidFeatureExtractor, resolve_fid_weights
from ulcore.eval.reference import Reference, splits
from ulcore.stages import run_stage
from ulcore.train import stage1

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
TOKEN = "UL_QUALITY_RUN"  # environment variable marking this run's processes
QUICK = ["stage1.total_samples=2048", "stage2.total_samples=1024", "stage1.log_every_samples=512",
         "stage1.ckpt_every_samples=1024", "stage2.log_every_samples=512", "stage2.ckpt_every_samples=512"]


class RunCPU:
    """CPU-seconds of every process of this run: this one, the local Ray instance it starts and Ray's workers, found
    by a token in their environment (inherited from this process) and sampled every 0.5 s from /proc; a process's
    last sample stands after it exits (at most 0.5 s of it unseen). Other work on the machine does not count, nor
    does the niceness Ray gives its workers."""

    def __init__(self) -> None:
        self.token = f"{TOKEN}={uuid.uuid4().hex}".encode()
        os.environ[TOKEN] = self.token.split(b"=", 1)[1].decode()
        self.tick, self.me = os.sysconf("SC_CLK_TCK"), str(os.getpid())
        self.seen: dict[tuple[str, str], float] = {}
        self.lock = threading.Lock()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            self.sample()
            time.sleep(0.5)

    def sample(self) -> None:
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:  # /proc/<pid>/environ is the environment a process started with: this one's lacks the token
                if proc.name != self.me and self.token not in (proc / "environ").read_bytes().split(b"\0"):
                    continue
                fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # gone, or not ours to read
                continue
            with self.lock:  # utime + stime, keyed by (pid, start time): a reused pid is another process
                self.seen[(proc.name, fields[19])] = (int(fields[11]) + int(fields[12])) / self.tick

    def seconds(self) -> float:
        self.sample()
        with self.lock:
            return sum(self.seen.values())


def cpu_model() -> str:
    info = Path("/proc/cpuinfo").read_text()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    native = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    return f"{name}, {os.cpu_count()} CPUs, bf16 {'native (' + ', '.join(native) + ')' if native else 'emulated'}"


# --- the baseline: a plain class-conditional pixel-space U-Net ---------------------------------------------------

class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, emb: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(8, c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb, c_out)
        self.norm2, self.conv2 = nn.GroupNorm(8, c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x))) + self.emb(e)[:, :, None, None]
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class Attention(nn.Module):
    def __init__(self, c: int, heads: int = 4) -> None:
        super().__init__()
        self.norm, self.attn = nn.GroupNorm(8, c), nn.MultiheadAttention(c, heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        t = self.norm(x).flatten(2).transpose(1, 2)
        return x + self.attn(t, t, t, need_weights=False)[0].transpose(1, 2).reshape(b, c, h, w)


class PixelUNet(nn.Module):
    """A patch U-Net: 2x2 patches in and out (pixel (un)shuffle), then 16² -> 8² -> 4² with two residual blocks a
    level and attention at 4², conditioned on λ and the class. Patches make it ~4x cheaper than a U-Net on the
    pixels at this size, so it sees more images in the same CPU time: the strong baseline."""

    def __init__(self, channels: int = 3, widths: tuple[int, ...] = (64, 96, 96), classes: int = 10,
                 emb: int = 128, patch: int = 2) -> None:
        super().__init__()
        self.patch = patch
        channels *= patch * patch
        self.freqs = nn.Parameter(torch.exp(torch.linspace(0, math.log(100), emb // 8)), requires_grad=False)
        self.time = nn.Sequential(nn.Linear(emb // 4, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.label = nn.Embedding(classes, emb)
        self.inp = nn.Conv2d(channels, widths[0], 3, padding=1)
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        c, skips = widths[0], [widths[0]]
        for i, w in enumerate(widths):
            self.down.append(nn.ModuleList([ResBlock(c, w, emb), ResBlock(w, w, emb)]))
            c = w
            skips += [w, w]
            if i < len(widths) - 1:
                self.downsample.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                skips.append(c)
        self.mid1, self.mid_attn, self.mid2 = ResBlock(c, c, emb), Attention(c), ResBlock(c, c, emb)
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for i, w in reversed(list(enumerate(widths))):
            blocks = nn.ModuleList()
            for _ in range(3):  # one per skip of this level: its two blocks' outputs and its input
                blocks.append(ResBlock(c + skips.pop(), w, emb))
                c = w
            self.up.append(blocks)
            if i > 0:
                self.upsample.append(nn.Conv2d(c, c, 3, padding=1))
        self.out = nn.Sequential(nn.GroupNorm(8, c), nn.SiLU(), nn.Conv2d(c, channels, 3, padding=1))

    def forward(self, x: torch.Tensor, logsnr: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        angles = (logsnr[:, None] / 15.0) * self.freqs[None]
        e = self.time(torch.cat([angles.sin(), angles.cos()], dim=1)) + self.label(labels)
        h = self.inp(F.pixel_unshuffle(x, self.patch))
        skips = [h]
        for i, blocks in enumerate(self.down):
            for block in blocks:
                h = block(h, e)
                skips.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
                skips.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, e)), e)
        for i, blocks in enumerate(self.up):
            for block in blocks:
                h = block(torch.cat([h, skips.pop()], dim=1), e)
            if i < len(self.upsample):
                h = self.upsample[i](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return F.pixel_shuffle(self.out(h), self.patch)


class Baseline:
    """The pixel-space model, its optimiser, EMA and data stream; `train_for` continues where it stopped."""

    def __init__(self, cfg: Config, *, lr: float, batch: int, ema_halflife: int) -> None:
        torch.manual_seed(cfg.stage2.seed)
        self.cfg, self.batch = cfg, batch
        self.net = PixelUNet(cfg.model.in_channels, classes=cfg.model.num_classes)
        self.ema = copy.deepcopy(self.net).requires_grad_(False)
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=lr, weight_decay=0.0, fused=True)  # as UL's loop
        self.ema_beta = 0.5 ** (batch / ema_halflife)
        self.schedule = decoder_schedule(cfg.model)
        self.batches = stage1.train_batches(cfg, batch, 0, 1, cfg.stage2.seed)
        self.generator = torch.Generator().manual_seed(cfg.stage2.seed)
        self.samples = 0

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.net.parameters())

    def step(self) -> float:
        batch = next(self.batches)
        x, labels = batch["x"].float() / 127.5 - 1.0, batch["cls"]
        t = torch.rand(x.shape[0], generator=self.generator)
        lam = self.schedule.logsnr(t)
        eps = torch.randn(x.shape, generator=self.generator)
        z = diffuse(x, lam, eps)
        a, s = alpha_sigma(lam)
        loss = F.mse_loss(self.net(z, lam, labels), v_from_x(z, x, a, s))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), 1.0)
        self.opt.step()
        with torch.no_grad():
            for p_ema, p in zip(self.ema.parameters(), self.net.parameters()):
                p_ema.lerp_(p, 1.0 - self.ema_beta)
        self.samples += x.shape[0]
        return loss.item()

    def train_for(self, cpu: RunCPU, cpu_seconds: float) -> float:
        start, loss = cpu.seconds(), float("nan")
        while cpu.seconds() - start < cpu_seconds:
            loss = self.step()
        return loss

    @torch.no_grad()
    def sample(self, labels: torch.Tensor, indices: range, *, steps: int, sampler: str, seed: int) -> torch.Tensor:
        shape = (self.cfg.model.in_channels, self.cfg.data.resolution, self.cfg.data.resolution)
        noise = PerSampleNoise(shape, sample_seeds(seed, indices))
        grid = logsnr_grid(self.schedule, steps)
        model = lambda z, lam: self.ema(z, lam, labels)  # noqa: E731
        z = SAMPLERS[sampler](model, noise(-1), grid, noise)
        lam = grid[-1].expand(z.shape[0])
        a, s = alpha_sigma(lam)
        return x_from_v(z, model(z, lam), a, s).clamp(-1.0, 1.0)


def baseline_metrics(cfg: Config, baseline: Baseline, *, steps: int) -> dict[str, float]:
    """gFID of N class-balanced baseline samples against the UL evaluation's gFID reference statistics, and their
    chroma (the colour greyscale data never has, as eval.json's chroma_samples)."""
    weights = resolve_fid_weights(cfg.eval.fid_weights)
    train_split, _ = splits(cfg)
    reference = Reference(cfg, train_split, shard_uris(cfg, "images", train_split), cfg.eval.reference_samples,
                          weights.sha256)
    if reference.needed:
        raise RuntimeError(f"{layout.fid_ref(cfg.storage.root, reference.key_hash)}: no gFID reference for the "
                           "baseline; the reference stage should have written it")
    extractor, stats, colour = FidFeatureExtractor(weights), RunningStats(), []
    n, b = cfg.eval.num_samples, cfg.eval.batch_size
    labels_all = torch.arange(n) % cfg.model.num_classes
    for start in range(0, n, b):
        labels = labels_all[start:start + b]
        images = baseline.sample(labels, range(start, start + labels.shape[0]), steps=steps,
                                 sampler=cfg.eval.sampler, seed=cfg.eval.seed)
        stats.add(extractor(to_uint8(images)))
        colour.append(chroma(images))
    return {"gfid": fid_from_stats(reference.stats, stats.stats()), "chroma_samples": float(torch.cat(colour).mean())}


def _ul_phase(cfg: Config, cpu: RunCPU, names: tuple[str, ...]) -> float:
    start = cpu.seconds()
    for name in names:
        run_stage(name, cfg)
    return cpu.seconds() - start


def _row(name: str, values: dict, keys: tuple[str, ...]) -> str:
    return f"| {name} | " + " | ".join("n/a" if values.get(k) is None else f"{values[k]:.4g}" for k in keys) + " |"


def passive_openmp() -> None:
    """Rerun this script with OMP_WAIT_POLICY=PASSIVE unless it is set: torch's OpenMP threads then sleep at a
    barrier instead of spinning, so a CPU-second counts work, not waiting for a descheduled peer thread. Spinning
    grows with other load on the machine: with the default policy UL's stage 1 counted 851 CPU-s on a shared machine
    (about 345 with one thread on an idle one). Set before torch loads; Ray's workers inherit it."""
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        os.execv(sys.executable, [sys.executable, *sys.argv])


def main() -> None:
    passive_openmp()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1000, help="generated samples for gFID (N)")
    parser.add_argument("--quick", action="store_true", help="an eighth of the demo's training, N = 200")
    parser.add_argument("--root", default="", help="a fresh storage root (default: a new temp folder)")
    parser.add_argument("--baseline-lr", type=float, default=1e-3)
    parser.add_argument("--baseline-batch", type=int, default=32)
    args = parser.parse_args()
    n = 200 if args.quick else args.samples
    root = args.root or tempfile.mkdtemp(prefix="ul-quality-")
    cfg = load_config(PARAMS, [f"storage.root={root}", f"eval.num_samples={n}", f"eval.reference_samples={n}",
                               *(QUICK if args.quick else [])])
    print(f"CPU: {cpu_model()}; load average {os.getloadavg()[0]:.2f} at start; storage root {root}", flush=True)
    for stage in ("stage1", "stage2"):
        if storage.exists(layout.done_marker(root, stage)):
            raise SystemExit(f"{layout.done_marker(root, stage)}: {stage} already ran under this root, so its "
                             "training would be skipped and cost nothing; give a fresh --root")
    cpu = RunCPU()  # before Ray starts: its processes inherit the token
    for name in ("raw_manifest", "shard", "reference"):  # shared by both: not part of either budget
        run_stage(name, cfg)

    baseline = Baseline(cfg, lr=args.baseline_lr, batch=args.baseline_batch,
                        ema_halflife=cfg.stage2.ema_halflife_samples)
    budget, wall = {}, time.perf_counter()
    budget["stage 1"] = _ul_phase(cfg, cpu, ("stage1",))
    print(f"UL stage 1: {budget['stage 1']:.0f} CPU-s; baseline ({baseline.parameters / 1e6:.2f} M parameters) "
          "trains as long", flush=True)
    loss = baseline.train_for(cpu, budget["stage 1"])
    budget["encode + stage 2"] = _ul_phase(cfg, cpu, ("encode", "stage2"))
    print(f"UL encode + stage 2: {budget['encode + stage 2']:.0f} CPU-s; baseline at {baseline.samples} samples "
          f"(loss {loss:.4f}) trains as long", flush=True)
    loss = baseline.train_for(cpu, budget["encode + stage 2"])
    train_wall = time.perf_counter() - wall
    print(f"baseline: {baseline.samples} samples, final loss {loss:.4f}", flush=True)

    run_stage("evaluate", cfg)
    ul = storage.read_json(layout.metrics(root, "eval"))
    base = baseline_metrics(cfg, baseline, steps=cfg.eval.decoder_steps)
    keys = ("gfid", "rfid", "psnr", "bits_per_pixel_prior", "chroma_samples")
    total = sum(budget.values())
    print(f"\nSame budget: {total:.0f} CPU-s of training each ({train_wall:.0f} s wall for both, interleaved); "
          f"N = {n} samples, FID floor at this N {ul.get('fid_floor', float('nan')):.4g}")
    print("| model | gFID | rFID | PSNR dB | bits/pixel | chroma |\n| --- | --- | --- | --- | --- | --- |")
    print(_row(f"UL tiny ({cfg.stage1.total_samples} + {cfg.stage2.total_samples} samples)", ul, keys))
    print(_row(f"baseline pixel U-Net ({baseline.samples} samples)", base, keys))
    print("(the baseline has no autoencoder: rFID, PSNR and a latent bitrate do not apply; chroma: the samples' mean "
          f"std across colour channels, 0-255, the data's own is {ul.get('chroma_real', float('nan')):.3g})")
    print(f"ratio UL gFID / baseline gFID = {ul['gfid'] / base['gfid']:.3f} (goal <= 1.0) on {cpu_model()}")


if __name__ == "__main__":
    sys.exit(main())
