"""Gradient-norm clipping for losses in nats per example.

UL's stage-1 loss L_z + L_x is a sum over every dimension of an example (UL §3, Eq. 7-8), so its global gradient
norm is in the thousands on the tiny preset (2,000-5,000 over a whole run), not O(1): a fixed threshold of 1.0
clips every step and AdamW then only ever sees normalised gradients. `relative` clipping keeps the maths of the
loss and makes the threshold scale-free: a step is clipped at `grad_clip` times the running mean of recent norms,
so steady steps pass untouched and only spikes are cut. `absolute` keeps the classic fixed threshold.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from torch import nn

RUNNING_MEAN_BETA = 0.95  # running mean of the norm over ~20 steps (half-life 13.5 steps)


class GradClipper:
    """Clips the global gradient norm at `ratio` x its running mean (`relative`) or at `ratio` (`absolute`).

    The running mean is updated with the norm after clipping, so a spike does not raise the threshold of the steps
    after it; the first step only initialises it. `ratio` = 0 turns clipping off (the norm is still measured).
    """

    def __init__(self, mode: str, ratio: float) -> None:
        if mode not in ("relative", "absolute"):
            raise ValueError(f"grad_clip_mode = {mode!r}: must be relative or absolute")
        self.mode, self.ratio = mode, ratio
        self.running_norm = 0.0  # 0 = no step seen yet
        self.clipped_steps = 0

    def threshold(self) -> float:
        if self.ratio == 0 or (self.mode == "relative" and self.running_norm == 0.0):
            return math.inf
        return self.ratio * (self.running_norm if self.mode == "relative" else 1.0)

    def observe(self, norm: float) -> bool:
        """Account for one step's global norm (before clipping); True when that step is clipped."""
        limit = self.threshold()
        clipped = norm > limit
        kept = min(norm, limit)
        if math.isfinite(kept):  # a non-finite norm must not poison the threshold of every later step
            self.running_norm = kept if self.running_norm == 0.0 else (
                RUNNING_MEAN_BETA * self.running_norm + (1 - RUNNING_MEAN_BETA) * kept)
        self.clipped_steps += int(clipped)
        return clipped

    def clip_(self, parameters: Iterable[nn.Parameter]) -> tuple[float, bool]:
        """Clip the gradients in place; returns (global norm before clipping, whether it was clipped)."""
        norm = float(nn.utils.clip_grad_norm_(parameters, self.threshold()))
        return norm, self.observe(norm)

    def state_dict(self) -> dict[str, float]:
        return {"running_norm": self.running_norm, "clipped_steps": self.clipped_steps}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.running_norm, self.clipped_steps = float(state["running_norm"]), int(state["clipped_steps"])
