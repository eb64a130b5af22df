"""Samplers in log-SNR with one signature, classifier-free guidance, and UL generation (UL Alg. 2).

A sampler is `sampler(model, z, logsnrs, noise, impose=None) -> z_end` where `model(z, λ) -> v̂`, `logsnrs` is the
increasing grid of log-SNRs to visit (starting at the noise level of `z`), `noise(step) -> ε` returns per-sample
fresh noise, so a sample depends only on its own seed, never on the batch it was drawn in, and
`impose(z, λ) -> z` (optional) sets known coordinates of every state the sampler visits, the initial one included.

Video frame prediction (the Kinetics-600 protocol, UL §5.7 after Ho et al. 2022) is training-free "replacement"
conditioning (`Replacement`, Ho et al. 2022 §3.1), optionally with reconstruction guidance on the base model
(`reconstruction_guided`). The encoder maps T frames to T/k latent frames (non-causal, no separate first frame),
latent frame j covering pixel frames [jk, (j+1)k); c context frames determine latent frames 0 .. c//k − 1
(`context_latents`). The base model samples with those latent frames replaced; the decoder samples with all c pixel
frames replaced, so the first c frames of the output are the real ones exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ulcore.diffusion.losses import VelocityFn, _bcast, diffuse, eps_from_v, v_from_x, x_from_v
from ulcore.diffusion.schedule import CosineLogSNR, alpha_sigma

NoiseFn = Callable[[int], Tensor]
ImposeFn = Callable[[Tensor, Tensor], Tensor]


def _unconstrained(z: Tensor, _lam: Tensor) -> Tensor:
    return z


class PerSampleNoise:
    """Gaussian noise drawn from one generator per sample, seeded by (seed, sample index)."""

    def __init__(self, shape: Sequence[int], seeds: Sequence[int], device: str | torch.device = "cpu") -> None:
        self.shape = tuple(shape)
        self.device = device
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def __call__(self, _step: int = 0) -> Tensor:
        return torch.stack([torch.randn(self.shape, generator=g) for g in self.generators]).to(self.device)


def sample_seeds(seed: int, indices: Sequence[int]) -> list[int]:
    """Per-sample seeds from (run seed, global sample index): stable under any batching."""
    return [int(seed) * 1_000_003 + int(i) for i in indices]


def logsnr_grid(schedule: CosineLogSNR, steps: int) -> Tensor:
    """λ at t = 1, 1 − 1/steps, …, 0: increasing, from λ_min to λ_max."""
    return schedule.logsnr(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)).float()


def _lam(value: Tensor, batch: int, device: torch.device) -> Tensor:
    return value.to(device).expand(batch)


def ddim(model: VelocityFn, z: Tensor, logsnrs: Tensor, noise: NoiseFn, impose: ImposeFn | None = None) -> Tensor:
    """Deterministic DDIM in log-SNR: z_s = α_s x̂ + σ_s ε̂ (Song et al. 2021)."""
    impose = impose or _unconstrained
    z = impose(z, _lam(logsnrs[0], z.shape[0], z.device))
    for i in range(len(logsnrs) - 1):
        lam_t, lam_s = _lam(logsnrs[i], z.shape[0], z.device), _lam(logsnrs[i + 1], z.shape[0], z.device)
        a_t, s_t = alpha_sigma(lam_t)
        v = model(z, lam_t).float()
        x_hat, eps_hat = x_from_v(z, v, a_t, s_t), eps_from_v(z, v, a_t, s_t)
        a_s, s_s = alpha_sigma(lam_s)
        z = impose(_bcast(a_s, z) * x_hat + _bcast(s_s, z) * eps_hat, lam_s)
    return z


def ancestral(model: VelocityFn, z: Tensor, logsnrs: Tensor, noise: NoiseFn,
              impose: ImposeFn | None = None) -> Tensor:
    """Ancestral sampling from q(z_s | z_t, x = x̂) (VDM Eq. 32-33):
    mean = α_s[(1 − c) z_t / α_t + c x̂], var = c σ_s², with c = −expm1(λ_t − λ_s)."""
    impose = impose or _unconstrained
    z = impose(z, _lam(logsnrs[0], z.shape[0], z.device))
    for i in range(len(logsnrs) - 1):
        lam_t, lam_s = _lam(logsnrs[i], z.shape[0], z.device), _lam(logsnrs[i + 1], z.shape[0], z.device)
        a_t, s_t = alpha_sigma(lam_t)
        x_hat = x_from_v(z, model(z, lam_t).float(), a_t, s_t)
        a_s, s_s = alpha_sigma(lam_s)
        c = -torch.expm1(lam_t - lam_s)
        mean = _bcast(a_s, z) * (_bcast(1 - c, z) * z / _bcast(a_t, z) + _bcast(c, z) * x_hat)
        z = impose(mean + _bcast((c * s_s**2).sqrt(), z) * noise(i), lam_s)
    return z


SAMPLERS: dict[str, Callable[..., Tensor]] = {"ddim": ddim, "ancestral": ancestral}


class Replacement:
    """Replacement conditioning (Ho et al. 2022 §3.1): the first f = known.shape[2] frames of every state at log-SNR λ
    are a fresh draw of the forward process, z^a_λ = α_λ x^a + σ_λ ε (VDM Eq. 1), with per-sample ε from `noise`;
    the model denoises the other frames given them. `clean(x)` sets them to x^a itself (the end of a chain run
    to the data)."""

    def __init__(self, known: Tensor, noise: Callable[[], Tensor]) -> None:
        self.known, self.noise = known, noise

    def __call__(self, z: Tensor, lam: Tensor) -> Tensor:
        return self._set(z, diffuse(self.known, lam.to(self.known.dtype), self.noise().to(self.known.dtype)))

    def clean(self, x: Tensor) -> Tensor:
        return self._set(x, self.known)

    def _set(self, z: Tensor, part: Tensor) -> Tensor:
        return torch.cat([part.to(z.dtype), z[:, :, self.known.shape[2]:]], dim=2)


def reconstruction_guided(model: VelocityFn, known: Tensor, weight: float) -> VelocityFn:
    """Reconstruction guidance (Ho et al. 2022 §3.1): x̃^b = x̂^b − (w_r α_t / 2) ∇_{z^b} ‖x^a − x̂^a(z_t)‖², i.e. the
    score of q(x^a | z_t) ≈ N(x̂^a, σ_t²/α_t² I) added through Tweedie's formula; x^a = `known` (the clean first
    frames). Returned as the velocity v = (α z_t − x̃) / σ of the corrected prediction. Each example's gradient
    involves only its own prediction, so batch independence holds."""
    frames = known.shape[2]

    def model_guided(z: Tensor, lam: Tensor) -> Tensor:
        a, s = alpha_sigma(lam)
        with torch.enable_grad():
            z_in = z.detach().requires_grad_(True)
            x_hat = x_from_v(z_in, model(z_in, lam).float(), a, s)
            error = ((known.to(x_hat.dtype) - x_hat[:, :, :frames]) ** 2).sum()
            (grad,) = torch.autograd.grad(error, z_in)
        grad[:, :, :frames] = 0  # only the generated frames b move; the known ones are replaced anyway
        return v_from_x(z, x_hat.detach() - _bcast(weight * a / 2, z) * grad, a, s)

    return model_guided


def guided(
    net: Callable[[Tensor, Tensor, Tensor], Tensor],
    labels: Tensor,
    null_label: int,
    scale: float,
    interval: Sequence[float] = (-float("inf"), float("inf")),
) -> VelocityFn:
    """Classifier-free guidance v = v_u + w (v_c − v_u), applied only for λ inside `interval` (SiD2-style)."""

    def model(z: Tensor, lam: Tensor) -> Tensor:
        cond = net(z, lam, labels)
        lo, hi = interval
        if scale == 1.0 or not (lo <= float(lam[0]) <= hi):
            return cond
        uncond = net(z, lam, torch.full_like(labels, null_label))
        return uncond + scale * (cond - uncond)

    return model


def decoder_fn(decoder: torch.nn.Module, z0: Tensor) -> VelocityFn:
    """The decoder as a velocity model of x_t, conditioned on the noisy latent z_0."""
    return lambda x, lam: decoder(x, lam, z0)


def decode(decoder: torch.nn.Module, z0: Tensor, schedule: CosineLogSNR, *, noise: PerSampleNoise, steps: int,
           sampler: str = "ddim", known: Replacement | None = None) -> Tensor:
    """p(x | z_0): integrate the decoder from x_1 ~ N(0, I) to λ_x(0), then take the final x̂ (UL Alg. 2). With
    `known`, its frames are replaced along the decoder's own forward process and set to the clean x^a at the end."""
    grid = logsnr_grid(schedule, steps)
    model = decoder_fn(decoder, z0)
    x = SAMPLERS[sampler](model, noise(-1), grid, noise, known)
    lam = _lam(grid[-1], x.shape[0], x.device)
    a, s = alpha_sigma(lam)
    x = x_from_v(x, model(x, lam).float(), a, s).clamp(-1.0, 1.0)
    return x if known is None else known.clean(x)


