"""Quantization: functional maths (one module per paper), quantized layers and methods.

The public functional API is re-exported here lazily, e.g. ``qrepro.quant.dorefa_weight``.
"""

from __future__ import annotations

import importlib
from typing import Any

from qrepro.quant.layers import QConv2d, QLinear, quantized_layers
from qrepro.quant.methods import LayerInfo, Method, build_method
from qrepro.quant.prepare import prepare

# public name -> module that defines it (modules are imported on first access)
_LAZY = {
    # SAT (Towards Efficient Training for Neural Network Quantization)
    "dorefa_weight": "qrepro.quant.sat",
    "sat_rescale": "qrepro.quant.sat",
    "pact": "qrepro.quant.sat",
    # APoT (Additive Powers-of-Two Quantization)
    "apot_levels": "qrepro.quant.apot",
    "project": "qrepro.quant.apot",
    "lloyd_max_levels": "qrepro.quant.apot",
    # SymReg / SatNL / KURE
    "symreg_loss": "qrepro.quant.robust",
    "kure_loss": "qrepro.quant.robust",
    "satnl": "qrepro.quant.robust",
}

__all__ = ["QConv2d", "QLinear", "LayerInfo", "Method", "build_method", "prepare", "quantized_layers", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'qrepro.quant' has no attribute {name!r}")
