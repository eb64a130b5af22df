"""Training-step throughput, model FLOP utilisation and peak memory, fp32 vs bf16 autocast, on this machine's CPU
or on one CUDA device.

    python benchmarks/step.py [--steps 5] [--threads N] [--device cpu|cuda]

For each setting it times forward+backward+AdamW of a stage's objective (Stage1Objective: encoder, prior and
decoder; Stage2Objective: the base model on latents), counts the model FLOPs of one step (3x the forward FLOPs
from torch's FlopCounterMode; activation recompute is not counted) and divides by a dense-matmul peak measured in
the same run and dtype: MFU = achieved FLOP/s / peak FLOP/s. Steps draw their noise as the training loop does,
from a generator on the nets' device (loop.step_generator); on CUDA each setting is also timed with the noise
drawn on the CPU and copied over (`cpu-noise`, what the loop did before).

CPU settings: the `tiny` preset (32², batch 64), the `tiny-video` preset (batch 2 clips of 8 frames) with its
per-frame convs and with 3×3×3 ones, and the imagenet512 networks at 64² (batch 4). CUDA settings:
`tiny` at batch 256, and the imagenet512 and kinetics600 presets at their per-GPU batch (the global batch over 8
GPUs), with and without activation recompute: the presets' memory notes come from these runs. A setting that
runs out of device memory is reported as such. Figures are ratios measured in one run.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from ulcore.config import load_config
from ulcore.diffusion.sampling import image_shape, latent_shape
from ulcore.nets import count_params, forward_flops
from ulcore.train.loop import step_generator
from ulcore.runtime import autocast, cpu_has_fast_bf16
from ulcore.train.stage1 import Stage1Objective
from ulcore.train.stage2 import Stage2Objective

SMALL_AT_64PX = ["data.resolution=64", "data.root=/unused", "stage1.warmup_samples=0",
                 "stage1.total_samples=4",
                 "stage1.log_every_samples=4", "stage1.ckpt_every_samples=4", "ray.num_workers=1"]
# name -> (stage, preset, overrides, batch, precisions)
CPU_SETTINGS = {
    "tiny": ("stage1", "tiny", ["stage1.batch_size=64"], 64, ("fp32", "bf16")),
    "tiny-video": ("stage1", "tiny-video", [], 2, ("fp32", "bf16")),  # per-frame convs (model.temporal_kernel 1)
    "tiny-video 3x3x3 convs": ("stage1", "tiny-video", ["model.temporal_kernel=3"], 2, ("fp32", "bf16")),
    "imagenet512-nets@64px": ("stage1", "imagenet512", SMALL_AT_64PX + ["stage1.batch_size=4"], 4, ("fp32", "bf16")),
}
GPU_SETTINGS = {
    "tiny": ("stage1", "tiny", ["stage1.batch_size=256"], 256, ("fp32", "bf16")),
    "imagenet512 s1 32/GPU": ("stage1", "imagenet512", ["data.root=/unused"], 32, ("bf16",)),
    "imagenet512 s1 32/GPU no-rc": ("stage1", "imagenet512", ["data.root=/unused",
                                                              "stage1.activation_checkpointing=false"], 32, ("bf16",)),
    "imagenet512 s2 128/GPU": ("stage2", "imagenet512", ["data.root=/unused"], 128, ("bf16",)),
    "imagenet512 s2 128/GPU rc": ("stage2", "imagenet512", ["data.root=/unused",
                                                            "stage2.activation_checkpointing=true"], 128, ("bf16",)),
    "kinetics600 s1 32/GPU": ("stage1", "kinetics600", ["data.root=/unused"], 32, ("bf16",)),
    "kinetics600 s2 64/GPU": ("stage2", "kinetics600", ["data.root=/unused"], 64, ("bf16",)),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(dtype: torch.dtype, n: int = 1024, budget_s: float = 2.0, device: torch.device | None = None) -> float:
    """Dense matmul FLOP/s at this dtype (the denominator of MFU), timed for about `budget_s` seconds."""
    device = device or torch.device("cpu")
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    _sync(device)
    start, repeats = time.perf_counter(), 0
    while repeats == 0 or time.perf_counter() - start < budget_s:
        a @ b
        repeats += 1
        if device.type == "cuda" and repeats % 10 == 0:
            _sync(device)
    _sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def example_batch(stage: str, cfg, batch_size: int, device: torch.device) -> dict:
    """Random pixels (stage 1) or latents (stage 2) of the preset's shapes: images or clips."""
    labels = torch.randint(0, cfg.model.num_classes, (batch_size,), device=device)
    if stage == "stage1":
        return {"x": torch.randint(0, 256, (batch_size, *image_shape(cfg)), dtype=torch.uint8, device=device),
                "cls": labels}
    return {"z": torch.randn(batch_size, *latent_shape(cfg), device=device), "cls": labels}


