"""Small helpers shared by the model definitions."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from torch import nn

from qrepro.errors import QreproError

# MobileNet-V2's inverted residual stages (t, c, n, s) = expansion, output channels, repeats, stride of the first
# block (ImageNet). For 32x32 inputs the first two stride-2 stages (24 and 32 channels) use stride 1 and the stem
# conv too, so the total downsampling is 4 (32x32 -> 8x8 before pooling, the same final map as the CIFAR ResNets)
# instead of 32 (which would leave a 1x1 map).
MBV2_STAGES = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]
MBV2_CIFAR_STAGES = [(t, c, n, 1 if i in (1, 2) else s) for i, (t, c, n, s) in enumerate(MBV2_STAGES)]


def check_choice(model: str, option: str, value: object, choices: tuple[object, ...]) -> None:
    """Raise a one-line QreproError if ``value`` is not one of ``choices``."""
    if value not in choices:
        raise QreproError(
            f"model={model}: {option}={value!r} is not valid; choose one of {', '.join(map(str, choices))} "
            f"(e.g. model.{option}={choices[0]})"
        )


def check_positive(model: str, option: str, value: object) -> None:
    """Raise a one-line QreproError if ``value`` is not a positive number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise QreproError(f"model={model}: {option} must be a positive number, got {value!r}")


def kaiming_fan_out_init(model: nn.Module) -> None:
    """He-normal init with fan-out for convs (He et al. 2015), BN weight 1 / bias 0.

    Linear layers keep PyTorch's default init (as torchvision's ResNets and the APoT authors do).
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def check_dropout(model: str, value: object) -> None:
    """Raise a one-line QreproError if ``value`` is not a probability in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise QreproError(f"model={model}: dropout must be in [0, 1), got {value!r}")


def conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, relu: bool = True) -> list[nn.Module]:
    """[k x k conv (padding k // 2, no bias), BatchNorm2d, ReLU]; ``relu=False`` leaves out the ReLU."""
    mods: list[nn.Module] = [
        nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    return [*mods, nn.ReLU()] if relu else mods


def block_stages(cin: int, spec: Iterable[tuple], block: Callable[..., nn.Module]) -> list[list[nn.Module]]:
    """``block(cin, cout, stride, *extra)`` per stage of ``spec`` = (cout, blocks, stride of the first, *extra)."""
    stages = []
    for cout, n, stride, *extra in spec:
        stages.append([block(cin if j == 0 else cout, cout, stride if j == 0 else 1, *extra) for j in range(n)])
        cin = cout
    return stages
