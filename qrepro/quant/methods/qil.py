"""QIL (Jung et al., "Learning to Quantize Deep Networks by Optimizing Quantization Intervals with Task Loss",
CVPR 2019): learned quantization intervals (centre c, half-width d) and, for weights, the transformer exponent
gamma. Maths: ``qrepro.quant.qil``; policy and initialisation: docs/qil.md.

Every conv/linear but the first conv and the last FC (``first_last: fp``, paper Sec. 4) gets a weight and an
input quantizer; weight intervals start at ``c = d = max|w| / 2`` (set once by :class:`QILInit`), activation
intervals at ``c = d = act_init / 2``.
"""

from __future__ import annotations

import torch
from torch import nn

from qrepro.errors import QreproError
from qrepro.hooks import Hook
from qrepro.quant import qil
from qrepro.quant.layers import quantized_layers
from qrepro.quant.methods import (
    FP_BITS,
    METHODS,
    BitsQuantizer,
    LayerInfo,
    Method,
    builder_options,
    check_bits,
    check_choice,
)

SUPPORTED_BITS = (2, 3, 4, 5, 6, 7, 8, FP_BITS)


class QILWeightQuantizer(BitsQuantizer):
    param_tags = {"c": "interval", "d": "interval", "gamma": "gamma"}

    def __init__(self, bits: int, *, learn_gamma: bool = True) -> None:
        super().__init__(bits)
        self.c = nn.Parameter(torch.tensor(0.5))
        self.d = nn.Parameter(torch.tensor(0.5))
        self.gamma = nn.Parameter(torch.tensor(1.0), requires_grad=learn_gamma)
        self.register_buffer("initialized", torch.tensor(0.0))  # 1 once c, d were set from the weights

    @torch.no_grad()
    def init_from_weight(self, w: torch.Tensor) -> None:
        half = 0.5 * float(w.detach().abs().max())
        self.c.fill_(half)
        self.d.fill_(max(half, qil.D_MIN))
        self.initialized.fill_(1.0)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return qil.quantize_weight(w, self.c, self.d, self.gamma, self.bits)


class QILActQuantizer(BitsQuantizer):
    param_tags = {"c": "interval", "d": "interval"}

    def __init__(self, bits: int, *, act_init: float = 4.0) -> None:
        super().__init__(bits)
        self.c = nn.Parameter(torch.tensor(0.5 * act_init))
        self.d = nn.Parameter(torch.tensor(0.5 * act_init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return qil.quantize_act(x, self.c, self.d, self.bits)


class QILInit(Hook):
    """At the start of training: weight intervals from the weights (once per quantizer)."""

    def on_train_start(self, ctx) -> None:
        for _, layer in quantized_layers(ctx.model):
            if isinstance(layer.wq, QILWeightQuantizer) and float(layer.wq.initialized) == 0.0:
                layer.wq.init_from_weight(layer.weight)


@METHODS.register("qil")
def build_qil(
    w_bits: int, a_bits: int, *, first_last: str = "fp", act_init: float = 4.0, learn_gamma: bool = True
) -> Method:
    """QIL. first_last: fp (paper) | same. act_init: initial activation interval [0, act_init].
    learn_gamma: train the weight transformer's exponent (paper) or keep gamma = 1."""
    options = builder_options(locals())
    check_bits("qil", w_bits, a_bits, SUPPORTED_BITS)
    check_choice("first_last", first_last, ("fp", "same"), "qil")
    if not act_init > 0:
        raise QreproError(f"quantizer.act_init={act_init} must be > 0 (the initial activation interval [0, act_init])")

    def quantize_layer(info: LayerInfo) -> tuple[nn.Module | None, nn.Module | None] | None:
        if info.role in ("first", "last") and first_last == "fp":
            return None
        wq = QILWeightQuantizer(w_bits, learn_gamma=learn_gamma) if w_bits != FP_BITS else None
        aq = QILActQuantizer(a_bits, act_init=act_init) if a_bits != FP_BITS else None
        return wq, aq

    return Method(name="qil", quantize_layer=quantize_layer, hooks=[QILInit()], options=options)
