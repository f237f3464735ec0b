"""``quantizer=lsq`` (Esser et al., "Learned Step Size Quantization", ICLR 2020) and ``quantizer=lsqplus``
(Bhalgat et al., "LSQ+", CVPR Workshops 2020). Maths: ``qrepro.quant.lsq``; equations, policy and options:
docs/lsq.md.

Policy (both): signed per-tensor weight quantizers (tag ``w_scale``), unsigned ones on every layer input but the
first conv's (tag ``a_scale``; LSQ+ adds a learned offset, tag ``a_offset``), the first conv and the last FC at
``first_last_bits``. Steps are initialised once, at the start of training (:class:`StepInit`); the ``initialized``
buffers travel in checkpoints, so a resumed run never re-initialises.
"""

from __future__ import annotations

import torch
from torch import nn

from qrepro.errors import QreproError
from qrepro.hooks import Context, Hook
from qrepro.quant import lsq as F
from qrepro.quant.methods import FP_BITS, METHODS, LayerInfo, Method, check_bits, check_choice, init_from_batch

SUPPORTED_BITS = (2, 3, 4, 5, 6, 7, 8, FP_BITS)
WEIGHT_INITS = ("lsq", "lsqplus")
ACT_INITS = ("lsq", "minmax", "mse")


class LSQWeightQuantizer(nn.Module):
    """Signed per-tensor LSQ weight quantizer: w^ = round(clip(w/s, -Q_N, Q_P))·s."""

    param_tags = {"step": "w_scale"}

    def __init__(self, bits: int, init: str = "lsq") -> None:
        super().__init__()
        if init not in WEIGHT_INITS:
            raise QreproError(f"unknown LSQ weight init {init!r}; choose one of: {', '.join(WEIGHT_INITS)}")
        self.bits, self.init = bits, init
        self.qn, self.qp = F.bounds(bits, signed=True)
        self.step = nn.Parameter(torch.ones(()))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        g = F.step_grad_scale(w.numel(), self.qp)
        return F.lsq_quantize(w, self.step.to(w.dtype), self.qn, self.qp, g)

    @torch.no_grad()
    def init_from(self, w: torch.Tensor) -> None:
        s = F.lsq_init_step(w, self.qp) if self.init == "lsq" else F.lsqplus_weight_init(w, self.bits)
        self.step.copy_(s.clamp_min(torch.finfo(s.dtype).tiny))
        self.initialized.fill_(True)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, init={self.init}"


class LSQActQuantizer(nn.Module):
    """Unsigned per-tensor activation quantizer with a learned step s and, with ``offset=True`` (LSQ+), a learned
    offset beta: x^ = round(clip((x - beta)/s, 0, 2^b - 1))·s + beta (beta = 0 and fixed without offset)."""

    param_tags = {"step": "a_scale", "beta": "a_offset"}

    def __init__(self, bits: int, offset: bool = False, init: str = "lsq") -> None:
        super().__init__()
        if init not in ACT_INITS:
            raise QreproError(f"unknown LSQ activation init {init!r}; choose one of: {', '.join(ACT_INITS)}")
        self.bits, self.offset, self.init = bits, offset, init
        self.qn, self.qp = F.bounds(bits, signed=False)
        self.step = nn.Parameter(torch.ones(()))
        self.beta = nn.Parameter(torch.zeros(())) if offset else None
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.float16, torch.bfloat16):  # fake-quant arithmetic in float32 (exact rounding)
            return self._quantize(x.float()).to(x.dtype)
        return self._quantize(x)

    def _quantize(self, x: torch.Tensor) -> torch.Tensor:
        g = F.step_grad_scale(x[0].numel(), self.qp)
        s = self.step.to(x.dtype)
        if self.beta is None:
            return F.lsq_quantize(x, s, self.qn, self.qp, g)
        return F.lsqplus_quantize(x, s, self.beta.to(x.dtype), self.qn, self.qp, g)

    @torch.no_grad()
    def init_from(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        if self.init == "lsq":
            s, beta = F.lsq_init_step(x, self.qp), torch.zeros(())
        else:
            init = F.lsqplus_act_init_minmax if self.init == "minmax" else F.lsqplus_act_init_mse
            s, beta = init(x, self.qn, self.qp)
        self.step.copy_(s.clamp_min(torch.finfo(s.dtype).tiny))
        if self.beta is not None:
            self.beta.copy_(beta)
        self.initialized.fill_(True)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, offset={self.offset}, init={self.init}"


def init_steps(model: nn.Module, x: torch.Tensor | None) -> int:
    """Initialise every uninitialised LSQ quantizer: weights from the layer's weight, activations from the layer's
    input in one training-mode forward of ``x``, as LSQ's first batch does (``init_from_batch``)."""
    missing = "LSQ activation steps are initialised from the first training batch; none was given"
    return init_from_batch(model, x, (LSQWeightQuantizer, LSQActQuantizer), missing)


class StepInit(Hook):
    """Initialise the LSQ/LSQ+ steps (and offsets) at the start of training, once."""

    def on_train_start(self, ctx: Context) -> None:
        init_steps(ctx.model, None if ctx.sample_batch is None else ctx.sample_batch[0])


def _build(
    name: str, w_bits: int, a_bits: int, first_last_bits: int | None, offset: bool, w_init: str, a_init: str
) -> Method:
    check_bits(name, w_bits, a_bits, SUPPORTED_BITS)
    if first_last_bits is not None and first_last_bits not in SUPPORTED_BITS:
        raise QreproError(f"quantizer.first_last_bits={first_last_bits!r}; use 2..8, 32 or null (network bits)")
    check_choice("w_init", w_init, WEIGHT_INITS, name)
    check_choice("a_init", a_init, ACT_INITS, name)

    def quantize_layer(info: LayerInfo) -> tuple[nn.Module | None, nn.Module | None] | None:
        edge = info.role in ("first", "last") and first_last_bits is not None
        wb = first_last_bits if edge and info.w_bits != FP_BITS else info.w_bits
        ab = first_last_bits if edge and info.a_bits != FP_BITS else info.a_bits
        wq = LSQWeightQuantizer(wb, w_init) if wb != FP_BITS else None
        aq = LSQActQuantizer(ab, offset, a_init) if ab != FP_BITS and info.role != "first" else None
        return wq, aq

    options = dict(first_last_bits=first_last_bits, w_init=w_init, a_init=a_init)
    return Method(name=name, quantize_layer=quantize_layer, hooks=[StepInit()], options=options)


@METHODS.register("lsq")
def build_lsq(
    w_bits: int, a_bits: int, *, first_last_bits: int | None = 8, w_init: str = "lsq", a_init: str = "lsq"
) -> Method:
    """LSQ: learned step sizes, signed weights, unsigned activations, 8-bit first/last layers."""
    return _build("lsq", w_bits, a_bits, first_last_bits, False, w_init, a_init)


@METHODS.register("lsqplus")
def build_lsqplus(
    w_bits: int, a_bits: int, *, first_last_bits: int | None = 8, w_init: str = "lsqplus", a_init: str = "mse"
) -> Method:
    """LSQ+: LSQ with a learned activation offset and the LSQ+ initialisations."""
    return _build("lsqplus", w_bits, a_bits, first_last_bits, True, w_init, a_init)
