"""CIFAR ResNets (He et al. 2016, "Deep Residual Learning", Sec. 4.2): ResNet-20 / ResNet-56.

A 3x3 conv stem with 16 channels, three stages of ``n`` basic blocks with 16/32/64 channels (the
first block of stages 2 and 3 has stride 2), global average pooling (an 8x8 map at 32x32 input, the
"average pool 8" of the reference code) and a Linear(64, num_classes) classifier; depth = 6n + 2.

Options, after what the papers' authors used (the authors' code; docs/):
- ``shortcut="A"``: parameter-free shortcut when the shape changes (stride-2 subsampling + zero
  channel padding), the paper's option A, used by the TR authors.
- ``shortcut="B"``: 1x1 conv (stride 2) + BN projection when the shape changes, identity otherwise
  (APoT authors). The 1x1 conv is a plain ``nn.Conv2d``, so it is quantized like the others.
- ``bn_before_fc=True``: an extra BatchNorm1d on the pooled features before the classifier (TR authors).
- ``init="kaiming"``: He-normal fan-out init for convs (APoT authors); ``"torch"`` keeps PyTorch's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qrepro.models import MODELS
from qrepro.models._common import block_stages, check_choice, check_positive, conv_bn, kaiming_fan_out_init


class ZeroPadShortcut(nn.Module):
    """Option-A shortcut: ``x[:, :, ::s, ::s]`` zero-padded from ``in_planes`` to ``out_planes`` channels.

    The new channels are split evenly before and after the existing ones (no parameters).
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        if out_planes < in_planes:
            raise ValueError("option-A shortcut cannot reduce the number of channels")
        self.stride = stride
        self.pad_front = (out_planes - in_planes) // 2
        self.pad_back = out_planes - in_planes - self.pad_front

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_front, self.pad_back))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, pad=({self.pad_front}, {self.pad_back})"


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int, shortcut: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            if shortcut == "A":
                self.shortcut = ZeroPadShortcut(in_planes, planes, stride)
            else:
                self.shortcut = nn.Sequential(*conv_bn(in_planes, planes, 1, stride, relu=False))
        self.relu2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs (He et al. 2016, Sec. 4.2)."""

    def __init__(
        self,
        n: int,
        num_classes: int,
        shortcut: str = "A",
        bn_before_fc: bool = False,
        init: str = "kaiming",
        in_chans: int = 3,
        name: str = "cifar_resnet",
    ) -> None:
        super().__init__()
        check_choice(name, "shortcut", shortcut, ("A", "B"))
        check_choice(name, "init", init, ("kaiming", "torch"))
        check_choice(name, "bn_before_fc", bn_before_fc, (False, True))
        check_positive(name, "in_chans", in_chans)
        self.conv1 = nn.Conv2d(in_chans, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        spec = [(16, n, 1, shortcut), (32, n, 2, shortcut), (64, n, 2, shortcut)]
        self.layer1, self.layer2, self.layer3 = (nn.Sequential(*b) for b in block_stages(16, spec, BasicBlock))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.bn_fc = nn.BatchNorm1d(64) if bn_before_fc else nn.Identity()
        self.fc = nn.Linear(64, num_classes)
        if init == "kaiming":
            kaiming_fan_out_init(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(self.pool(x), 1)
        return self.fc(self.bn_fc(x))


def _register(name: str, n: int, params: str) -> None:
    def factory(
        num_classes: int, shortcut: str = "A", bn_before_fc: bool = False, init: str = "kaiming", in_chans: int = 3
    ) -> CifarResNet:
        return CifarResNet(n, num_classes, shortcut, bn_before_fc, init, in_chans, name=name)

    factory.__doc__ = f"CIFAR ResNet-{6 * n + 2} (n={n}; {params} parameters with option A, 10 classes)."
    MODELS.register(name)(factory)


_register("resnet20", 3, "0.27M")
_register("resnet56", 9, "0.85M")
