"""Stage 1: joint training of the deterministic encoder, the diffusion prior and the diffusion decoder (UL Alg. 1).

Minimises L_z + L_x, both in nats per example, with no stop-gradient: the encoder learns through the prior's
target and input and through the decoder's conditioning (docs/method.md §4, §7).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ulcore import images, layout, tracking
from ulcore.config import Config
from ulcore.data import loaders
from ulcore.diffusion import bitrate, sampling
from ulcore.diffusion.losses import (bits_per_pixel, bits_per_subpixel, diffusion_elbo, encode_noise,
                                     sigmoid_weighted_loss)
from ulcore.diffusion.sampling import decoder_fn
from ulcore.diffusion.schedule import decoder_schedule, latent_schedule, stratified_times
from ulcore.eval.image_metrics import psnr
from ulcore.nets import build_decoder, build_encoder, build_prior, set_activation_checkpointing
from ulcore.train.loop import StageSpec, input_digest, run_training_stage

COLLAPSE_BITS_PER_PIXEL = 1e-3  # below this the latent carries (almost) nothing: UL's posterior collapse


def pixels_per_example(cfg: Config) -> int:
    """H·W (·T for video): the bits/pixel normaliser (docs/method.md (M9))."""
    return cfg.data.resolution**2 * cfg.model.frames


@dataclass(frozen=True)
class Stage1Terms:
    """Per-example terms of the stage-1 objective, in nats unless named otherwise (docs/method.md §4, §7)."""

    prior_diffusion: Tensor  # L_z's diffusion term (UL Eq. 3 with w = 1)
    prior_kl_1: Tensor  # L_z's KL at λ(1)
    decoder: Tensor  # L_x: the sigmoid-weighted decoder loss, times c_lf
    bits_per_pixel: Tensor  # L_z / (ln 2 · H·W·T): the latent's bitrate bound (docs/method.md (M9))
    bits_per_subpixel: Tensor  # the same ÷ C
    latent_std: Tensor  # not a loss: the std of z_clean, to watch the latent's scale

    @property
    def loss(self) -> Tensor:
        """L_z + L_x: what the optimiser minimises (no stop-gradient)."""
        return self.prior_diffusion + self.prior_kl_1 + self.decoder


class Stage1Objective(nn.Module):
    """Encoder + prior + decoder; forward returns the named per-example terms of the stage-1 loss."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        m = cfg.model
        self.encoder, self.prior, self.decoder = build_encoder(m), build_prior(m), build_decoder(m)
        set_activation_checkpointing(self, cfg.stage1.activation_checkpointing)
        self.latent_schedule, self.decoder_schedule = latent_schedule(m), decoder_schedule(m)
        self.logsnr_0 = m.logsnr_0
        self.loss_factor, self.decoder_bias = cfg.stage1.loss_factor, cfg.stage1.decoder_bias
        self.pixels, self.channels = pixels_per_example(cfg), m.in_channels
        self.config = cfg  # the resolved config travels with the nets (sampling reads schedules from it)

    def forward(self, batch: dict[str, Any], gen: torch.Generator) -> Stage1Terms:
        """Draws come from `gen` on its own device (the training loop gives one on the nets' device)."""
        x = loaders.to_float(batch["x"])
        n = x.shape[0]

        def normal(like: Tensor) -> Tensor:
            return torch.randn(like.shape, generator=gen, device=gen.device).to(like.device)

        def times() -> Tensor:
            return stratified_times(n, gen, gen.device).to(x.device)

        z_clean = self.encoder(x)
        prior = diffusion_elbo(self.prior, z_clean, times(), normal(z_clean), self.latent_schedule)
        z0 = encode_noise(z_clean, self.logsnr_0, normal(z_clean))
        decoder = sigmoid_weighted_loss(decoder_fn(self.decoder, z0), x, times(), normal(x), self.decoder_schedule,
                                        self.decoder_bias, self.loss_factor)
        bpp = bits_per_pixel(prior.total, self.pixels)
        return Stage1Terms(prior_diffusion=prior.diffusion, prior_kl_1=prior.kl_1, decoder=decoder, bits_per_pixel=bpp,
                           bits_per_subpixel=bits_per_subpixel(bpp, self.channels),
                           latent_std=z_clean.detach().float().flatten(1).std(1))


