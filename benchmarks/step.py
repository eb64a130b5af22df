"""Stage-1 training-step throughput and model FLOP utilisation, fp32 vs bf16 autocast, on this machine.

    python benchmarks/step.py [--steps 5] [--threads N]

For each setting it times forward+backward+AdamW of encoder, prior and decoder (Stage1Objective), counts the
model FLOPs of one step (3x the forward FLOPs from torch's FlopCounterMode), and divides by a dense-matmul peak
measured in the same run and dtype: MFU = achieved FLOP/s / peak FLOP/s. Settings: the `tiny` preset (32², batch
64) and the imagenet512 networks at 64² (batch 4) as the larger model. Figures are ratios measured in one run.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from ulcore.config import load_config
from ulcore.nets import count_params, forward_flops
from ulcore.train.precision import autocast, cpu_has_fast_bf16
from ulcore.train.stage1 import Stage1Objective

SETTINGS = {  # name -> (preset, overrides, batch)
    "tiny": ("tiny", ["stage1.batch_size=64"], 64),
    "imagenet512-nets@64px": ("imagenet512", ["data.resolution=64", "data.root=/unused", "stage1.batch_size=4",
                                              "stage1.warmup_samples=0", "stage1.total_samples=4",
                                              "stage1.log_every_samples=4", "stage1.ckpt_every_samples=4",
                                              "ray.num_workers=1"], 4),
}


def matmul_peak(dtype: torch.dtype, n: int = 1024, budget_s: float = 2.0) -> float:
    """Dense matmul FLOP/s at this dtype (the denominator of MFU), timed for about `budget_s` seconds."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    start, repeats = time.perf_counter(), 0
    while repeats == 0 or time.perf_counter() - start < budget_s:
        a @ b
        repeats += 1
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def step_time(objective: Stage1Objective, batch: dict, precision: str, steps: int) -> float:
    opt = torch.optim.AdamW(objective.parameters(), lr=1e-4)
    device = torch.device("cpu")

    def one(step: int) -> None:
        with autocast(precision, device):
            loss = objective(batch, torch.Generator().manual_seed(step))["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    one(0)  # warm-up: allocator, autocast caches
    start = time.perf_counter()
    for i in range(steps):
        one(i + 1)
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    print(f"threads={args.threads} cpu fast bf16 (AMX/AVX512-bf16): {cpu_has_fast_bf16()}")
    print(f"matmul peak: fp32 {peaks['fp32'] / 1e12:.3f} TFLOP/s, bf16 {peaks['bf16'] / 1e12:.3f} TFLOP/s")
    if peaks["bf16"] < peaks["fp32"]:
        print("note: bf16 matmul is slower than fp32 here (no AMX / AVX512-bf16: emulated); its MFU is against that "
              "emulated peak. precision=auto picks fp32 on this CPU.")
    print(f"{'setting':24} {'params':>8} {'GFLOP/step':>10} {'prec':>5} {'s/step':>8} {'samples/s':>10} {'MFU':>6}")
    for name, (preset, overrides, batch_size) in SETTINGS.items():
        with tempfile.NamedTemporaryFile("w", suffix=".yaml") as params:
            params.write(f"preset: {preset}\n")
            params.flush()
            cfg = load_config(params.name, overrides)
        torch.manual_seed(0)
        objective = Stage1Objective(cfg)
        r = cfg.data.resolution
        batch = {"x": torch.randint(0, 256, (batch_size, 3, r, r), dtype=torch.uint8), "cls": torch.zeros(batch_size)}
        x = torch.zeros(batch_size, 3, r, r)
        z = objective.encoder(x).detach()
        lam = torch.zeros(batch_size)
        flops = 3 * (forward_flops(objective.encoder, x) + forward_flops(objective.prior, z, lam)
                     + forward_flops(objective.decoder, x, lam, z))
        for precision in ("fp32", "bf16"):
            seconds = step_time(objective, batch, precision, args.steps)
            mfu = flops / seconds / peaks[precision]
            print(f"{name:24} {count_params(objective) / 1e6:7.2f}M {flops / 1e9:10.2f} {precision:>5} "
                  f"{seconds:8.3f} {batch_size / seconds:10.1f} {mfu:6.1%}")


if __name__ == "__main__":
    main()
