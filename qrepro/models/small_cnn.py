"""A tiny CNN for the digits demo and the tests (trains to >90% on sklearn digits in a few CPU epochs).

Three conv3x3-BN-ReLU blocks with 16/32/64 channels (2x2 max-pooling after the first two), average
pooling to a 4x4 map and a Linear(64*16, num_classes) classifier; 34k parameters at 10 classes.
Pooling to 4x4 rather than 1x1 keeps the coarse layout digits need (6 vs 9) and makes training fast.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from qrepro.models import MODELS
from qrepro.models._common import check_positive, kaiming_fan_out_init


class SmallCNN(nn.Module):
    def __init__(self, num_classes: int, in_chans: int = 3, width: int = 16) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for cin, cout in ((in_chans, width), (width, 2 * width), (2 * width, 4 * width)):
            pool = [nn.MaxPool2d(2)] if cout < 4 * width else []
            layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(), *pool]
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(4)
        self.fc = nn.Linear(4 * width * 16, num_classes)
        kaiming_fan_out_init(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.avgpool(self.features(x)), 1))


@MODELS.register("small_cnn")
def small_cnn(num_classes: int, width: int = 16, in_chans: int = 3) -> SmallCNN:
    """Tiny conv-BN-ReLU x3 network (channels width, 2*width, 4*width)."""
    check_positive("small_cnn", "width", width)
    check_positive("small_cnn", "in_chans", in_chans)
    return SmallCNN(num_classes, int(in_chans), int(width))
