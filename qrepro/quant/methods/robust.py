"""Robust full-precision training (SymReg/SatNL paper, KURE baseline): SatNL weight reparameterisation plus
the SymReg and KURE regularizers (qrepro/quant/robust.py).

Registered names (configs/quantizer/*.yaml):
- ``satnl``  : W' = d·f(W/d) on every conv/linear weight, optional ``symreg_coef`` / ``kure_coef``
  ("Ours" = satnl + symreg, "Ours+KURE" = satnl + symreg + kure).
- ``symreg`` : plain FP layers + SymReg loss (SatNL off).
- ``kure``   : plain FP layers + KURE loss (the KURE baseline of Table 2A).
These are full-precision training methods (precision=w32a32); quantization happens afterwards with
``python -m qrepro.ptq``, which folds W' into the weights before quantizing.
- ``robust_qat``: QAT fine-tuning (supplement §3: 90 epochs at 1/10 of the LR) with the same terms and
  uniform LSQ-style quantizers after SatNL.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from qrepro.errors import QreproError
from qrepro.hooks import Hook
from qrepro.quant.calibrate import Calibration, init_quantizers, layer_bits, weight_quantizer_for
from qrepro.quant.methods import FP_BITS, METHODS, LayerInfo, Method, builder_options, check_bits, check_choice
from qrepro.quant.quantizers import TransformedQuantizer, UniformQuantizer
from qrepro.quant.robust import SATNL_FUNCTIONS, kure_loss, satnl, symreg_loss


class SatNLWeight(nn.Module):
    """Weight transform W' = d·f(W/d) (no rounding): the ``wq`` of a SatNL layer.

    ``d_mode="absolute"``: d is the bound in weight units. ``d_mode="std"``: d = d·std(W) per tensor, with the
    std detached (treated as a constant, like a fixed per-layer bound), for scale-free use.
    """

    def __init__(self, d: float = 1.0, fn: str = "tanh", d_mode: str = "absolute") -> None:
        super().__init__()
        if fn not in SATNL_FUNCTIONS:
            raise QreproError(f"unknown SatNL fn {fn!r}; choose one of: {', '.join(SATNL_FUNCTIONS)}")
        if d_mode not in ("absolute", "std"):
            raise QreproError(f"unknown SatNL d_mode {d_mode!r}; choose absolute or std")
        if not d > 0:
            raise QreproError(f"SatNL bound d must be > 0, got {d}")
        self.d, self.fn, self.d_mode = float(d), fn, d_mode

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        d = self.d * w.detach().std() if self.d_mode == "std" else self.d
        return satnl(w, d, self.fn)

    def extra_repr(self) -> str:
        return f"fn={self.fn}, d={self.d}, d_mode={self.d_mode}"


def effective_weight(layer: nn.Module) -> torch.Tensor:
    """The weight the layer really uses (after SatNL or any other ``wq``), else the raw weight."""
    fn = getattr(layer, "effective_weight", None)
    return fn() if callable(fn) else layer.weight


def robust_regularizer(
    model: nn.Module,
    *,
    symreg_coef: float = 0.0,
    kure_coef: float = 0.0,
    kure_target: float = 1.8,
) -> torch.Tensor | None:
    """symreg_coef · Σ_l SymReg(W'_l)  +  λ_K · mean_{l ∈ KURE layers} (Kurt[W'_l] − K_T)².

    SymReg covers every conv/linear layer (summed); KURE covers every conv except the first
    (averaged over layers, KURE Eq. 5), added once with coefficient λ_K = ``kure_coef`` (as the KURE paper and
    its reference code do). Both act on the effective weight W' (what PTQ will quantize).
    """
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    total: torch.Tensor | None = None
    if symreg_coef:
        total = symreg_coef * sum(symreg_loss(effective_weight(m)) for m in layers)
    if kure_coef:
        convs = [m for m in layers if isinstance(m, nn.Conv2d)][1:]
        if convs:
            kure = torch.stack([kure_loss(effective_weight(m), kure_target) for m in convs]).mean()
            total = kure_coef * kure if total is None else total + kure_coef * kure
    return total


def _build(
    name: str,
    w_bits: int,
    a_bits: int,
    *,
    satnl: bool = False,
    fn: str = "tanh",
    d: float = 1.0,
    d_mode: str = "absolute",
    symreg_coef: float = 0.0,
    kure_coef: float = 0.0,
    kure_target: float = 1.8,
) -> Method:
    check_bits(name, w_bits, a_bits, (FP_BITS,))
    for what, v in (("symreg_coef", symreg_coef), ("kure_coef", kure_coef)):
        if v < 0:
            raise QreproError(f"quantizer.{what} must be >= 0, got {v}")
    if satnl:
        SatNLWeight(d, fn, d_mode)  # validate options early

    def quantize_layer(info: LayerInfo) -> tuple[nn.Module | None, nn.Module | None] | None:
        return (SatNLWeight(d, fn, d_mode), None) if satnl else None

    reg_opts = dict(symreg_coef=symreg_coef, kure_coef=kure_coef, kure_target=kure_target)
    reg = functools.partial(robust_regularizer, **reg_opts) if symreg_coef or kure_coef else None
    opts = dict(satnl=satnl, fn=fn, d=d, d_mode=d_mode, **reg_opts)
    return Method(name=name, quantize_layer=quantize_layer, regularizer=reg, options=opts)


@METHODS.register("satnl")
def build_satnl(
    w_bits: int = FP_BITS,
    a_bits: int = FP_BITS,
    *,
    satnl: bool = True,
    fn: str = "tanh",
    d: float = 1.0,
    d_mode: str = "absolute",
    symreg_coef: float = 0.0,
    kure_coef: float = 0.0,
    kure_target: float = 1.8,
) -> Method:
    """SatNL (+ optional SymReg / KURE) full-precision training."""
    return _build("satnl", w_bits, a_bits, **builder_options(locals()))


@METHODS.register("symreg")
def build_symreg(
    w_bits: int = FP_BITS,
    a_bits: int = FP_BITS,
    *,
    symreg_coef: float = 1.0,
    kure_coef: float = 0.0,
    kure_target: float = 1.8,
) -> Method:
    """SymReg alone on plain FP layers (SatNL off)."""
    return _build("symreg", w_bits, a_bits, **builder_options(locals()))


@METHODS.register("kure")
def build_kure(
    w_bits: int = FP_BITS,
    a_bits: int = FP_BITS,
    *,
    kure_coef: float = 1.0,
    kure_target: float = 1.8,
) -> Method:
    """KURE baseline (Shkolnik et al. 2020): plain FP layers + kurtosis regularization to K_T = 1.8."""
    return _build("kure", w_bits, a_bits, **builder_options(locals()))


class _CalibrateQuantizers(Hook):
    """QAT start: set every uniform quantizer's step from the first training batch (once; kept on resume)."""

    def __init__(self, init: str, distribution: str) -> None:
        self.init, self.distribution = init, distribution

    def on_train_start(self, ctx) -> None:
        model = getattr(ctx.model, "_orig_mod", ctx.model)
        qs = [m for m in model.modules() if isinstance(m, UniformQuantizer)]
        if not qs or all(q.initialized for q in qs) or ctx.sample_batch is None:
            return
        x = ctx.sample_batch[0]
        was_training = model.training
        model.eval()
        cfg = Calibration(distribution=self.distribution, batch_size=len(x))
        init_quantizers(model, x, cfg, self.init)
        model.train(was_training)


