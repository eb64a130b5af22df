"""The evaluation's GPU paths, checked against the CPU and timed on one CUDA device, and an NCCL process group.

    python benchmarks/gpu.py [--fid-weights PATH] [--models DIR] [--images 64]

Prints one JSON line per check and exits 1 when a check fails:
- `fid_features`: pool3 features of the same images on CUDA (our extractor: fp32 convolutions) and on the CPU,
  and the deviation cuDNN's default TF32 convolutions would cause, as relative feature error and as the change
  of an FID between two image sets; CUDA throughput of the extractor vs the bare network call (target >= 0.9).
- `i3d_features`: FVD's I3D features on CUDA vs the CPU (a stand-in network: no I3D weights ship), clips/s.
- `sampling`: reconstructions, generated samples and both bits/pixel estimates of the exported models in
  `--models` (stage1/, stage2/: what the tiny pipeline writes) on CUDA vs the CPU, from the same per-sample seeds.
- `nccl`: a one-rank NCCL group: all-reduce, and a DDP-wrapped Stage-1 step in bf16.
Training-step throughput and memory on CUDA: benchmarks/step.py --device cuda.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ulcore.eval.fid import RunningStats, fid_from_stats  # noqa: E402
from ulcore.eval.inception import FidFeatureExtractor, network_input  # noqa: E402

FEATURE_TOLERANCE = 1e-4  # relative, as the folded network's probe check (inception.PROBE_TOLERANCE)
FAILED: list[str] = []


def report(record: dict, ok: bool = True) -> None:
    record["ok"] = ok
    if not ok:
        FAILED.append(record["check"])
    print(json.dumps(record), flush=True)


def smooth_images(n: int, seed: int, size: int = 32) -> torch.Tensor:
    """Low-frequency colour images (upsampled noise): features of natural-looking inputs, not of white noise."""
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(n, 3, 4, 4, generator=g)
    return (torch.nn.functional.interpolate(small, size=size, mode="bicubic").clamp(0, 1) * 255).to(torch.uint8)


def _timed(fn, device: torch.device, repeats: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best


def check_fid(weights: str, n: int, device: torch.device) -> None:
    cpu = FidFeatureExtractor(weights, batch_size=16)
    gpu = FidFeatureExtractor(weights, batch_size=n, device=str(device))
    real, fake = smooth_images(n, 1), smooth_images(n, 2)
    f_cpu = {k: cpu(v) for k, v in (("real", real), ("fake", fake))}
    f_gpu = {k: gpu(v) for k, v in (("real", real), ("fake", fake))}
    prev = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = True
    with torch.inference_mode():  # the bare network under cuDNN's default (TF32) convolutions
        f_tf32 = {k: gpu.network(network_input(v.to(device))).double().cpu().numpy() for k, v in
                  (("real", real), ("fake", fake))}
    torch.backends.cudnn.allow_tf32 = prev

    def rel(a: dict, b: dict) -> float:
        return float(max(np.abs(a[k] - b[k]).max() / np.abs(b[k]).max() for k in a))

    def fid(f: dict) -> float:
        stats = []
        for k in ("real", "fake"):
            s = RunningStats()
            s.add(f[k])
            stats.append(s.stats())
        return fid_from_stats(*stats)

    deviation = rel(f_gpu, f_cpu)
    fids = {"cpu": fid(f_cpu), "cuda_fp32": fid(f_gpu), "cuda_tf32": fid(f_tf32)}
    report({"check": "fid_features", "images": n, "rel_deviation_cuda_fp32_vs_cpu": deviation,
            "rel_deviation_cuda_tf32_vs_cpu": rel(f_tf32, f_cpu), "fid": fids,
            "fid_change_fp32": abs(fids["cuda_fp32"] - fids["cpu"]),
            "fid_change_tf32": abs(fids["cuda_tf32"] - fids["cpu"]),
            "tolerance": FEATURE_TOLERANCE}, ok=deviation <= FEATURE_TOLERANCE)

    for batch in (100, 500):
        images = smooth_images(batch, 3)
        ext = FidFeatureExtractor(weights, batch_size=batch, device=str(device))
        prepared = network_input(images.to(device))
        t_bare = _timed(lambda: ext.raw(prepared), device)
        t_ours = _timed(lambda: ext(images), device)
        report({"check": "fid_throughput", "batch": batch, "bare_images_per_s": round(batch / t_bare, 1),
                "extractor_images_per_s": round(batch / t_ours, 1), "ratio": round(t_bare / t_ours, 3),
                "target_ratio": 0.9}, ok=t_bare / t_ours >= 0.9)


def check_i3d(n: int, device: torch.device) -> None:
    """FVD's I3D on CUDA vs the CPU, on a randomly initialised network of the real architecture saved as a state
    dict (agreement does not depend on the weights; no I3D weights ship here), and its clips/s on the GPU."""
    from ulcore.eval.i3d import I3DFeatures
    from ulcore.eval.i3d_net import InceptionI3d

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "i3d_stand_in.pt")
        torch.save(InceptionI3d().state_dict(), path)
        cpu, gpu = I3DFeatures(path), I3DFeatures(path, batch_size=n, device=str(device))
    clips = smooth_images(n * 8, 5).reshape(n, 8, 3, 32, 32).transpose(1, 2).contiguous()  # (N,3,T=8,32,32)
    f_cpu, f_gpu = cpu(clips), gpu(clips)
    deviation = float(np.abs(f_gpu - f_cpu).max() / np.abs(f_cpu).max())
    seconds = _timed(lambda: gpu(clips), device)
    report({"check": "i3d_features", "clips": n, "rel_deviation_cuda_vs_cpu": deviation,
            "clips_per_s": round(n / seconds, 1), "tolerance": FEATURE_TOLERANCE}, ok=deviation <= FEATURE_TOLERANCE)


def _agreement(a: torch.Tensor, b: torch.Tensor) -> dict:
    from ulcore.eval.image_metrics import psnr

    diff = (a.int() - b.int()).abs().float()
    return {"mean_abs_levels": float(diff.mean()), "max_abs_levels": float(diff.max()),
            "psnr_db": float(psnr(a, b).mean())}


def check_sampling(models: str, n: int, device: torch.device) -> None:
    from ulcore.data.loaders import to_float, to_uint8
    from ulcore.diffusion.bitrate import base_bits_per_pixel, prior_bits_per_pixel
    from ulcore.diffusion.sampling import generate, reconstruct
    from ulcore.models import load_stage1, load_stage2

    s1 = {"cpu": load_stage1(os.path.join(models, "stage1"))}
    s2 = {"cpu": load_stage2(os.path.join(models, "stage2"))}
    s1["cuda"] = load_stage1(os.path.join(models, "stage1")).to(device)
    s2["cuda"] = load_stage2(os.path.join(models, "stage2")).to(device)
    cfg = s1["cpu"].config
    x_u8 = smooth_images(n, 4, cfg.data.resolution)[:, : cfg.model.in_channels]
    labels = torch.arange(n) % cfg.model.num_classes
    out, seconds = {}, {}
    for where, dev in (("cpu", torch.device("cpu")), ("cuda", device)):
        x, lab = to_float(x_u8.to(dev)), labels.to(dev)
        t0 = time.perf_counter()
        rec = to_uint8(reconstruct(s1[where], x, seed=7, steps=32)).cpu()
        gen = to_uint8(generate(s1[where], s2[where], lab, seed=8, base_steps=32, decoder_steps=32)).cpu()
        bpp_prior = prior_bits_per_pixel(s1[where], x, seed=9)
        bpp_base = base_bits_per_pixel(s1[where], s2[where], x, lab, seed=9)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        seconds[where] = round(time.perf_counter() - t0, 3)
        out[where] = (rec, gen, bpp_prior, bpp_base)
    rec_agree, gen_agree = _agreement(out["cuda"][0], out["cpu"][0]), _agreement(out["cuda"][1], out["cpu"][1])
    bpp_dev = [float(((out["cuda"][i] - out["cpu"][i]).abs() / out["cpu"][i].abs()).max()) for i in (2, 3)]
    ok = rec_agree["mean_abs_levels"] <= 1.0 and gen_agree["mean_abs_levels"] <= 1.0 and max(bpp_dev) <= 1e-3
    report({"check": "sampling", "images": n, "reconstruction": rec_agree, "generation": gen_agree,
            "bits_per_pixel_rel_deviation": {"prior": bpp_dev[0], "base": bpp_dev[1]}, "seconds": seconds}, ok=ok)


def check_nccl(device: torch.device) -> None:
    import torch.distributed as dist

    from ulcore.config import load_config
    from ulcore.runtime import autocast
    from ulcore.train.stage1 import Stage1Objective

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=device)
    try:
        t = torch.ones(4, device=device)
        dist.all_reduce(t)
        with tempfile.NamedTemporaryFile("w", suffix=".yaml") as params:
            params.write("preset: tiny\n")
            params.flush()
            cfg = load_config(params.name, [])
        model = torch.nn.parallel.DistributedDataParallel(Stage1Objective(cfg).to(device),
                                                          device_ids=[device.index or 0])
        batch = {"x": torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8, device=device)}
        with autocast("bf16", device):
            loss = model(batch, torch.Generator().manual_seed(0)).loss.mean()
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        finite = all(bool(torch.isfinite(g).all()) for g in grads)
        report({"check": "nccl", "all_reduce": t.tolist(), "ddp_bf16_loss": float(loss.detach()), "grads": len(grads),
                "grads_finite": finite, "nccl_version": ".".join(map(str, torch.cuda.nccl.version()))},
               ok=finite and t.tolist() == [1.0] * 4)
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fid-weights", default="", help="FID network file (default: the resolver's choice)")
    parser.add_argument("--models", default="models", help="folder with stage1/ and stage2/ exports")
    parser.add_argument("--images", type=int, default=64)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py needs a CUDA device")
    device = torch.device("cuda", 0)
    report({"check": "env", "device": torch.cuda.get_device_name(device), "torch": torch.__version__,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "bf16": torch.cuda.is_bf16_supported(), "cudnn_allow_tf32_default": torch.backends.cudnn.allow_tf32})
    check_fid(args.fid_weights, args.images, device)
    check_i3d(8, device)
    if os.path.isdir(os.path.join(args.models, "stage2")):
        check_sampling(args.models, args.images, device)
    else:
        report({"check": "sampling", "skipped": f"{args.models}: no stage1/ and stage2/ exports"})
    check_nccl(device)
    sys.exit(1 if FAILED else 0)


if __name__ == "__main__":
    main()
