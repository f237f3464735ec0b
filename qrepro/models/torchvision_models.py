"""ImageNet models taken from torchvision (random init, ``weights=None``): ResNet-18/34/50,
MobileNet-V2, MobileNet-V3-Large, and a CIFAR-size MobileNet-V2.

torchvision's module order already satisfies the zoo's layout rules (stem conv first, classifier
the last ``nn.Linear``), and its convs/linears are plain ``nn.Conv2d``/``nn.Linear``.
"""

from __future__ import annotations

from torch import nn
from torchvision import models as tvm

from qrepro.models import MODELS
from qrepro.models._common import MBV2_CIFAR_STAGES, check_dropout, check_positive


def _register_resnet(name: str, doc: str) -> None:
    def factory(num_classes: int) -> nn.Module:
        return getattr(tvm, name)(weights=None, num_classes=num_classes)

    factory.__doc__ = doc
    MODELS.register(name)(factory)


_register_resnet("resnet18", "torchvision ResNet-18 (11.7M parameters at 1000 classes).")
_register_resnet("resnet34", "torchvision ResNet-34 (21.8M parameters at 1000 classes).")
_register_resnet("resnet50", "torchvision ResNet-50 v1.5 (stride in the 3x3 conv; 25.6M parameters at 1000 classes).")


@MODELS.register("mobilenet_v2")
def mobilenet_v2(num_classes: int, width_mult: float = 1.0, dropout: float = 0.2) -> nn.Module:
    """torchvision MobileNet-V2 (Sandler et al. 2018; 3.5M parameters at width 1.0, 1000 classes)."""
    check_positive("mobilenet_v2", "width_mult", width_mult)
    check_dropout("mobilenet_v2", dropout)
    return tvm.mobilenet_v2(weights=None, num_classes=num_classes, width_mult=float(width_mult), dropout=dropout)


@MODELS.register("mobilenet_v2_cifar")
def mobilenet_v2_cifar(num_classes: int, width_mult: float = 1.0, dropout: float = 0.0) -> nn.Module:
    """MobileNet-V2 for 32x32 inputs: stem conv stride 1 and the 24-/32-channel stages at stride 1.

    Same blocks and channel widths as the ImageNet model (torchvision implementation); only strides
    change (see ``MBV2_CIFAR_STAGES``). No dropout by default (the usual CIFAR setting).
    """
    check_positive("mobilenet_v2_cifar", "width_mult", width_mult)
    check_dropout("mobilenet_v2_cifar", dropout)
    model = tvm.MobileNetV2(
        num_classes=num_classes,
        width_mult=float(width_mult),
        inverted_residual_setting=[list(s) for s in MBV2_CIFAR_STAGES],
        dropout=dropout,
    )
    stem = model.features[0][0]
    assert isinstance(stem, nn.Conv2d)
    stem.stride = (1, 1)
    return model


@MODELS.register("mobilenet_v3_large")
def mobilenet_v3_large(num_classes: int, width_mult: float = 1.0, dropout: float = 0.2) -> nn.Module:
    """torchvision MobileNet-V3-Large (Howard et al. 2019; 5.5M parameters at 1000 classes).

    Its squeeze-excitation layers are 1x1 ``nn.Conv2d``; the classifier has two Linear layers, the
    last one is the classifier in the zoo's sense.
    """
    check_positive("mobilenet_v3_large", "width_mult", width_mult)
    check_dropout("mobilenet_v3_large", dropout)
    return tvm.mobilenet_v3_large(weights=None, num_classes=num_classes, width_mult=float(width_mult), dropout=dropout)
