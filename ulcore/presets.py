"""Named presets: overlays on the dataclass defaults of ulcore.config, picked by `preset:` in params.yaml.

`tiny` (the defaults) trains on a 2-core CPU in minutes; `tiny-video` is its clip counterpart; `imagenet512` and
`kinetics600` are the paper-scale settings (sizes follow UL §5.1 and §5.7; docs/method.md §10, D9).
"""

from __future__ import annotations

import math
from typing import Any

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {},  # the dataclass defaults: Fashion-MNIST at 32², trains on a 2-core CPU in minutes
    "tiny-video": {
        "data": {"source": "embedded-video", "resolution": 32, "random_flip": False,
                 "embedded_train_per_class": 24, "embedded_val_per_class": 8},
        "video": {"frames": 8, "fps": 8.0},
        # Per-frame convs (time is mixed by the encoder's time-halving downsample and the transformers): a stage-1
        # step of 2 clips 247 -> 150 ms here, so 1.6x the clips in the same minutes. Held-out EMA PSNR after 283 s
        # of stage 1 (one process), seeds 0 / 1: 18.58 / 18.76 dB at 0.098 bits/pixel, against 17.21 / 15.91 with
        # 3x3x3 convs (2,048 clips). README, video preset.
        # GN(32), not the images' 8 groups: 18.41 dB against 17.81 (8) and 17.63 (1) with the colour 16.7 / 16.2 / 16.4
        # off (ancestral, 16 held-out clips, seed 0).
        "model": {"frames": 8, "temporal_downsample": 2, "latent_channels": 4, "temporal_kernel": 1,
                  "norm_groups": 32},
        # stage 1: 1,280 steps of 2 clips at lr 4e-3, c_lf 20, EMA half-life 512: 18.37 dB at 0.114 bits/pixel
        # (32 DDIM steps, one process; 2,048 clips: 17.97). With the fused optimiser the pipeline takes 9 min 11 s at
        # 2,560 clips in a slow hour (7 min 45 s at 2,048, PSNR 18.65 against 18.4). The first preset, 512
        # steps of 4 at lr 2e-3, c_lf 5, EMA 1,024 (3x3x3 convs), gave 12.37 dB, below a clip against an unrelated
        # clip (14.3). Each knob's share and the seed spread: README, video preset.
        # One checkpoint, at the end: each costs an EMA monitor (16 clips, 32 DDIM steps) in a ~3 min stage.
        "stage1": {"batch_size": 2, "lr": 4e-3, "loss_factor": 20.0, "total_samples": 2560, "warmup_samples": 256,
                   "log_every_samples": 256, "ckpt_every_samples": 2560, "eval_batch": 16,
                   "ema_halflife_samples": 512, "decay_fraction": 0.0},  # the LR cool-down is measured on images only
        "stage2": {"batch_size": 16, "total_samples": 2048, "warmup_samples": 256, "log_every_samples": 256,
                   "ckpt_every_samples": 1024, "eval_batch": 16},
        "eval": {"num_samples": 32, "reference_samples": 32, "batch_size": 16, "grid_size": 16,
                 "fvd_context_frames": 3},  # 1 latent frame + 1 pixel-only frame, like 5 = 4 + 1 at Kinetics
    },
    "imagenet512": {
        "data": {"source": "imagenet", "resolution": 512, "embedded_train_per_class": 0},
        "shard": {"samples_per_shard": 2000, "max_parallel": 16},
        "model": {"num_classes": 1000, "latent_channels": 32, "patch_size": 2,
                  "encoder_channels": (128, 256, 512, 512), "encoder_blocks": 2,
                  "prior_width": 1024, "prior_depth": 8,
                  "decoder_channels": (128, 256, 512), "decoder_blocks": 2, "decoder_width": 1024,
                  "decoder_depth": 8, "decoder_shift": 2 * math.log(64 / 512), "norm_groups": 32,
                  "base_widths": (512, 1024), "base_depths": (6, 16), "heads": 16, "dropout": 0.1},
        "stage1": {"batch_size": 256, "lr": 1e-4, "warmup_samples": 2_560_000, "total_samples": 128_000_000,
                   "decay_fraction": 0.0, "ema_halflife_samples": 10_000_000, "loss_factor": 1.5, "decoder_bias": -3.0,
                   "log_every_samples": 25_600, "ckpt_every_samples": 2_560_000, "eval_steps": 64,
                   "activation_checkpointing": True},  # 32/GPU bf16, H200: 32.9 GiB peak, 22.7 samples/s;
        # without recompute it runs out of memory (> 139 GiB)
        "stage2": {"batch_size": 1024, "lr": 1e-4, "warmup_samples": 10_240_000, "total_samples": 512_000_000,
                   "ema_halflife_samples": 10_000_000, "log_every_samples": 102_400,
                   "ckpt_every_samples": 10_240_000, "eval_steps": 64},  # 128/GPU bf16, H200: 67.6 GiB peak with AdamW, fits 80 GB;
        # recompute would take it to 12.7 GiB at 0.74x the speed (250 vs 337 samples/s, benchmarks/step.py)
        "encode": {"batch_size": 64},
        "eval": {"num_samples": 50_000, "reference_samples": 0, "sampler": "ancestral", "base_steps": 256,
                 "decoder_steps": 256, "guidance": 1.5, "guidance_interval": (-3.0, 5.0)},
        "ray": {"num_workers": 8, "use_gpu": True, "cpus_per_worker": 8},
        # the gate's former 2 %: the default 5 % comes from the tiny N = 200's noise, not measured at N = 50,000
        "promote": {"min_improvement": 0.02},
    },
    "kinetics600": {
        "data": {"source": "kinetics", "resolution": 128, "random_flip": False},
        "video": {"frames": 16, "fps": 8.0, "clip_format": "npy"},
        "shard": {"samples_per_shard": 500, "max_parallel": 16},
        # UL §5.7: 4x temporal, 8x spatial downsampling -> a 4x16x16 latent grid (patch 2, then 2 stage transitions)
        "model": {"num_classes": 600, "frames": 16, "temporal_downsample": 4, "latent_channels": 32,
                  "patch_size": 2, "encoder_channels": (128, 256, 512), "encoder_blocks": 2,
                  "prior_width": 1024, "prior_depth": 8, "decoder_channels": (128, 256, 512),
                  "decoder_blocks": 2, "decoder_width": 1024, "decoder_depth": 8,
                  "decoder_shift": 2 * math.log(64 / 128), "norm_groups": 32,
                  "base_widths": (512, 1024), "base_depths": (6, 16), "heads": 16, "dropout": 0.1},
        "stage1": {"batch_size": 256, "lr": 1e-4, "total_samples": 64_000_000, "loss_factor": 1.5,
                   "decoder_bias": -3.0, "warmup_samples": 2_560_000, "ema_halflife_samples": 10_000_000,
                   "decay_fraction": 0.0, "log_every_samples": 25_600, "ckpt_every_samples": 2_560_000,
                   "activation_checkpointing": True},  # 32/GPU bf16, H200: 32.4 GiB peak, 20.6 samples/s,
        # measured with the previous 4x8x8 latent grid: to be re-measured (benchmarks/step.py --device cuda)
        "stage2": {"batch_size": 512, "lr": 1e-4, "total_samples": 256_000_000,
                   "warmup_samples": 5_120_000, "ema_halflife_samples": 10_000_000,
                   "log_every_samples": 51_200,
                   "ckpt_every_samples": 5_120_000},  # 64/GPU bf16, H200: 13.6 GiB peak: no recompute; measured
        # with the previous 4x8x8 grid (256 latent tokens, now 1,024): to be re-measured
        "eval": {"num_samples": 50_000, "reference_samples": 0, "sampler": "ancestral", "base_steps": 256,
                 "decoder_steps": 256, "fvd_context_frames": 5},  # UL §5.7: condition on 5 frames, generate 11
        "ray": {"num_workers": 8, "use_gpu": True, "cpus_per_worker": 8},
        "promote": {"min_improvement": 0.02},
    },
}