def train_batches(cfg: Config, per_rank: int, rank: int, world: int, seed: int) -> Iterator[dict[str, Any]]:
    uris = loaders.shard_uris(cfg, "images", cfg.data.splits[0])
    return loaders.train_batches(uris, batch_size=per_rank, rank=rank, world_size=world, seed=seed, kind="images",
                                 flip=cfg.data.random_flip and not cfg.is_video, max_bad_shards=cfg.data.max_bad_shards,
                                 max_bad_samples=cfg.data.max_bad_samples)


def heldout_batch(cfg: Config, size: int) -> Tensor:
    """A fixed batch from the evaluation split (the last configured split), uint8."""
    split = cfg.data.splits[-1]
    first = next(iter(loaders.eval_batches(loaders.shard_uris(cfg, "images", split), batch_size=size, kind="images")))
    return first["x"]


def monitor(cfg: Config, ema: nn.Module, samples: int, run_id: str | None, uri: str | None) -> dict[str, float]:
    """EMA metrics on a fixed held-out batch: bits/pixel, PSNR of reconstructions; grids to MLflow."""
    ema = ema.eval()
    x_uint8 = heldout_batch(cfg, cfg.stage1.eval_batch)
    x = loaders.to_float(x_uint8)
    rec = sampling.reconstruct(ema, x, seed=cfg.stage1.seed, steps=cfg.stage1.eval_steps)
    bpp = bitrate.prior_bits_per_pixel(ema, x, seed=cfg.stage1.seed).mean().item()
    latent_std = ema.encoder(x).float().std().item()
    metrics = {"ema_psnr": float(psnr(loaders.to_uint8(rec), x_uint8).mean()), "ema_bits_per_pixel": bpp,
               "ema_bits_per_subpixel": bits_per_subpixel(bpp, cfg.model.in_channels), "ema_latent_std": latent_std}
    if bpp < COLLAPSE_BITS_PER_PIXEL:
        print(f"[stage1] WARNING: latent collapse (held-out {bpp:.2e} bits/pixel): raise stage1.loss_factor or "
              "stage1.decoder_bias (docs/method.md (M12))", flush=True)
    if run_id:
        n = min(16, x.shape[0])
        z0 = sampling.sample_prior(ema, n, seed=cfg.stage1.seed, steps=cfg.stage1.eval_steps)
        noise = sampling.PerSampleNoise(x.shape[1:], sampling.sample_seeds(cfg.stage1.seed + 1, range(n)))
        fake = sampling.decode(ema.decoder, z0, ema.decoder_schedule, noise=noise, steps=cfg.stage1.eval_steps)
        tracking.log_image(run_id, images.image_grid(torch.cat([x_uint8[:n], loaders.to_uint8(rec[:n])])),
                           f"reconstructions/samples_{samples:09d}.png", tracking_uri=uri)
        tracking.log_image(run_id, images.image_grid(loaders.to_uint8(fake)),
                           f"prior_samples/samples_{samples:09d}.png", tracking_uri=uri)
    return metrics


def export(cfg: Config, ema: Stage1Objective) -> dict[str, nn.Module]:
    return {"encoder": ema.encoder, "decoder": ema.decoder, "prior": ema.prior}


def inputs_digest(cfg: Config) -> str:
    """Version of the shards this stage reads (their summary changes whenever any shard does)."""
    return input_digest(layout.shards_summary(cfg.storage.root), "shard")


SPEC = StageSpec(name="stage1", build=Stage1Objective, batches=train_batches, monitor=monitor,
                 sections=("data", "video", "model", "stage1"))


def run_stage1(cfg: Config) -> dict[str, Any]:
    """The `stage1` stage: train, export EMA nets to models/stage1/, write metrics/stage1.json, register."""
    return run_training_stage(cfg, SPEC, inputs=inputs_digest(cfg), export=export)
