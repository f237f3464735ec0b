"""Full pre-activation ResNet-50 for ImageNet (He et al. 2016, "Identity Mappings in Deep Residual
Networks"), the PreResNet-50 of the SAT paper.

Each bottleneck unit computes ``x + F(x)`` with ``F = conv1x1(ReLU(BN(conv3x3(ReLU(BN(conv1x1(
ReLU(BN(x)))))))))``: BN-ReLU-conv ordering, nothing after the addition. As the paper prescribes
(Sec. 4.1): the first unit follows the stem's own BN-ReLU, so it has no pre-activation of its own, and
an extra BN-ReLU follows the last unit, before global average pooling.

Choices the paper leaves open (documented here, not switchable):
- stride 2 sits in the 3x3 conv of the first unit of stages 2-4 (as in torchvision's ResNet v1.5);
- a projection shortcut (first unit of every stage) is a plain 1x1 conv with no BN after it (every
  BN precedes a conv in a full pre-activation network) and it takes the *pre-activated* input, i.e.
  the BN-ReLU is shared by both paths of that unit; identity shortcuts take the raw input.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from qrepro.models import MODELS
from qrepro.models._common import check_positive, kaiming_fan_out_init


class PreActBottleneck(nn.Module):
    """Pre-activation bottleneck: [BN-ReLU] conv1x1 - BN-ReLU - conv3x3 - BN-ReLU - conv1x1 (+ shortcut)."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int, preact: bool) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        # preact=False only for the very first unit, whose input is the stem's BN-ReLU output.
        self.bn1: nn.Module = nn.BatchNorm2d(in_planes) if preact else nn.Identity()
        self.relu1: nn.Module = nn.ReLU() if preact else nn.Identity()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.relu3 = nn.ReLU()
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        a = self.relu1(self.bn1(x))
        identity = x if self.shortcut is None else self.shortcut(a)
        out = self.conv1(a)
        out = self.conv2(self.relu2(self.bn2(out)))
        out = self.conv3(self.relu3(self.bn3(out)))
        return out + identity


class PreActResNet(nn.Module):
    """ImageNet pre-activation ResNet with bottleneck units (``layers`` units per stage)."""

    def __init__(self, layers: tuple[int, int, int, int], num_classes: int, in_chans: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_planes = 64
        stages = []
        for s, (planes, count) in enumerate(zip((64, 128, 256, 512), layers)):
            units = []
            for i in range(count):
                stride = 2 if (i == 0 and s > 0) else 1
                units.append(PreActBottleneck(in_planes, planes, stride, preact=not (s == 0 and i == 0)))
                in_planes = planes * PreActBottleneck.expansion
            stages.append(nn.Sequential(*units))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn_final = nn.BatchNorm2d(in_planes)
        self.relu_final = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        kaiming_fan_out_init(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.relu_final(self.bn_final(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@MODELS.register("preresnet50")
def preresnet50(num_classes: int, in_chans: int = 3) -> PreActResNet:
    """Full pre-activation ResNet-50 (3, 4, 6, 3 bottleneck units; 25.5M parameters at 1000 classes)."""
    check_positive("preresnet50", "in_chans", in_chans)
    return PreActResNet((3, 4, 6, 3), num_classes, in_chans)
