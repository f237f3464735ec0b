"""ReActNet-18 (Liu et al., "ReActNet: Towards Precise Binary Neural Network with Generalized Activation
Functions", ECCV 2020): the Bi-Real-Net-18 based ReActNet.

Every basic block is one 3x3 convolution with a real-valued shortcut around it (Bi-Real Net):

    out = BN(conv3x3(RSign_input(x))) + shortcut(x)
    out = RPReLU(out) = PReLU(out − γ) + ζ          (γ, ζ: learnable per-channel biases ``move1``, ``move2``)

RSign (Eq. 1 of the paper) is ``sign(x − α)`` with a learnable per-channel α: here ``move0`` adds the learnable
bias (−α) and the ``sign`` itself is the activation quantizer that ``quantizer=reactnet`` puts on
``binary_conv``'s input (:mod:`qrepro.quant.methods.reactnet`), so the model on its own (``quantizer=fp``) is
the real-valued network with the same parameters. The binary convolutions are the blocks' ``binary_conv``;
the stem, the classifier and the shortcut projections (``downsample`` = 2x2 average pool with stride 2, 1x1
conv, BN: Bi-Real Net's real-valued downsampling) stay real-valued, so there are 16 binary convolutions and
the parameter count is that of ResNet-18 plus the biases and PReLU slopes (11.2M at 10/100 classes with the
CIFAR stem: the "11,235K" the TR paper gives for its CIFAR-100 ReActNet-18).

Module names follow the authors' code (``conv1``, ``bn1``, ``layerN.i.{move0, binary_conv, bn1, move1, prelu,
move2, downsample}``, ``fc``), and the biases keep its (1, C, 1, 1) shape, so their checkpoints load strictly
(``module.`` prefixes stripped by the ``reactnet-authors`` converter below, applied by ``init_from``).

``stem``: ``imagenet`` = 7x7 stride-2 conv + 3x3 stride-2 max pool (authors' ImageNet network); ``cifar`` =
3x3 stride-1 conv, no max pool (the usual CIFAR adaptation of ResNet-18, 4x4 feature map before pooling at 32x32).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from qrepro.models import MODELS
from qrepro.models._common import block_stages, check_choice, check_positive, conv_bn
from qrepro.registry import register_converter


class LearnableBias(nn.Module):
    """x + b with a learnable per-channel b of shape (1, C, 1, 1), initialised to 0 (RSign/RPReLU shifts)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.bias


class ReActBlock(nn.Module):
    """``RPReLU(BN(binary_conv(move0(x))) + shortcut(x))``; ``binary_conv``'s input sign is the quantizer's."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.move0 = LearnableBias(inplanes)
        self.binary_conv = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        # RPReLU (Eq. 3) = move2(PReLU(move1(.))): shifts move1.bias = −γ, move2.bias = ζ, slope β init 0.25
        self.move1 = LearnableBias(planes)
        self.prelu = nn.PReLU(planes)
        self.move2 = LearnableBias(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.AvgPool2d(kernel_size=2, stride=stride), *conv_bn(inplanes, planes, 1, relu=False)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn1(self.binary_conv(self.move0(x)))
        residual = x if self.downsample is None else self.downsample(x)
        return self.move2(self.prelu(self.move1(out + residual)))


class ReActNet(nn.Module):
    """ReActNet on Bi-Real-Net (``blocks`` basic blocks per stage at 64/128/256/512 channels)."""

    def __init__(
        self,
        blocks: tuple[int, int, int, int],
        num_classes: int,
        stem: str = "imagenet",
        in_chans: int = 3,
        name: str = "reactnet18",
    ) -> None:
        super().__init__()
        check_choice(name, "stem", stem, ("imagenet", "cifar"))
        check_positive(name, "in_chans", in_chans)
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_chans, 64, 7, stride=2, padding=3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            self.conv1 = nn.Conv2d(in_chans, 64, 3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(64)
        spec = [(planes, n, stride) for planes, stride, n in zip((64, 128, 256, 512), (1, 2, 2, 2), blocks)]
        stages = (nn.Sequential(*b) for b in block_stages(64, spec, ReActBlock))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@MODELS.register("reactnet18")
def reactnet18(num_classes: int, stem: str = "imagenet", in_chans: int = 3) -> ReActNet:
    """ReActNet-18 (Bi-Real-Net-18 based): 4 blocks per stage, 16 binary 3x3 convolutions."""
    return ReActNet((4, 4, 4, 4), num_classes, stem, in_chans, name="reactnet18")


@register_converter("reactnet-authors")
def convert_authors_state_dict(sd: dict) -> dict | None:
    """The ReActNet authors' checkpoint (``{'state_dict': ...}`` saved from ``nn.DataParallel``, keys
    ``module.<name>``) -> ours: the ``module.`` prefix removed, every name and shape kept. Returns None when
    the keys are not ReActNet's (RSign shifts ``layerS.B.move0.bias`` and ``layerS.B.binary_conv.weight``)."""
    if not sd or not all(isinstance(k, str) and k.startswith("module.") for k in sd):
        return None
    keys = [k.removeprefix("module.") for k in sd]
    if not any(k.endswith(".move0.bias") for k in keys) or not any(k.endswith(".binary_conv.weight") for k in keys):
        return None
    return dict(zip(keys, sd.values()))
