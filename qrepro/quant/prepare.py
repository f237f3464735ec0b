"""Swap nn.Conv2d / nn.Linear for quantized layers as a method's policy says."""

from __future__ import annotations

from torch import nn

from qrepro.quant.layers import QConv2d, QLinear
from qrepro.quant.methods import LayerInfo, Method


def _layer_infos(model: nn.Module, w_bits: int, a_bits: int) -> list[LayerInfo]:
    named = list(model.named_modules())
    cand = [(i, n, m) for i, (n, m) in enumerate(named) if type(m) in (nn.Conv2d, nn.Linear, QConv2d, QLinear)]
    last_linear = max((k for k, (_, _, m) in enumerate(cand) if isinstance(m, nn.Linear)), default=None)
    infos = []
    for k, (i, n, m) in enumerate(cand):
        role = "first" if k == 0 else ("last" if k == last_linear else "middle")
        nxt = named[i + 1][1] if i + 1 < len(named) else None
        dw = isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels
        infos.append(LayerInfo(n, m, role, k, dw, nxt, w_bits, a_bits))
    return infos


def prepare(model: nn.Module, method: Method) -> nn.Module:
    """Quantize ``model`` in place with ``method`` (parameters are shared, names unchanged)."""
    for info in _layer_infos(model, method.w_bits, method.a_bits):
        if isinstance(info.module, (QConv2d, QLinear)):
            continue  # already prepared
        wq, aq = method.quantize_layer(info) or (None, None)
        if wq is None and aq is None:
            continue
        cls = QConv2d if isinstance(info.module, nn.Conv2d) else QLinear
        parent, _, child = info.name.rpartition(".")
        setattr(model.get_submodule(parent), child, cls.from_float(info.module, wq, aq))  # "" is the model itself
    return model
