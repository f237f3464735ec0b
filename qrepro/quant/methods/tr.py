"""``quantizer=tr``: the quantizer of the TR-scheduling paper (Eq. 13; supplement S4–S6, Table S8).

Policy: the first and last layers stay full precision (Table S8 / Sec. S4.1); every other Conv2d/Linear gets
a :class:`TRWeightQuantizer` (per-layer scalar scale ``s``) and a :class:`TRActQuantizer` on its input.

Scales are initialised once, at the start of training, by :class:`TRScaleInit` (after an FP checkpoint has
been loaded): ``s = 3·std(w)``; ``s_a = 3·std(x)/sqrt(1 − 2/π)`` on the layer inputs of the first batch.
A checkpoint of a quantized model carries the ``initialized`` buffers, so resuming never re-initialises.

Weight scales carry the param tag ``w_scale`` and activation scales ``a_scale`` so the optimizer config can
give them their own group (paper: a 10× smaller LR, Sec. S4.1; the authors' CIFAR code: lr 0.01, no momentum,
no weight decay). A T-optimizer (``optimizer=sgdt`` ...) freezes the weight scales (Sec. S5.2); with a plain
optimizer they are learned. ``scale_eps`` divides by ``|s| + scale_eps`` instead of ``s`` (authors: 1e-6).
"""

from __future__ import annotations

import torch
from torch import nn

from qrepro.errors import QreproError
from qrepro.hooks import Context, Hook
from qrepro.quant import tr as F
from qrepro.quant.layers import calibration_forward, quantized_layers
from qrepro.quant.methods import FP_BITS, METHODS, LayerInfo, Method, check_bits
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
    def init_scale(self, w: torch.Tensor) -> None:
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
        self.bits = bits
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(()))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.quantize_activation(x, self.scale.to(x.dtype), self.bits, self.eps)

    @torch.no_grad()
    def init_scale(self, x: torch.Tensor) -> None:
        self.scale.copy_(F.init_activation_scale(x))
        self.initialized.fill_(True)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, eps={self.eps}"


class TRScaleInit(Hook):
    """Initialise the TR quantizer scales at the start of training (weights, then activations on
    ``ctx.sample_batch``). Quantizers whose ``initialized`` buffer is set (resume) are left alone."""

    def on_train_start(self, ctx: Context) -> None:
        calibrate_scales(ctx.model, None if ctx.sample_batch is None else ctx.sample_batch[0])


@torch.no_grad()
def calibrate_scales(model: nn.Module, x: torch.Tensor | None) -> int:
    """Initialise uninitialised TR scales; activation scales from one forward of ``x``.

    The forward runs in training mode, as the authors' first iteration; each activation scale is set from
    its own input just before the layer uses it (so later layers see quantized earlier layers). BatchNorm
    running statistics and every other buffer are restored afterwards. Returns the number of scales set.
    """
    layers = list(quantized_layers(model))
    n = 0
    for _, layer in layers:
        if isinstance(layer.wq, TRWeightQuantizer) and not bool(layer.wq.initialized):
            layer.wq.init_scale(layer.weight)
            n += 1
    todo = [layer for _, layer in layers if isinstance(layer.aq, TRActQuantizer) and not bool(layer.aq.initialized)]
    if not todo:
        return n
    if x is None:
        raise RuntimeError("TR activation scales need a sample batch (ctx.sample_batch) to initialise")

    def pre_hook(mod: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        if not bool(mod.aq.initialized):
            mod.aq.init_scale(args[0])

    calibration_forward(model, x, todo, pre_hook, restore=lambda k: not k.endswith("initialized"))
    return n + len(todo)


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
    return Method(
        name="tr",
        quantize_layer=quantize_layer,
        hooks=hooks,
        options={
            "quantize_first_last": quantize_first_last,
            "learn_weight_scale": learn_weight_scale,
            "monitor_tr": monitor_tr,
            "scale_eps": eps,
        },
    )
