"""The networks of the SAT authors' code (their AdaBits repository: ``models/q_mobilenet_v1.py``,
``q_mobilenet_v2.py``, ``q_resnet_cifar.py``), written here as plain FP modules for ``qrepro.quant.prepare``.

The SAT experiments use these, so that a quantized model is the network the paper's numbers came from:

- ``sat_mobilenet_v1``: 3x3/2 stem (32) and 13 depthwise-separable blocks (64, 128x2, 256x2, 512x6, 1024x2; the
  first block of each group after the first has stride 2), global average pool, Linear(1024, classes).
- ``sat_mobilenet_v2``: 3x3/2 stem (32), inverted residual blocks (t, c, n, s) = (1,16,1,1) (6,24,2,2)
  (6,32,3,2) (6,64,4,2) (6,96,3,1) (6,160,3,2) (6,320,1,1) with a residual addition where the shape is kept,
  1x1 tail conv to 1280, global average pool, Linear(1280, classes). ``sat_mobilenet_v2_cifar``: the same
  blocks with the stem and the 24-/32-channel stages at stride 1 (32x32 -> 8x8, as ``mobilenet_v2_cifar``).
- ``sat_resnet20`` / ``sat_resnet56``: CIFAR ResNet with 3x3 stem (16), three stages of basic blocks (16, 32, 64
  channels), a 1x1 conv + BN projection shortcut where the shape changes (quantized like every other conv),
  ReLU after the addition, global average pool, Linear(64, classes).

How they differ from the zoo's other models of the same name: ReLU everywhere (never ReLU6; PACT's learned clip
takes the place of the 6), no dropout, the linear bottleneck outputs of MobileNet-V2 stay signed (a quantizer
with ``signed_act: false`` clips them at 0, as the authors' layers do), and the authors' initialisation: conv
weights N(0, 2 / (k_h k_w C_out)), BN weight 1 / bias 0, linear weights N(0, 0.01) and bias 0.

Module names follow the authors' (``head``, ``stage_{i}_layer_{j}.body``, ``.shortcut``, ``tail``,
``classifier.0``), so their state dicts map key for key onto ours: ``adabits_state_dict`` does that mapping
(their switchable BN holds one BN per bit-width as ``.bn.<k>``, their layers hold the PACT clip as ``.alpha``).
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from torch import Tensor, nn

from qrepro.models import MODELS
from qrepro.models._common import MBV2_CIFAR_STAGES, MBV2_STAGES, block_stages, conv_bn

MBV1_STAGES = [(64, 1, 1), (128, 2, 2), (256, 2, 2), (512, 6, 2), (1024, 2, 2)]  # (channels, blocks, stride)


def sat_init(model: nn.Module) -> None:
    """The authors' initialisation: conv N(0, 2/(k_h k_w C_out)), BN (1, 0), linear N(0, 0.01) with zero bias."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


