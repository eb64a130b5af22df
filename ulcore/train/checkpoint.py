"""Full training state on disk: model, EMA, optimiser, scheduler, progress, RNG (resume = rerun the same command).

Saved with torch.save and loaded with `weights_only=True`: the state is tensors and plain containers only.
Every checkpoint folder also holds `meta.json` (samples seen, step, config digest, and the size and sha256 of
state.pt) so the latest intact one can be found without loading weights, and `config.yaml`, so a checkpoint
describes itself. Resume takes the newest checkpoint whose state.pt matches its recorded size and sha256 and says
which newer ones it skipped and why (path and problem), and that it starts from 0 when none is intact.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ulcore import storage
from ulcore.errors import CorruptCheckpointError

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
    meta = {"samples": progress.samples, "step": progress.step, "digest": digest,
            "state_bytes": (folder / STATE_FILE).stat().st_size, "state_sha256": _sha256(str(folder / STATE_FILE))}
    (folder / META_FILE).write_text(json.dumps(meta))
    (folder / "config.yaml").write_text(config_yaml)


def load_state(folder: Path) -> dict[str, Any]:
    """Load on CPU first (no GPU memory spike on resume), tensors only; a file that does not load names itself."""
    path = folder / STATE_FILE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch reports a truncated zip as a bare PytorchStreamReader RuntimeError
        raise CorruptCheckpointError(f"{path}: cannot load the training state ({type(exc).__name__}: "
                                     f"{str(exc).strip().splitlines()[0]})") from exc


def _sha256(uri: str) -> str:
    digest = hashlib.sha256()
    with storage.open_read(uri) as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def check_checkpoint(folder_uri: str) -> dict[str, Any]:
    """meta.json of an intact checkpoint; CorruptCheckpointError naming the file otherwise. state.pt must have the
    size and sha256 recorded when it was saved (checkpoints from before the record are checked by loading)."""
    meta_uri, state_uri = storage.join(folder_uri, META_FILE), storage.join(folder_uri, STATE_FILE)
    try:
        meta = json.loads(storage.read_text(meta_uri))
    except (OSError, ValueError) as exc:
        raise CorruptCheckpointError(f"{meta_uri}: unreadable ({type(exc).__name__}: {exc})") from exc
    if not storage.exists(state_uri):
        raise CorruptCheckpointError(f"{state_uri}: missing")
    if "state_sha256" not in meta:  # saved before sizes and hashes were recorded: check that it loads
        with tempfile.TemporaryDirectory() as tmp:
            load_state(materialize(folder_uri, Path(tmp)))
        return meta
    found = _sha256(state_uri)
    if found != meta["state_sha256"]:
        raise CorruptCheckpointError(f"{state_uri}: sha256 {found[:12]} does not match the {meta['state_sha256'][:12]} "
                                     f"recorded at save time ({meta['state_bytes']} bytes): truncated or overwritten")
    return meta


def latest_checkpoint(run_uri: str, digest: str) -> str | None:
    """The intact checkpoint folder with the most samples under a Ray run folder whose config digest matches, or
    None. Newer ones that are not intact are skipped, each named with its problem; when every one is broken (a kill
    during the first checkpoint's upload) training starts again from 0 samples and says so.

    This is the resume point of every attempt: a rerun of the same command and a retry after a lost worker.
    """
    candidates: list[tuple[int, str]] = []
    for meta_uri in storage.list_uris(run_uri, suffix=META_FILE):
        folder = meta_uri[: -len(META_FILE) - 1]
        try:
            meta = json.loads(storage.read_text(meta_uri))
        except (OSError, ValueError):
            meta = {"digest": digest, "samples": -1}  # unreadable: checked (and reported) below like any other
        if meta.get("digest") == digest:
            candidates.append((int(meta.get("samples", -1)), folder))
    problems = []
    for _, folder in sorted(candidates, reverse=True):
        try:
            check_checkpoint(folder)
        except CorruptCheckpointError as exc:
            problems.append(str(exc))
            print(f"skipping checkpoint {folder}: {exc}", flush=True)
            continue
        return folder
    if problems:
        print(f"WARNING: {run_uri}: none of its {len(problems)} checkpoint(s) is intact (listed above): training "
              "starts again from 0 samples", flush=True)
    return None


def materialize(folder_uri: str, local_dir: Path) -> Path:
    """A local copy of a checkpoint folder (a no-op path for local storage)."""
    if not storage.is_s3(folder_uri):
        return Path(folder_uri)
    local_dir.mkdir(parents=True, exist_ok=True)
    for name in (STATE_FILE, META_FILE, "config.yaml"):
        storage.download_file(storage.join(folder_uri, name), str(local_dir / name))
    return local_dir