# --- UL generation and reconstruction (UL Alg. 2). `stage1` is anything with .encoder, .decoder, .prior and
# .config (an exported Stage1Bundle or the training objective); `stage2` has .base and .config.


@torch.no_grad()
def reconstruct(stage1, x: Tensor, *, seed: int, steps: int, sampler: str = "ddim",
                indices: Sequence[int] | None = None) -> Tensor:
    """x -> z_clean -> z_0 = α₀ z_clean + σ₀ ε (per-sample ε) -> decoder sample, float in [-1, 1]."""
    from ulcore.diffusion.losses import encode_noise
    from ulcore.diffusion.schedule import decoder_schedule

    m = stage1.config.model
    idx = list(range(x.shape[0])) if indices is None else list(indices)
    z_clean = stage1.encoder(x).float()
    z0 = encode_noise(z_clean, m.logsnr_0, PerSampleNoise(z_clean.shape[1:], sample_seeds(seed, idx), x.device)())
    noise_x = PerSampleNoise(x.shape[1:], sample_seeds(seed + 1, idx), x.device)
    return decode(stage1.decoder, z0, decoder_schedule(m), noise=noise_x, steps=steps, sampler=sampler)


def image_shape(config) -> tuple[int, ...]:
    m, r = config.model, config.data.resolution
    return (m.in_channels, r, r) if m.frames == 1 else (m.in_channels, m.frames, r, r)