class _Net(nn.Module):
    """head -> stages -> [tail] -> global average pool -> Linear(width, classes), with the authors' initialisation.

    Block ``j`` of stage ``i`` is the module ``stage_{i}_layer_{j}``."""

    def __init__(
        self, head: list[nn.Module], stages: list[list[nn.Module]], tail: list[nn.Module], width: int, num_classes: int
    ) -> None:
        super().__init__()
        self.head = nn.Sequential(*head)
        self.stage_names = []
        for i, blocks in enumerate(stages):
            for j, block in enumerate(blocks):
                self.stage_names.append(f"stage_{i}_layer_{j}")
                self.add_module(self.stage_names[-1], block)
        if tail:
            self.tail = nn.Sequential(*tail)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(width, num_classes))
        sat_init(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.head(x)
        for name in self.stage_names:
            x = getattr(self, name)(x)
        if hasattr(self, "tail"):
            x = self.tail(x)
        return self.classifier(torch.flatten(self.avgpool(x), 1))


class DepthwiseSeparable(nn.Module):
    """3x3 depthwise conv - BN - ReLU - 1x1 conv - BN - ReLU."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(*conv_bn(cin, cin, 3, stride, groups=cin), *conv_bn(cin, cout, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


class MobileNetV1SAT(_Net):
    def __init__(self, num_classes: int) -> None:
        head = conv_bn(3, 32, 3, 2)
        super().__init__(head, block_stages(32, MBV1_STAGES, DepthwiseSeparable), [], 1024, num_classes)


class InvertedResidual(nn.Module):
    """[1x1 expand conv - BN - ReLU] - 3x3 depthwise conv - BN - ReLU - 1x1 project conv - BN (linear
    bottleneck), plus the input where stride 1 keeps the channel count."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers = conv_bn(cin, hidden, 1) if expand != 1 else []
        layers += conv_bn(hidden, hidden, 3, stride, groups=hidden) + conv_bn(hidden, cout, 1, relu=False)
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        out = self.body(x)
        return out + x if self.residual else out


class MobileNetV2SAT(_Net):
    def __init__(self, num_classes: int, stages: list[tuple[int, int, int, int]], stem_stride: int) -> None:
        head = conv_bn(3, 32, 3, stem_stride)
        blocks = block_stages(32, [(c, n, s, t) for t, c, n, s in stages], InvertedResidual)
        super().__init__(head, blocks, conv_bn(stages[-1][1], 1280, 1), 1280, num_classes)


class BasicBlockSAT(nn.Module):
    """3x3 conv - BN - ReLU - 3x3 conv - BN, plus the input or a 1x1 conv + BN projection of it, then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(*conv_bn(cin, cout, 3, stride), *conv_bn(cout, cout, 3, relu=False))
        self.projection = stride != 1 or cin != cout
        if self.projection:
            self.shortcut = nn.Sequential(*conv_bn(cin, cout, 1, stride, relu=False))
        self.post_relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.post_relu(self.body(x) + (self.shortcut(x) if self.projection else x))


class CifarResNetSAT(_Net):
    def __init__(self, num_classes: int, depth: int) -> None:
        n, head = (depth - 2) // 6, conv_bn(3, 16, 3)
        blocks = block_stages(16, [(16, n, 1), (32, n, 2), (64, n, 2)], BasicBlockSAT)
        super().__init__(head, blocks, [], 64, num_classes)


@MODELS.register("sat_mobilenet_v1")
def sat_mobilenet_v1(num_classes: int) -> MobileNetV1SAT:
    """The SAT authors' MobileNet-V1 (4.2M parameters at 1000 classes)."""
    return MobileNetV1SAT(num_classes)


@MODELS.register("sat_mobilenet_v2")
def sat_mobilenet_v2(num_classes: int) -> MobileNetV2SAT:
    """The SAT authors' MobileNet-V2: ReLU, no dropout (3.5M parameters at 1000 classes)."""
    return MobileNetV2SAT(num_classes, MBV2_STAGES, stem_stride=2)


@MODELS.register("sat_mobilenet_v2_cifar")
def sat_mobilenet_v2_cifar(num_classes: int) -> MobileNetV2SAT:
    """The SAT authors' MobileNet-V2 blocks for 32x32 inputs (stem and the 24-/32-channel stages at stride 1)."""
    return MobileNetV2SAT(num_classes, MBV2_CIFAR_STAGES, stem_stride=1)


@MODELS.register("sat_resnet20")
def sat_resnet20(num_classes: int) -> CifarResNetSAT:
    """The SAT authors' CIFAR ResNet-20 (1x1 conv + BN projection shortcuts; 0.27M parameters)."""
    return CifarResNetSAT(num_classes, 20)


@MODELS.register("sat_resnet56")
def sat_resnet56(num_classes: int) -> CifarResNetSAT:
    """The SAT authors' CIFAR ResNet-56 (1x1 conv + BN projection shortcuts)."""
    return CifarResNetSAT(num_classes, 56)


_SWITCH_BN = re.compile(r"\.bn\.(\d+)\.")


def adabits_key(key: str, bits_index: int = 0) -> str | None:
    """The name in our models of an entry of the authors' state dicts (None: a BN of another bit-width)."""
    key = key.removeprefix("module.")
    m = _SWITCH_BN.search(key)
    if m:
        if int(m.group(1)) != bits_index:
            return None
        key = key[: m.start()] + "." + key[m.end() :]
    if key.endswith(".alpha"):
        key = key[: -len("alpha")] + "aq.alpha"
    return key


def adabits_state_dict(sd: dict[str, Any], target: dict[str, Any], bits_index: int = 0) -> dict[str, Any]:
    """A state dict of the authors' models converted for our quantized model, whose state dict is ``target``.

    Their switchable BN ``X.bn.<k>.*`` becomes ``X.*`` (``k = bits_index``, the position of the bit-width in
    their ``bits_list``; the others are dropped), a layer's PACT clip ``X.alpha`` (a scalar, or one per
    bit-width) becomes ``X.aq.alpha``, a ``module.`` prefix is removed, and entries our model does not have
    (the clip of their weight-only first conv) are dropped. Our quantizers' own buffers, which the authors'
    layers do not have (``aq.signed``, ``wq.rescale_on``), keep their values from ``target``. Raises KeyError
    if anything else of ``target`` is not covered.
    """
    out: dict[str, Any] = {}
    for k, v in sd.items():
        key = adabits_key(k, bits_index)
        if key is None or key not in target:
            continue
        if key.endswith(".aq.alpha") and isinstance(v, Tensor) and v.dim() == 1:
            v = v[bits_index]
        out[key] = v
    out.update({k: v for k, v in target.items() if k not in out and k.endswith((".aq.signed", ".wq.rescale_on"))})
    missing = [k for k in target if k not in out]
    if missing:
        raise KeyError(f"not in the authors' state dict: {missing[:8]}")
    return out
