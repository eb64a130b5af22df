"""I3D (Carreira & Zisserman 2017, Fig. 3; RGB stream, Kinetics-400 classifier) as a PyTorch module: Inception-v1
inflated to 3D, TF 'SAME' padding, in the state-dict layout of the VideoGPT / TATS `i3d_pretrained_400.pt` file
(module names Conv3d_1a_7x7 ... Mixed_5c, logits), so that file loads into it as it is. `i3d.py` loads the weights
and prepares clips for it; `fvd.py` is the metric.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NUM_CLASSES = 400


def _same_pad(size: int, k: int, s: int) -> tuple[int, int]:
    """TF 'SAME' padding for one dimension: total = max(k - s, 0) or max(k - size % s, 0), front gets the floor."""
    total = max(k - s, 0) if size % s == 0 else max(k - size % s, 0)
    return total // 2, total - total // 2


def _pad_same(x: torch.Tensor, kernel: tuple[int, int, int], stride: tuple[int, int, int]) -> torch.Tensor:
    (pt, pt2), (ph, ph2), (pw, pw2) = (_same_pad(x.shape[2 + i], kernel[i], stride[i]) for i in range(3))
    return F.pad(x, (pw, pw2, ph, ph2, pt, pt2))


class Unit3D(nn.Module):
    """Conv3d with TF 'SAME' padding, optional BatchNorm (eps 1e-3) and ReLU."""

    def __init__(self, cin: int, cout: int, kernel=(1, 1, 1), stride=(1, 1, 1), *, bn: bool = True,
                 relu: bool = True, bias: bool = False) -> None:
        super().__init__()
        self.kernel, self.stride, self.relu = tuple(kernel), tuple(stride), relu
        self.conv3d = nn.Conv3d(cin, cout, self.kernel, self.stride, padding=0, bias=bias)
        self.bn = nn.BatchNorm3d(cout, eps=1e-3, momentum=0.01) if bn else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv3d(_pad_same(x, self.kernel, self.stride))
        if self.bn is not None:
            x = self.bn(x)
        return F.relu(x) if self.relu else x


class MaxPoolSame(nn.Module):
    def __init__(self, kernel, stride) -> None:
        super().__init__()
        self.kernel, self.stride = tuple(kernel), tuple(stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool3d(_pad_same(x, self.kernel, self.stride), self.kernel, self.stride)


class InceptionBlock(nn.Module):
    """Four branches: 1x1 | 1x1 -> 3x3 | 1x1 -> 3x3 | maxpool 3x3 -> 1x1, concatenated on channels."""

    def __init__(self, cin: int, c: tuple[int, int, int, int, int, int]) -> None:
        super().__init__()
        self.b0 = Unit3D(cin, c[0])
        self.b1a, self.b1b = Unit3D(cin, c[1]), Unit3D(c[1], c[2], (3, 3, 3))
        self.b2a, self.b2b = Unit3D(cin, c[3]), Unit3D(c[3], c[4], (3, 3, 3))
        self.b3a, self.b3b = MaxPoolSame((3, 3, 3), (1, 1, 1)), Unit3D(cin, c[5])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], dim=1)


# (name, kind, args) in forward order; channel plan of Inception-v1 inflated to 3D (I3D paper, Fig. 3).
_PLAN = [
    ("Conv3d_1a_7x7", "conv", (3, 64, (7, 7, 7), (2, 2, 2))),
    ("MaxPool3d_2a_3x3", "pool", ((1, 3, 3), (1, 2, 2))),
    ("Conv3d_2b_1x1", "conv", (64, 64, (1, 1, 1), (1, 1, 1))),
    ("Conv3d_2c_3x3", "conv", (64, 192, (3, 3, 3), (1, 1, 1))),
    ("MaxPool3d_3a_3x3", "pool", ((1, 3, 3), (1, 2, 2))),
    ("Mixed_3b", "mix", (192, (64, 96, 128, 16, 32, 32))),
    ("Mixed_3c", "mix", (256, (128, 128, 192, 32, 96, 64))),
    ("MaxPool3d_4a_3x3", "pool", ((3, 3, 3), (2, 2, 2))),
    ("Mixed_4b", "mix", (480, (192, 96, 208, 16, 48, 64))),
    ("Mixed_4c", "mix", (512, (160, 112, 224, 24, 64, 64))),
    ("Mixed_4d", "mix", (512, (128, 128, 256, 24, 64, 64))),
    ("Mixed_4e", "mix", (512, (112, 144, 288, 32, 64, 64))),
    ("Mixed_4f", "mix", (528, (256, 160, 320, 32, 128, 128))),
    ("MaxPool3d_5a_2x2", "pool", ((2, 2, 2), (2, 2, 2))),
    ("Mixed_5b", "mix", (832, (256, 160, 320, 32, 128, 128))),
    ("Mixed_5c", "mix", (832, (384, 192, 384, 48, 128, 128))),
]


class InceptionI3d(nn.Module):
    """I3D (RGB stream) with state-dict names of the VideoGPT/TATS `i3d_pretrained_400.pt` file."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.order = [name for name, _, _ in _PLAN]
        for name, kind, args in _PLAN:
            if kind == "conv":
                module = Unit3D(args[0], args[1], args[2], args[3])
            elif kind == "pool":
                module = MaxPoolSame(*args)
            else:
                module = InceptionBlock(*args)
            self.add_module(name, module)
        self.logits = Unit3D(1024, num_classes, bn=False, relu=False, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, T, 224, 224) in [-1, 1] -> (N, num_classes) logits averaged over time."""
        for name in self.order:
            x = getattr(self, name)(x)
        x = F.avg_pool3d(x, (2, 7, 7), stride=1)  # the Logits avg-pool; dropout is identity in eval
        return self.logits(x).mean(dim=(2, 3, 4))


__all__ = ["InceptionI3d", "Unit3D", "MaxPoolSame", "InceptionBlock", "NUM_CLASSES"]
