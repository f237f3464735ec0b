"""DeiT-Tiny / DeiT-Small (Touvron et al. 2021) from timm, randomly initialised.

``pretrained=False`` is always passed, so timm never downloads anything; pretrained weights are loaded
by the trainer's ``init_from`` like any other checkpoint. The patch embedding is a 16x16 stride-16
``nn.Conv2d`` (the first conv); attention (qkv, proj), MLP (fc1, fc2) and the head are ``nn.Linear``,
the head being the last one. ``img_size`` sets the position-embedding grid (224 -> 14x14 patches).
"""

from __future__ import annotations

from torch import nn

from qrepro.errors import QreproError
from qrepro.models import MODELS
from qrepro.models._common import check_dropout, check_positive


def _deit(arch: str, name: str, num_classes: int, img_size: int, drop_path_rate: float) -> nn.Module:
    import timm  # imported lazily: it is slow to import and only these models need it

    check_positive(name, "img_size", img_size)
    check_dropout(name, drop_path_rate)
    if img_size % 16:
        raise QreproError(f"model={name}: img_size must be a multiple of the patch size 16, got {img_size}")
    return timm.create_model(
        arch, pretrained=False, num_classes=num_classes, img_size=int(img_size), drop_path_rate=drop_path_rate
    )


@MODELS.register("deit_tiny")
def deit_tiny(num_classes: int, img_size: int = 224, drop_path_rate: float = 0.0) -> nn.Module:
    """timm ``deit_tiny_patch16_224`` (5.7M parameters at 1000 classes)."""
    return _deit("deit_tiny_patch16_224", "deit_tiny", num_classes, img_size, drop_path_rate)


@MODELS.register("deit_small")
def deit_small(num_classes: int, img_size: int = 224, drop_path_rate: float = 0.0) -> nn.Module:
    """timm ``deit_small_patch16_224`` (22.1M parameters at 1000 classes)."""
    return _deit("deit_small_patch16_224", "deit_small", num_classes, img_size, drop_path_rate)
