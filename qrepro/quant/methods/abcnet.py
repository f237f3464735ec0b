"""ABC-Net (Lin, Zhao & Pan, "Towards Accurate Binary Convolutional Neural Network", NeurIPS 2017): weights as
a linear combination of M binary bases, layer inputs as a combination of N shifted binary activations. See
docs/abcnet.md; maths in ``qrepro.quant.abcnet``.

Bit-widths: ``w_bits`` = M (weight bases), ``a_bits`` = N (activation bases), so the cell ``w5a5`` is
ABC-Net's "5 weight bases, 5 activation bases". First conv and last FC full precision.
"""

from __future__ import annotations

import torch
from torch import nn

from qrepro.errors import QreproError
from qrepro.hooks import Hook
from qrepro.quant import abcnet as ab
from qrepro.quant.layers import quantized_layers
from qrepro.quant.methods import FP_BITS, METHODS, LayerInfo, Method, builder_options, check_bits, check_choice

SUPPORTED_BASES = (1, 2, 3, 4, 5, FP_BITS)


class ABCWeightQuantizer(nn.Module):
    """``sum_i alpha_i B_i``; alpha refitted by least squares every forward (``alpha=fit``, Eq. 3) or a trained
    parameter initialised by that fit (``alpha=learn``)."""

    param_tags = {"alpha": "abc_alpha"}

    def __init__(self, bases: int, *, alpha: str = "fit") -> None:
        super().__init__()
        self.bases, self.mode = bases, alpha
        if alpha == "learn":
            self.alpha = nn.Parameter(torch.full((bases,), 1.0 / bases))
            self.register_buffer("initialized", torch.tensor(0.0))

    @torch.no_grad()
    def init_alpha(self, w: torch.Tensor) -> None:
        self.alpha.copy_(ab.fit_alpha(w, ab.weight_bases(w, self.bases)).to(self.alpha.dtype))
        self.initialized.fill_(1.0)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        b = ab.weight_bases(w, self.bases)
        alpha = self.alpha if self.mode == "learn" else ab.fit_alpha(w, b)
        return ab.combine(b, alpha.to(w.dtype))

    def extra_repr(self) -> str:
        return f"bases={self.bases}, alpha={self.mode}"


class ABCActQuantizer(nn.Module):
    """``sum_n beta_n H_{v_n}(x)`` with trained shifts v and scales beta."""

    param_tags = {"shift": "abc_shift", "beta": "abc_beta"}

    def __init__(self, bases: int, *, act_init: float = 2.0) -> None:
        super().__init__()
        self.bases = bases
        # thresholds 0.5 - v_n spread evenly over [0, act_init]; scales so that sum beta_n H spans +-act_init/2
        t = torch.tensor([act_init * (n + 0.5) / bases for n in range(bases)])
        self.shift = nn.Parameter(0.5 - t)
        self.beta = nn.Parameter(torch.full((bases,), act_init / (2 * bases)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ab.quantize_act(x, self.shift.to(x.dtype), self.beta.to(x.dtype))

    def extra_repr(self) -> str:
        return f"bases={self.bases}"


class ABCAlphaInit(Hook):
    """``alpha=learn``: alpha from the least-squares fit on the weights training starts from (once)."""

    def on_train_start(self, ctx) -> None:
        for _, layer in quantized_layers(ctx.model):
            q = layer.wq
            if isinstance(q, ABCWeightQuantizer) and q.mode == "learn" and float(q.initialized) == 0.0:
                q.init_alpha(layer.weight)


@METHODS.register("abcnet")
def build_abcnet(
    w_bits: int, a_bits: int, *, first_last: str = "fp", alpha: str = "fit", act_init: float = 2.0
) -> Method:
    """ABC-Net with M = w_bits weight bases and N = a_bits activation bases. alpha: fit (least squares each
    step, Eq. 3) | learn. act_init: the activation thresholds start evenly spread over [0, act_init]."""
    options = builder_options(locals())
    check_bits("abcnet", w_bits, a_bits, SUPPORTED_BASES)
    check_choice("first_last", first_last, ("fp", "same"), "abcnet")
    check_choice("alpha", alpha, ("fit", "learn"), "abcnet")
    if not act_init > 0:
        raise QreproError(f"quantizer.act_init={act_init} must be > 0")

    def quantize_layer(info: LayerInfo) -> tuple[nn.Module | None, nn.Module | None] | None:
        if info.role in ("first", "last") and first_last == "fp":
            return None
        wq = ABCWeightQuantizer(w_bits, alpha=alpha) if w_bits != FP_BITS else None
        aq = ABCActQuantizer(a_bits, act_init=act_init) if a_bits != FP_BITS else None
        return wq, aq

    hooks = [ABCAlphaInit()] if alpha == "learn" else []
    return Method(name="abcnet", quantize_layer=quantize_layer, hooks=hooks, options=options)
