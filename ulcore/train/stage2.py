"""Stage 2: the base model on frozen latents with a sigmoid(b₂ − λ) weighted ELBO (UL §3.3).

λ(0) stays fixed at model.logsnr_0 — the base model generates the same noisy z_0 the decoder was trained on.
Labels are dropped to the null class with probability stage2.label_dropout for classifier-free guidance.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ulcore import images, layout, storage, tracking
from ulcore.config import Config
from ulcore.errors import LineageError
from ulcore.data import loaders
from ulcore.diffusion import bitrate, sampling
from ulcore.diffusion.losses import bits_per_subpixel, sigmoid_weighted_loss
from ulcore.diffusion.schedule import latent_schedule, stratified_times
from ulcore.nets import build_base_model, set_activation_checkpointing
from ulcore.models import load_stage1, stage1_root
from ulcore.train.loop import StageSpec, input_digest, run_training_stage


@dataclass(frozen=True)
class Stage2Terms:
    """The stage-2 objective's one per-example term, in nats: the sigmoid(b₂ − λ) weighted ELBO (UL §3.3)."""

    loss: Tensor


class Stage2Objective(nn.Module):
    """The class-conditional base model; forward returns the per-example sigmoid-weighted loss."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.base = build_base_model(cfg.model)
        set_activation_checkpointing(self, cfg.stage2.activation_checkpointing)
        self.schedule = latent_schedule(cfg.model)
        self.bias, self.label_dropout, self.null = cfg.stage2.bias, cfg.stage2.label_dropout, cfg.model.num_classes
        self.config = cfg

    def forward(self, batch: dict[str, Any], gen: torch.Generator) -> Stage2Terms:
        z = batch["z"].float()
        n = z.shape[0]
        drop = torch.rand(n, generator=gen, device=gen.device).to(z.device) < self.label_dropout
        labels = torch.where(drop, torch.full_like(batch["cls"], self.null), batch["cls"])
        t = stratified_times(n, gen, gen.device).to(z.device)
        eps = torch.randn(z.shape, generator=gen, device=gen.device).to(z.device)
        loss = sigmoid_weighted_loss(lambda z_t, lam: self.base(z_t, lam, labels), z, t, eps, self.schedule,
                                     self.bias)
        return Stage2Terms(loss=loss)


def train_batches(cfg: Config, per_rank: int, rank: int, world: int, seed: int) -> Iterator[dict[str, Any]]:
    uris = loaders.shard_uris(cfg, "latents", cfg.data.splits[0])
    return loaders.train_batches(uris, batch_size=per_rank, rank=rank, world_size=world, seed=seed, kind="latents",
                                 flip=False, max_bad_shards=cfg.data.max_bad_shards,
                                 max_bad_samples=cfg.data.max_bad_samples)


@functools.lru_cache(maxsize=2)
def _stage1(root: str):
    return load_stage1(root)


def monitor(cfg: Config, ema: nn.Module, samples: int, run_id: str | None, uri: str | None) -> dict[str, float]:
    """Base-model ELBO bitrate on held-out latents (the second estimate, UL Table 5) and a decoded sample grid."""
    ema = ema.eval()
    split = cfg.data.splits[-1]
    batch = next(iter(loaders.eval_batches(loaders.shard_uris(cfg, "latents", split), batch_size=cfg.stage2.eval_batch,
                                           kind="latents")))
    z, labels = batch["z"].float(), batch["cls"]
    bpp = bitrate.elbo_bits_per_pixel(lambda zt, lam: ema.base(zt, lam, labels), z, cfg, seed=cfg.stage2.seed)
    metrics = {"ema_bits_per_pixel_base": bpp.mean().item(),
               "ema_bits_per_subpixel_base": bits_per_subpixel(bpp, cfg.model.in_channels).mean().item()}
    if run_id:
        stage1 = _stage1(stage1_root(cfg))
        n = min(16, 2 * cfg.model.num_classes)
        labels = torch.arange(n) % cfg.model.num_classes
        x = sampling.generate(stage1, ema, labels, seed=cfg.stage2.seed, base_steps=cfg.stage2.eval_steps,
                              decoder_steps=cfg.stage2.eval_steps)
        tracking.log_image(run_id, images.image_grid(loaders.to_uint8(x)), f"samples/samples_{samples:09d}.png",
                           tracking_uri=uri)
    return metrics


def export(cfg: Config, ema: Stage2Objective) -> dict[str, nn.Module]:
    return {"base": ema.base}


def inputs_digest(cfg: Config) -> str:
    return input_digest(layout.latents_stats(cfg.storage.root), "encode")


def encoder_run(cfg: Config) -> str:
    """The stage-1 MLflow run whose encoder made data/latents: the base model's lineage. The latents' stats name
    their encoder by its done digest, models/stage1/done.json names that digest's run; when models/stage1 holds
    another stage-1 run the latents are stale, and a base model trained on them would pair with a decoder that
    never saw its latents (LineageError, before any training)."""
    root = cfg.storage.root
    stats, done = storage.read_json(layout.latents_stats(root)), layout.done_marker(root, "stage1")
    marker = storage.read_json(done) if storage.exists(done) else {}
    if stats.get("encoder") != marker.get("digest") or not marker.get("mlflow_run_id"):
        raise LineageError(f"{layout.latents_stats(root)}: the latents were encoded by stage-1 export "
                           f"{stats.get('encoder')}, but {done} records {marker.get('digest')}: rerun the encode "
                           "stage so that the base model learns the latents of the stage-1 nets it ships with")
    return marker["mlflow_run_id"]


SPEC = StageSpec(name="stage2", build=Stage2Objective, batches=train_batches, monitor=monitor,
                 sections=("model", "stage2"))


def run_stage2(cfg: Config) -> dict[str, Any]:
    """The `stage2` stage: train the base model, export models/stage2/, write metrics/stage2.json, register."""
    return run_training_stage(cfg, SPEC, inputs=inputs_digest(cfg), export=export, stage1_run=encoder_run)
