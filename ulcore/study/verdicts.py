"""One verdict per trend of the paper, computed from the study's numbers: pure functions, numbers in, a `Verdict`
(reproduced or not, and one line with the figures) out.

Tiny runs are noisy, so each check has a tolerance in the metric's own units: a difference smaller than it is a
tie, never evidence either way.
- UL Table 2: bits/pixel and PSNR rise with the loss factor c_lf. Sorted by c_lf, no step may fall by more than the
  tolerance, and the last value must exceed the first by more than it (a flat sweep is not a rise).
- UL Table 6, ablation B: λ(0) = 10 collapses the rate (0.008 bits/pixel against the baseline's 0.059) and the
  reconstructions fail. At λ(0) = 10 the rate must be at most COLLAPSE_RATIO of λ(0) = 5's and PSNR no better.
- UL §3.3: the base model samples better than the stage-1 prior, whose unweighted ELBO weights every frequency
  alike. The base model's gFID must be lower than the prior samples' by more than the FID tolerance.
A number that is missing (a setting not run or failed) gives "not measured", which counts as not reproduced.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

BITS_TOL = 0.002  # bits/pixel; the tiny preset's latent carries ~0.08
PSNR_TOL = 0.1  # dB
FID_TOL = 10.0  # FID points. Measured at N = 200: one model's gFID over four evaluation seeds has sd 4.9
# (217.4-226.8), so two gFIDs from separate sample sets differ with sd ~7; 5 would call 0.7 sd a difference
COLLAPSE_RATIO = 0.5  # λ(0) = 10 "collapses" the rate: at most half of λ(0) = 5's (the paper: 0.14)

LOSS_FACTOR_CLAIM = "UL Table 2: bits/pixel and PSNR rise with the loss factor c_lf"
LOGSNR_0_CLAIM = "UL Table 6: λ(0) = 10 collapses the rate"
BASE_VS_PRIOR_CLAIM = "UL §3.3: the stage-2 base model samples better than the stage-1 prior"


@dataclass(frozen=True)
class Verdict:
    claim: str  # what the paper says, and where
    reproduced: bool
    text: str  # "reproduced: ...", "not reproduced: ..." or "not measured: ...", with the figures

    @property
    def line(self) -> str:
        return f"**{self.claim}** — {self.text}"


def _chain(values: Sequence[float], fmt: str) -> str:
    return " → ".join(format(v, fmt) for v in values)


def rises(xs: Sequence[float], ys: Sequence[float], tol: float) -> tuple[bool, str]:
    """Whether `ys` rise with `xs` within `tol` (no step down by more than tol, last − first > tol), and why not."""
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    x, y = [xs[i] for i in order], [ys[i] for i in order]
    for i in range(len(y) - 1):
        if y[i + 1] < y[i] - tol:
            return False, f"falls from {x[i]:g} to {x[i + 1]:g}"
    if y[-1] - y[0] <= tol:
        return False, f"changes by {y[-1] - y[0]:+.3g} from {x[0]:g} to {x[-1]:g}, within the tie tolerance {tol:g}"
    return True, "rises"


def loss_factor_verdict(points: Sequence[tuple[float, float | None, float | None]], *, bits_tol: float = BITS_TOL,
                        psnr_tol: float = PSNR_TOL) -> Verdict:
    """`points`: (c_lf, bits/pixel, PSNR) per setting at one λ(0)."""
    usable = sorted((lf, b, p) for lf, b, p in points if b is not None and p is not None)
    if len(usable) < 2:
        return Verdict(LOSS_FACTOR_CLAIM, False, f"not measured: {len(usable)} loss factor(s) with numbers, need 2")
    lfs, bits, psnrs = ([u[i] for u in usable] for i in range(3))
    bits_ok, bits_why = rises(lfs, bits, bits_tol)
    psnr_ok, psnr_why = rises(lfs, psnrs, psnr_tol)
    figures = (f"c_lf {_chain(lfs, 'g')} gives bits/pixel {_chain(bits, '.3g')} ({bits_why}) and PSNR "
               f"{_chain(psnrs, '.2f')} dB ({psnr_why})")
    ok = bits_ok and psnr_ok
    return Verdict(LOSS_FACTOR_CLAIM, ok, f"{'reproduced' if ok else 'not reproduced'}: {figures}")


def logsnr_0_verdict(bits_5: float | None, bits_10: float | None, psnr_5: float | None, psnr_10: float | None, *,
                     ratio: float = COLLAPSE_RATIO, psnr_tol: float = PSNR_TOL) -> Verdict:
    """The rate and PSNR at λ(0) = 5 and at λ(0) = 10, same c_lf."""
    if None in (bits_5, bits_10, psnr_5, psnr_10):
        return Verdict(LOGSNR_0_CLAIM, False, "not measured: both λ(0) = 5 and λ(0) = 10 need bits/pixel and PSNR")
    factor = bits_10 / bits_5 if bits_5 > 0 else float("inf")
    collapsed = bits_10 <= ratio * bits_5
    worse = psnr_10 <= psnr_5 + psnr_tol
    figures = (f"λ(0) = 10 gives {bits_10:.3g} bits/pixel against {bits_5:.3g} at λ(0) = 5 (×{factor:.2f}; a "
               f"collapse is ≤ ×{ratio:g}) and PSNR {psnr_10:.2f} against {psnr_5:.2f} dB")
    if collapsed and worse:
        return Verdict(LOGSNR_0_CLAIM, True, f"reproduced: {figures}")
    why = "the rate does not collapse" if not collapsed else "the reconstructions are better"
    return Verdict(LOGSNR_0_CLAIM, False, f"not reproduced ({why}): {figures}")


def base_vs_prior_verdict(gfid_base: float | None, gfid_prior: float | None, *, fid_tol: float = FID_TOL,
                          num_samples: int | None = None) -> Verdict:
    """gFID of the base model's samples and of the stage-1 prior's, same decoder and protocol."""
    if gfid_base is None or gfid_prior is None:
        return Verdict(BASE_VS_PRIOR_CLAIM, False, "not measured: needs the base model's and the prior's gFID")
    diff = gfid_base - gfid_prior
    n = f" (N = {num_samples})" if num_samples else ""
    figures = f"gFID {gfid_base:.1f} from the base model against {gfid_prior:.1f} from the prior{n}, {diff:+.1f}"
    if diff < -fid_tol:
        return Verdict(BASE_VS_PRIOR_CLAIM, True, f"reproduced: {figures}")
    why = f"a tie within ±{fid_tol:g}" if abs(diff) <= fid_tol else "the prior is better"
    return Verdict(BASE_VS_PRIOR_CLAIM, False, f"not reproduced ({why}): {figures}")


__all__ = ["Verdict", "rises", "loss_factor_verdict", "logsnr_0_verdict", "base_vs_prior_verdict", "BITS_TOL",
           "PSNR_TOL", "FID_TOL", "COLLAPSE_RATIO"]