@METHODS.register("robust_qat")
def build_robust_qat(
    w_bits: int,
    a_bits: int,
    *,
    satnl: bool = True,
    fn: str = "tanh",
    d: float = 1.0,
    d_mode: str = "absolute",
    symreg_coef: float = 0.0,
    kure_coef: float = 0.0,
    kure_target: float = 1.8,
    first_last_bits: int | None = 8,
    quantize_first_input: bool = False,
    weight_grid: str = "midrise",
    weight_granularity: str = "tensor",
    act_grid: str = "int",
    init: str = "mse",
    distribution: str = "laplace",
) -> Method:
    """QAT fine-tuning of a robust FP model: W_q = Q(d·f(W/d)) and inputs Q(x), both uniform per-tensor with
    LSQ-learned steps initialised from the first batch (``init``: minmax | mse | aciq), plus the same
    SymReg / KURE terms. (The main paper's QAT algorithm is not in the available sources; this is ours.)"""
    check_bits("robust_qat", w_bits, a_bits, (2, 3, 4, 5, 6, 7, 8, FP_BITS))
    check_choice("init", init, ("minmax", "mse", "aciq"), "robust_qat")
    check_choice("weight_granularity", weight_granularity, ("tensor", "channel"), "robust_qat")
    reg = dict(symreg_coef=symreg_coef, kure_coef=kure_coef, kure_target=kure_target)
    base = _build("robust_qat", FP_BITS, FP_BITS, satnl=satnl, fn=fn, d=d, d_mode=d_mode, **reg)

    def quantize_layer(info: LayerInfo) -> tuple[nn.Module | None, nn.Module | None] | None:
        wb = layer_bits(w_bits, info.role, first_last_bits)
        ab = layer_bits(a_bits, info.role, first_last_bits)
        wq: nn.Module | None = SatNLWeight(d, fn, d_mode) if satnl else None
        if wb != FP_BITS:
            uq = weight_quantizer_for(info.module, wb, weight_grid, weight_granularity, learn_step=True)
            uq.lsq_grad_scale = "weight"
            wq = TransformedQuantizer(wq, uq) if wq is not None else uq
        aq = None
        if ab != FP_BITS and (info.role != "first" or quantize_first_input):
            aq = UniformQuantizer(ab, signed=False, grid=act_grid, learn_step=True)
            aq.lsq_grad_scale = "act"
        return (wq, aq) if (wq is not None or aq is not None) else None

    base.quantize_layer = quantize_layer
    base.hooks = [_CalibrateQuantizers(init, distribution)]
    base.options.update(
        first_last_bits=first_last_bits, weight_grid=weight_grid, init=init, weight_granularity=weight_granularity
    )
    return base