def latent_shape(config) -> tuple[int, ...]:
    m = config.model
    h = config.data.resolution // m.downsample
    return (m.latent_channels, h, h) if m.frames == 1 else (m.latent_channels, m.frames // m.temporal_downsample, h, h)


@torch.no_grad()
def sample_prior(stage1, n: int, *, seed: int, steps: int, sampler: str = "ddim",
                 indices: Sequence[int] | None = None, device: str | torch.device = "cpu") -> Tensor:
    """z_0 from the stage-1 prior, unconditional (a monitoring view: stage 2 is the generator); sample i seeded by
    (seed, indices[i]), indices 0 .. n − 1 by default."""
    from ulcore.diffusion.schedule import latent_schedule

    idx = list(range(n)) if indices is None else list(indices)
    noise = PerSampleNoise(latent_shape(stage1.config), sample_seeds(seed, idx), device)
    return SAMPLERS[sampler](stage1.prior, noise(-1), logsnr_grid(latent_schedule(stage1.config.model), steps), noise)


@torch.no_grad()
def generate_from_prior(stage1, n: int, *, seed: int, sampler: str = "ddim", prior_steps: int = 64,
                        decoder_steps: int = 64, indices: Sequence[int] | None = None,
                        device: str | torch.device = "cpu") -> Tensor:
    """UL Alg. 2 with the stage-1 prior in place of the base model: prior z_1 ~ N(0, I) -> z_0 at λ(0), then the
    decoder. The prior's unweighted ELBO weights every latent frequency alike and samples worse than the base model
    (UL §3.3); evaluation measures by how much (gfid_prior). Noise streams: prior chain (seed, i), decoder
    (seed + 1, i)."""
    from ulcore.diffusion.schedule import decoder_schedule

    idx = list(range(n)) if indices is None else list(indices)
    z0 = sample_prior(stage1, len(idx), seed=seed, steps=prior_steps, sampler=sampler, indices=idx, device=device)
    noise_x = PerSampleNoise(image_shape(stage1.config), sample_seeds(seed + 1, idx), device)
    return decode(stage1.decoder, z0, decoder_schedule(stage1.config.model), noise=noise_x, steps=decoder_steps,
                  sampler=sampler)


def context_latents(encoder: torch.nn.Module, context: Tensor, m) -> Tensor:
    """z_clean of the latent frames that c context frames determine: the first c // k of the T/k (blocks [jk, (j+1)k)
    inside the context). The encoder's 3×3×3 convs reach far past each block (at Kinetics size every latent frame
    sees all 16 frames), so the context is held on its last frame up to T frames before encoding: no frame after
    the context reaches the conditioning, and the encoder sees a clip of the length it was trained on."""
    c = context.shape[2]
    held = torch.cat([context, context[:, :, -1:].expand(-1, -1, m.frames - c, -1, -1)], dim=2)
    return encoder(held).float()[:, :, : c // m.temporal_downsample]


@torch.no_grad()
def generate(stage1, stage2, labels: Tensor, *, seed: int, sampler: str = "ddim", base_steps: int = 64,
             decoder_steps: int = 64, guidance: float = 1.0, guidance_interval: Sequence[float] = (-30.0, 30.0),
             indices: Sequence[int] | None = None, context: Tensor | None = None,
             reconstruction_guidance: float = 0.0) -> Tensor:
    """Base model z_1 ~ N(0, I) -> z_0 at λ(0) (guided), then the decoder x_1 -> x given z_0 (UL Alg. 2).

    `context` (B, C, c, H, W) in [-1, 1]: video frame prediction. The base model's chain keeps latent frames
    0 .. c//k − 1 on the forward process of `context_latents` (its last state, at λ(0), is their z_0 = α₀ z + σ₀ ε
    as in reconstruction), optionally with reconstruction guidance of weight `reconstruction_guidance`; the decoder
    keeps all c pixel frames, so out[:, :, :c] == context. Per-sample noise streams: base chain (seed, i), decoder
    (seed + 1, i), context latents (seed + 2, i), context pixels (seed + 3, i)."""
    from ulcore.diffusion.schedule import decoder_schedule, latent_schedule

    m = stage2.config.model
    idx = list(range(labels.shape[0])) if indices is None else list(indices)
    noise = PerSampleNoise(latent_shape(stage2.config), sample_seeds(seed, idx), labels.device)
    model = guided(stage2.base, labels, m.num_classes, guidance, guidance_interval)
    known_z = known_x = None
    if context is not None:
        z_ctx = context_latents(stage1.encoder, context, stage1.config.model)
        known_z = Replacement(z_ctx, PerSampleNoise(z_ctx.shape[1:], sample_seeds(seed + 2, idx), labels.device))
        known_x = Replacement(context, PerSampleNoise(context.shape[1:], sample_seeds(seed + 3, idx), labels.device))
        if reconstruction_guidance > 0:
            model = reconstruction_guided(model, z_ctx, reconstruction_guidance)
    z0 = SAMPLERS[sampler](model, noise(-1), logsnr_grid(latent_schedule(m), base_steps), noise, known_z)
    noise_x = PerSampleNoise(image_shape(stage1.config), sample_seeds(seed + 1, idx), labels.device)
    return decode(stage1.decoder, z0, decoder_schedule(stage1.config.model), noise=noise_x, steps=decoder_steps,
                  sampler=sampler, known=known_x)

