"""MobileNet-V1 for ImageNet (Howard et al. 2017, Table 1).

A 3x3 stride-2 conv stem (32 channels), 13 depthwise-separable blocks (3x3 depthwise conv - BN - ReLU,
1x1 pointwise conv - BN - ReLU), global average pooling and a Linear(1024, num_classes) classifier.
The paper's Table 1 lists stride 2 for the 13th depthwise conv; that is a typo (the output stays 7x7),
so it has stride 1 here, as in the TF-slim reference implementation. ``width_mult`` is the width multiplier
alpha (Sec. 3.3): every layer's channels are ``max(8, int(c * alpha))`` (as in the TF-slim reference,
``min_depth=8``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from qrepro.models import MODELS
from qrepro.models._common import check_positive, conv_bn, kaiming_fan_out_init

# (pointwise output channels, depthwise stride) for the 13 depthwise-separable blocks.
_BLOCKS = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), *[(512, 1)] * 5, (1024, 2), (1024, 1)]


class MobileNetV1(nn.Module):
    """MobileNet-V1 with width multiplier ``width_mult``."""

    def __init__(self, num_classes: int, width_mult: float = 1.0, in_chans: int = 3) -> None:
        super().__init__()

        def ch(c: int) -> int:
            return max(8, int(c * width_mult))

        layers = [nn.Sequential(*conv_bn(in_chans, ch(32), 3, 2))]
        cin = ch(32)
        for cout, stride in _BLOCKS:
            layers.append(nn.Sequential(*conv_bn(cin, cin, 3, stride, groups=cin)))  # depthwise
            layers.append(nn.Sequential(*conv_bn(cin, ch(cout), 1)))  # pointwise
            cin = ch(cout)
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cin, num_classes)
        kaiming_fan_out_init(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


@MODELS.register("mobilenet_v1")
def mobilenet_v1(num_classes: int, width_mult: float = 1.0, in_chans: int = 3) -> MobileNetV1:
    """MobileNet-V1 (4.2M parameters at width 1.0, 1000 classes)."""
    check_positive("mobilenet_v1", "width_mult", width_mult)
    check_positive("mobilenet_v1", "in_chans", in_chans)
    return MobileNetV1(num_classes, float(width_mult), int(in_chans))