def model_flops(stage: str, objective: torch.nn.Module, batch: dict) -> int:
    """3x the forward FLOPs of the nets in one step (the backward costs about twice the forward)."""
    n = batch["cls"].shape[0]
    lam = torch.zeros(n, device=batch["cls"].device)
    if stage == "stage2":
        return 3 * forward_flops(objective.base, batch["z"], lam, batch["cls"])
    x = batch["x"].float()
    z = objective.encoder(x).detach()
    return 3 * (forward_flops(objective.encoder, x) + forward_flops(objective.prior, z, lam)
                + forward_flops(objective.decoder, x, lam, z))


def step_time(objective: torch.nn.Module, batch: dict, precision: str, steps: int, noise_on: str = "") -> float:
    """Seconds per training step, noise drawn on `noise_on` ("" = the nets' device, as the training loop does)."""
    opt = torch.optim.AdamW(objective.parameters(), lr=1e-4)
    device = batch["cls"].device

    def one(step: int) -> None:
        with autocast(precision, device):
            loss = objective(batch, step_generator(0, 0, step, noise_on or device)).loss.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    one(0)  # warm-up: allocator, autocast caches, cuDNN algorithm choice
    _sync(device)
    start = time.perf_counter()
    for i in range(steps):
        one(i + 1)
    _sync(device)
    return (time.perf_counter() - start) / steps


def run_setting(name: str, setting: tuple, peaks: dict[str, float], steps: int, device: torch.device) -> None:
    stage, preset, overrides, batch_size, precisions = setting
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as params:
        params.write(f"preset: {preset}\n")
        params.flush()
        cfg = load_config(params.name, overrides)
    torch.manual_seed(0)
    objective = (Stage1Objective if stage == "stage1" else Stage2Objective)(cfg).to(device)
    batch = example_batch(stage, cfg, batch_size, device)
    flops = model_flops(stage, objective, batch)
    for precision in precisions:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        try:
            seconds = step_time(objective, batch, precision, steps)
        except torch.OutOfMemoryError:
            print(f"{name:30} {precision:>5} out of device memory at batch {batch_size}", flush=True)
            continue
        mfu = flops / seconds / peaks[precision]
        memory, cpu_noise = f"{'-':>8}", f"{'-':>9}"
        if device.type == "cuda":
            memory = f"{torch.cuda.max_memory_allocated(device) / 2**30:8.1f}"
            cpu_noise = f"{step_time(objective, batch, precision, steps, noise_on='cpu'):9.3f}"
        print(f"{name:30} {count_params(objective) / 1e6:7.1f}M {flops / 1e9:10.1f} {precision:>5} {seconds:8.3f} "
              f"{batch_size / seconds:10.1f} {mfu:6.1%} {memory} {cpu_noise}", flush=True)
    del objective, batch
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    size = 8192 if device.type == "cuda" else 1024
    peaks = {"fp32": matmul_peak(torch.float32, size, device=device),
             "bf16": matmul_peak(torch.bfloat16, size, device=device)}
    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}, "
              f"TF32 matmul {torch.backends.cuda.matmul.allow_tf32}")
    else:
        print(f"threads={args.threads} cpu fast bf16 (AMX/AVX512-bf16): {cpu_has_fast_bf16()}")
    print(f"matmul peak: fp32 {peaks['fp32'] / 1e12:.3f} TFLOP/s, bf16 {peaks['bf16'] / 1e12:.3f} TFLOP/s")
    if peaks["bf16"] < peaks["fp32"]:
        print("note: bf16 matmul is slower than fp32 here (no AMX / AVX512-bf16: emulated); its MFU is against that "
              "emulated peak. precision=auto picks fp32 on this CPU.")
    print(f"{'setting':30} {'params':>8} {'GFLOP/step':>10} {'prec':>5} {'s/step':>8} {'samples/s':>10} {'MFU':>6} "
          f"{'peak GiB':>8} {'cpu-noise':>9}")
    for name, setting in (GPU_SETTINGS if device.type == "cuda" else CPU_SETTINGS).items():
        run_setting(name, setting, peaks, args.steps, device)


if __name__ == "__main__":
    main()
