"""Full training state on disk: model, EMA, optimiser, scheduler, progress, RNG (STYLE habit 5).

Saved with torch.save and loaded with `weights_only=True`: the state is tensors and plain containers only.
Every checkpoint folder also holds `meta.json` (samples seen, step, config digest) so the latest one can be
found without loading weights, and `config.yaml`, so a checkpoint describes itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ulcore import storage

STATE_FILE = "state.pt"
META_FILE = "meta.json"


@dataclass(frozen=True)
class Progress:
    samples: int  # samples seen (global), the unit of every interval
    step: int  # optimiser steps taken
    bad_steps: int = 0  # consecutive non-finite steps skipped so far


def save_state(folder: Path, *, model: torch.nn.Module, ema: torch.nn.Module, optimizer: torch.optim.Optimizer,
               scheduler: Any, progress: Progress, grad_clip: dict[str, float], config_yaml: str,
               digest: str) -> None:
    """Write state.pt + meta.json + config.yaml into `folder` (a fresh temp folder handed to Ray)."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {
        "model": model.state_dict(),
        "ema": ema.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "samples": progress.samples,
        "step": progress.step,
        "bad_steps": progress.bad_steps,
        "grad_clip": grad_clip,  # the clipper's running norm and clipped-step count (ulcore/train/clipping.py)
        "torch_rng": torch.get_rng_state(),
    }
    torch.save(state, folder / STATE_FILE)
    meta = {"samples": progress.samples, "step": progress.step, "digest": digest}
    (folder / META_FILE).write_text(json.dumps(meta))
    (folder / "config.yaml").write_text(config_yaml)


def load_state(folder: Path) -> dict[str, Any]:
    """Load on CPU first (no GPU memory spike on resume), tensors only."""
    return torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)


def latest_checkpoint(run_uri: str, digest: str) -> str | None:
    """The checkpoint folder with the most samples under a Ray run folder whose config digest matches, or None.

    Ray restores in-run failures itself; this covers "resume = rerun the same command" after the driver died.
    """
    best: tuple[int, str] | None = None
    for meta_uri in storage.list_uris(run_uri, suffix=META_FILE):
        folder = meta_uri[: -len(META_FILE) - 1]
        try:
            meta = json.loads(storage.read_text(meta_uri))
        except (OSError, ValueError):
            continue  # a half-written checkpoint: never resume from it
        if meta.get("digest") != digest or not storage.exists(storage.join(folder, STATE_FILE)):
            continue
        if best is None or meta["samples"] > best[0]:
            best = (int(meta["samples"]), folder)
    return None if best is None else best[1]


def materialize(folder_uri: str, local_dir: Path) -> Path:
    """A local copy of a checkpoint folder (a no-op path for local storage)."""
    if not storage.is_s3(folder_uri):
        return Path(folder_uri)
    local_dir.mkdir(parents=True, exist_ok=True)
    for name in (STATE_FILE, META_FILE, "config.yaml"):
        storage.download_file(storage.join(folder_uri, name), str(local_dir / name))
    return local_dir
