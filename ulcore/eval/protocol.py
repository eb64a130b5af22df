"""The pinned evaluation protocol: every count, seed and sampler setting an evaluation's numbers depend on, in one
frozen object that the phases read and that is logged with the numbers (metrics/eval.json "protocol").

Seeds: each phase owns one stream base, and a sampler call takes consecutive streams from it, sample i of a stream
seeded by sample_seeds(base + j, i) (ulcore.diffusion.sampling). generate() takes four (base chain, decoder, context
latents, context pixels), reconstruct() two (encoding noise, decoder); the bitrate draws are seeded per batch by
`bits_seed + batch start`. The bases are spaced so that no two phases share a stream.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ulcore import layout
from ulcore.config import Config

MONITORING_BELOW = 10_000  # FID from fewer samples is labelled "monitoring"
RECONSTRUCTION_SEED_OFFSET = 2  # generate() uses seed and seed + 1; reconstructions use seed + 2 and seed + 3
BITS_SEED_OFFSET = 4
PREDICTION_SEED_OFFSET = 5  # predicted clips use noise streams seed + 5 .. + 8 (generate() takes four)
PRIOR_SEED_OFFSET = 9  # samples of the stage-1 prior (gfid_prior): seed + 9 and + 10


@dataclass(frozen=True)
class EvalProtocol:
    num_samples: int  # N: generated samples for gFID, held-out images reconstructed, predicted clips
    reference_samples: int  # training images in the gFID reference; 0 = the whole split
    seed: int
    generation_seed: int
    reconstruction_seed: int
    bits_seed: int  # + the batch's start index
    prediction_seed: int
    prior_seed: int  # gfid_prior's samples (generate_from_prior takes two streams)
    sampler: str
    base_steps: int
    decoder_steps: int
    guidance: float
    guidance_interval: tuple[float, ...]
    num_classes: int  # labels i mod num_classes; num_classes itself is the null label
    context_frames: int  # frame prediction: real frames given (0 = unconditional clips)
    reconstruction_guidance: float
    batch_size: int
    grid_size: int
    train_split: str
    eval_split: str
    resolution: int
    gfid_reference_key: str  # reference-statistics hashes (fid.reference_key)
    rfid_reference_key: str
    floor_reference_key: str  # the first N training images: the FID floor against the rFID reference
    fid_network: dict[str, str] = field(default_factory=dict)  # inception.WeightsSource.protocol()

    @classmethod
    def from_config(cls, cfg: Config, *, train_split: str, eval_split: str, gfid_reference_key: str,
                    rfid_reference_key: str, floor_reference_key: str, fid_network: dict[str, str]) -> EvalProtocol:
        e = cfg.eval
        return cls(num_samples=e.num_samples, reference_samples=e.reference_samples, seed=e.seed,
                   generation_seed=e.seed, reconstruction_seed=e.seed + RECONSTRUCTION_SEED_OFFSET,
                   bits_seed=e.seed + BITS_SEED_OFFSET, prediction_seed=e.seed + PREDICTION_SEED_OFFSET,
                   prior_seed=e.seed + PRIOR_SEED_OFFSET,
                   sampler=e.sampler, base_steps=e.base_steps, decoder_steps=e.decoder_steps, guidance=e.guidance,
                   guidance_interval=tuple(e.guidance_interval), num_classes=cfg.model.num_classes,
                   context_frames=e.fvd_context_frames, reconstruction_guidance=e.fvd_reconstruction_guidance,
                   batch_size=e.batch_size, grid_size=e.grid_size, train_split=train_split, eval_split=eval_split,
                   resolution=cfg.data.resolution, gfid_reference_key=gfid_reference_key,
                   rfid_reference_key=rfid_reference_key, floor_reference_key=floor_reference_key,
                   fid_network=dict(fid_network))

    def digest(self) -> str:
        """Identity of the protocol for comparing two evaluations' numbers (the promote gate): every field but the
        batch and grid sizes (per-sample seeds: the numbers do not depend on them), and of the FID network its
        sha256 and input processing, not where its file lies. The reference keys hash the data the statistics
        were computed from, so new training data is a new protocol. The prior's seed is left out too: it changes
        only gfid_prior, a number no gate compares, so evaluations from before it existed still compare."""
        doc = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("batch_size", "grid_size", "prior_seed")}
        doc["fid_network"] = {k: self.fid_network.get(k) for k in ("fid_weights_sha256", "fid_resize")}
        return layout.digest(doc)

    @property
    def monitoring(self) -> bool:
        """FID at N < 10,000 is biased upwards: a monitoring number, not comparable to 50k-sample results."""
        return self.num_samples < MONITORING_BELOW

    def describe(self, cfg: Config, *, num_reconstructed: int, gfid_reference: dict | None,
                 rfid_reference: dict | None, floor_reference: dict | None = None) -> dict[str, Any]:
        """The protocol as eval.json records it, with what the run found (images reconstructed, reference files)."""
        n, channels = self.num_samples, cfg.model.in_channels
        return {
            "num_samples": n, "num_reconstructed": num_reconstructed, "seed": self.seed,
            "seeds": {"generate": f"sample_seeds({self.generation_seed}, 0..{n - 1}) and {self.generation_seed + 1}",
                      "reconstruct": self.reconstruction_seed, "bits": f"{self.bits_seed} + batch start",
                      "prior": f"sample_seeds({self.prior_seed}, 0..{n - 1}) and {self.prior_seed + 1}"},
            "labels": "i mod num_classes", "sampler": self.sampler, "base_steps": self.base_steps,
            "decoder_steps": self.decoder_steps, "guidance": self.guidance,
            "guidance_interval": list(self.guidance_interval), "ema": True, "train_split": self.train_split,
            "eval_split": self.eval_split, "resolution": self.resolution, **self.fid_network,
            "ssim": "torchmetrics gaussian 11x11 sigma 1.5",
            "psnr": "per image on [0,255] after clipping, mean over images",
            "bits_per_pixel": "ELBO bound / (ln 2 * H * W * frames), 4 stratified draws per image",
            "bits_per_subpixel": f"bits_per_pixel / {channels} channels (the VDM convention)",
            "reference_samples": self.reference_samples, "gfid_reference": gfid_reference,
            "rfid_reference": rfid_reference,
            "fid_floor": f"FID of the first {n} {self.train_split} examples vs the rFID reference ({n} "
                         f"{self.eval_split} examples): real vs real at the N of gFID",
            "fid_floor_reference": floor_reference, "monitoring": self.monitoring,
            "monitoring_note": (f"monitoring FID: N = {n} < {MONITORING_BELOW}; biased upwards, not comparable to "
                                "50k-sample published numbers") if self.monitoring else "",
        }


__all__ = ["EvalProtocol", "MONITORING_BELOW", "RECONSTRUCTION_SEED_OFFSET", "BITS_SEED_OFFSET",
           "PREDICTION_SEED_OFFSET", "PRIOR_SEED_OFFSET"]
