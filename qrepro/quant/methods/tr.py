"""``quantizer=tr``: the quantizer of "Scheduling Weight Transitions for Quantization-Aware Training" (Eq. 13;
supplement S4–S6, Table S8). Maths: ``qrepro.quant.tr``; policy, switches and the authors' deviations: docs/tr.md.

Policy: the first and last layers stay full precision; every other Conv2d/Linear gets a :class:`TRWeightQuantizer`
(scale tag ``w_scale``) and a :class:`TRActQuantizer` (tag ``a_scale``) on its input, their scales initialised once
by :class:`TRScaleInit`. A T-optimizer (``optimizer=sgdt`` ...) freezes the weight scales (Sec. S5.2); with a plain
optimizer they are learned.
"""

from __future__ import annotations

import torch
from torch import nn

from qrepro.errors import QreproError
from qrepro.hooks import Context, Hook
from qrepro.quant import tr as F
from qrepro.quant.methods import FP_BITS, METHODS, LayerInfo, Method, check_bits, init_from_batch
from qrepro.quant.transitions import TRMonitor

SUPPORTED_BITS = (1, 2, 3, 4, 5, 6, 7, 8, FP_BITS)


class TRWeightQuantizer(nn.Module):
    """w_q = round(clip(γ·w/s, α, β))/γ (sign for b = 1). Exposes the discrete weights for TR counting."""

    param_tags = {"scale": "w_scale"}

    def __init__(self, bits: int, learnable: bool = True, eps: float | None = None) -> None:
        super().__init__()
        F.weight_constants(bits)  # validates bits
        self.bits = bits
        self.eps = eps  # None: divide by s (paper); a number: by |s| + eps (authors' code, 1e-6)
        self.scale = nn.Parameter(torch.ones(()), requires_grad=learnable)
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return F.quantize_weight(w, self.scale.to(w.dtype), self.bits, self.eps)

    @torch.no_grad()
    def discrete(self, w: torch.Tensor) -> torch.Tensor:
        """Integer discrete weights w_d (Eq. S5) as int8; what the transition rate counts."""
        return F.discrete_weight(w, self.scale.to(w.dtype), self.bits, self.eps).to(torch.int8)

    def from_discrete(self, wd: torch.Tensor) -> torch.Tensor:
        """Quantized weights w_q = w_d/γ (Eq. S6) from discrete ones."""
        return wd.float() / F.weight_constants(self.bits)[2]

    @torch.no_grad()
    def init_from(self, w: torch.Tensor) -> None:
        self.scale.copy_(F.init_weight_scale(w))
        self.initialized.fill_(True)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, learnable={self.scale.requires_grad}, eps={self.eps}"


class TRActQuantizer(nn.Module):
    """x_q = round(clip(x/s_a·2^b, 0, 2^b − 1))/2^b with a learnable scale s_a."""

    param_tags = {"scale": "a_scale"}

    def __init__(self, bits: int, eps: float | None = None) -> None:
        super().__init__()
        if not 1 <= bits <= 8:
            F.quantize_activation(torch.zeros(()), torch.ones(()), bits)  # raises the QreproError
        self.bits, self.eps = bits, eps
        self.scale = nn.Parameter(torch.ones(()))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.quantize_activation(x, self.scale.to(x.dtype), self.bits, self.eps)

    @torch.no_grad()
    def init_from(self, x: torch.Tensor) -> None:
        self.scale.copy_(F.init_activation_scale(x))
        self.initialized.fill_(True)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, eps={self.eps}"


class TRScaleInit(Hook):
    """Initialise the TR quantizer scales at the start of training (weights, then activations on
    ``ctx.sample_batch``). Quantizers whose ``initialized`` buffer is set (resume) are left alone."""

    def on_train_start(self, ctx: Context) -> None:
        calibrate_scales(ctx.model, None if ctx.sample_batch is None else ctx.sample_batch[0])


def calibrate_scales(model: nn.Module, x: torch.Tensor | None) -> int:
    """Initialise uninitialised TR scales; activation scales from one training-mode forward of ``x``, as the
    authors' first iteration (``init_from_batch``). Returns the number of scales set."""
    missing = "TR activation scales need a sample batch (ctx.sample_batch) to initialise"
    return init_from_batch(model, x, (TRWeightQuantizer, TRActQuantizer), missing, RuntimeError)


@METHODS.register("tr")
def build_tr(
    w_bits: int,
    a_bits: int,
    *,
    quantize_first_last: bool = False,
    learn_weight_scale: bool = True,
    monitor_tr: bool = True,
    monitor_every: int = 100,
    monitor_momentum: float = 0.99,
    scale_eps: float | None = None,
) -> Method:
    """TR-scheduling quantizer. ``learn_weight_scale`` applies to plain optimizers; T-optimizers always
    freeze the weight scales. ``monitor_tr`` attaches the transition-rate monitor (for every optimizer).
    ``scale_eps``: None divides by the scales (paper); a number divides by ``|s| + scale_eps`` (the authors'
    code uses 1e-6)."""
    check_bits("tr", w_bits, a_bits, SUPPORTED_BITS)
    if scale_eps is not None and not (isinstance(scale_eps, (int, float)) and scale_eps >= 0):
        raise QreproError(f"quantizer.scale_eps must be null or a number >= 0, got {scale_eps!r}")
    eps = None if scale_eps is None else float(scale_eps)

    def quantize_layer(info: LayerInfo) -> tuple[nn.Module | None, nn.Module | None] | None:
        if info.role in ("first", "last") and not quantize_first_last:
            return None
        wq = TRWeightQuantizer(w_bits, learnable=learn_weight_scale, eps=eps) if w_bits != FP_BITS else None
        aq = TRActQuantizer(a_bits, eps=eps) if a_bits != FP_BITS else None
        return wq, aq

    hooks: list[Hook] = [TRScaleInit()]
    if monitor_tr and w_bits != FP_BITS:
        hooks.append(TRMonitor(every=monitor_every, momentum=monitor_momentum))
    options = dict(
        quantize_first_last=quantize_first_last,
        learn_weight_scale=learn_weight_scale,
        monitor_tr=monitor_tr,
        scale_eps=eps,
    )
    return Method(name="tr", quantize_layer=quantize_layer, hooks=hooks, options=options)
