"""Fake-quantizers used by post-training quantization (they plug into QConv2d/QLinear as ``wq`` / ``aq``).

Grids (``grid``), for step s and b bits, α = clipping value:
- ``midrise`` (signed): levels (k + ½)s, k = −2^(b−1) … 2^(b−1)−1, s = 2α/2^b: 2^b levels symmetric about 0
  with bins exactly covering [−α, α] (the quantizer of supplement Eq. 1, q_i = −α + (2i+1)Δ/2).
- ``int`` (signed): levels k·s, k = −2^(b−1) … 2^(b−1)−1, s = 2α/2^b (two's complement, has an exact 0).
- unsigned: levels k·s, k = 0 … 2^b−1, s = α/(2^b − 1) (largest level = α, exact 0 for ReLU outputs).
- asymmetric (Range/Affine): levels (k − z)·s, k = 0 … 2^b−1, integer zero point z, s = (hi − lo)/(2^b − 1)
  for clipping bounds lo ≤ 0 ≤ hi.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from qrepro.errors import QreproError
from qrepro.quant.lsq import grad_scale
from qrepro.quant.ste import round_ste

GRIDS = ("midrise", "int")


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 16:
        raise QreproError(f"PTQ bit-width must be in 1..16 (or 32 = full precision), got {bits}")


def _param_shape(channels: int | None, ndim: int) -> tuple[int, ...]:
    return () if channels is None else (channels,) + (1,) * (ndim - 1)


class UniformQuantizer(nn.Module):
    """x -> (clamp(round(x/s − o), q_min, q_max) + o) · s with |s| as the step: one step per tensor, or one per
    output channel (``channels`` = C_out, ``ndim`` = the weight's rank) for weights. STE on the rounding only, so
    d/ds is the LSQ gradient; QDrop's random drop of activation quantization built in (``drop_prob``)."""

    def __init__(
        self,
        bits: int,
        signed: bool = True,
        grid: str = "int",
        learn_step: bool = False,
        channels: int | None = None,
        ndim: int = 4,
    ) -> None:
        super().__init__()
        _check_bits(bits)
        if grid not in GRIDS:
            raise QreproError(f"unknown PTQ grid {grid!r}; choose one of: {', '.join(GRIDS)}")
        if bits == 1 and signed and grid == "int":
            raise QreproError("1-bit signed quantization needs grid=midrise (levels ±s/2)")
        self.bits, self.grid = bits, grid
        self.step = nn.Parameter(torch.ones(_param_shape(channels, ndim)), requires_grad=learn_step)
        self.enabled = True
        # signedness and "calibrated" live in bool buffers (saved, copied by EMA) mirrored in Python attributes
        # used by forward (no host sync); _load_from_state_dict refreshes the mirrors
        self.register_buffer("signed_flag", torch.tensor(bool(signed)))
        self.register_buffer("initialized_flag", torch.tensor(False))
        self.drop_prob = 0.0  # QDrop: probability of keeping an element full precision (training only)
        # LSQ step-gradient scale g = 1/sqrt(N·q_max): "weight" N = numel, "act" N = numel per sample
        self.lsq_grad_scale: str | None = None
        self.set_signed(signed)

    @property
    def initialized(self) -> bool:
        """True once a clipping value was set (QAT calibrates once, not again on resume)."""
        return bool(self.initialized_flag)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.set_signed(bool(self.signed_flag))

    def set_signed(self, signed: bool) -> None:
        self.signed = signed
        self.signed_flag.fill_(bool(signed))
        b = self.bits
        if signed:
            self.qmin, self.qmax = -(2 ** (b - 1)), 2 ** (b - 1) - 1
            self.offset = 0.5 if self.grid == "midrise" else 0.0
        else:
            self.qmin, self.qmax, self.offset = 0, 2**b - 1, 0.0

    def alpha_to_step(self, alpha: torch.Tensor | float) -> torch.Tensor:
        """Step size for clipping value α (see the module docstring)."""
        alpha = torch.as_tensor(alpha, dtype=torch.float32)
        return alpha / (2 ** (self.bits - 1)) if self.signed else alpha / (2**self.bits - 1)

    @torch.no_grad()
    def set_alpha(self, alpha: torch.Tensor | float) -> None:
        s = self.alpha_to_step(alpha).to(self.step.device).clamp_min(1e-12)
        self.step.copy_(s.reshape(self.step.shape) if s.numel() == self.step.numel() else s.expand_as(self.step))
        self.initialized_flag.fill_(True)

    @property
    def alpha(self) -> torch.Tensor:
        s = self.step.detach().abs()
        return s * (2 ** (self.bits - 1)) if self.signed else s * (2**self.bits - 1)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        s = self.step.abs() + 1e-12
        if self.lsq_grad_scale is not None:
            n = x.numel() // self.step.numel() if self.lsq_grad_scale == "weight" else x[0].numel()
            s = grad_scale(s, 1.0 / math.sqrt(n * max(1, self.qmax)))
        v = round_ste(x / s - self.offset).clamp(self.qmin, self.qmax)
        return (v + self.offset) * s

    def quantize_with_alpha(self, x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        """Quantize with the step of clipping value ``alpha`` (calibration searches; no gradient)."""
        s = self.alpha_to_step(alpha).to(x.device).clamp_min(1e-12)
        return (torch.round(x / s - self.offset).clamp(self.qmin, self.qmax) + self.offset) * s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        q = self.quantize(x)
        if self.drop_prob > 0.0 and self.training:
            q = torch.where(torch.rand_like(x) < self.drop_prob, x, q)
        return q

    @torch.no_grad()
    def rescale_step(self, factor: float) -> None:
        """Δ ← factor·Δ (Fig. 5A)."""
        self.step.mul_(factor)

    def extra_repr(self) -> str:
        per = "channel" if self.step.dim() else "tensor"
        return f"bits={self.bits}, signed={self.signed}, grid={self.grid}, per={per}"


def affine_qparams(
    lo: torch.Tensor, hi: torch.Tensor, bits: int, eps: float = 1e-8
) -> tuple[torch.Tensor, torch.Tensor]:
    """(step, integer zero point) of the asymmetric grid for clipping bounds (lo, hi): lo ← min(lo, 0),
    hi ← max(hi, 0), s = max((hi − lo)/(2^b − 1), eps), z = clamp(−round(lo/s), 0, 2^b − 1) (QDrop's
    ``ObserverBase.calculate_qparams``)."""
    qmax = 2**bits - 1
    lo, hi = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)
    s = torch.clamp((hi - lo) / qmax, min=eps)
    z = torch.clamp(-torch.round(lo / s), 0, qmax)
    return s, z


def fake_quant_affine(x: torch.Tensor, step: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """(clamp(round(x/s) + z, 0, 2^b − 1) − z)·s without gradients (calibration searches)."""
    return (torch.clamp(torch.round(x / step) + zero, 0, 2**bits - 1) - zero) * step


class RangeQuantizer(nn.Module):
    """Asymmetric quantizer with learnable clipping range r and lower bound z (AdaQuant reference
    implementation, CalibTIP ``QuantThUpdate`` / ``quantize_with_grad``), per tensor or per output channel:

        s  = clamp(r, 1e-6, 1e5) / (2^b − 1)
        k0 = clamp(round(−z/s), 0, 2^b − 1)                     (the zero point, rounded to the grid, STE)
        Q(x) = round(clamp((x + k0·s)/s, 0, 2^b − 1))·s − k0·s   (STE on the rounding, zero gradient where clamped)

    Gradients reach r and z through s and k0 (straight-through rounding)."""

    def __init__(self, bits: int, channels: int | None = None, ndim: int = 4) -> None:
        super().__init__()
        _check_bits(bits)
        self.bits, self.qmax = bits, 2**bits - 1
        shape = _param_shape(channels, ndim)
        self.range = nn.Parameter(torch.ones(shape), requires_grad=False)
        self.zero_point = nn.Parameter(torch.zeros(shape), requires_grad=False)
        self.enabled = True

    @torch.no_grad()
    def set_bounds(self, lo: torch.Tensor | float, hi: torch.Tensor | float) -> None:
        """r = hi − lo and z = lo after lo ← min(lo, 0), hi ← max(hi, 0); r = 1 where hi = lo (reference)."""
        lo = torch.clamp(torch.as_tensor(lo).to(self.range), max=0.0)
        hi = torch.clamp(torch.as_tensor(hi).to(self.range), min=0.0)
        r = hi - lo
        r = torch.where(r == 0, torch.ones_like(r), r)
        self.range.copy_(r.reshape(self.range.shape))
        self.zero_point.copy_(lo.reshape(self.zero_point.shape))

    @property
    def step(self) -> torch.Tensor:
        return self.range.detach().clamp(1e-6, 1e5) / self.qmax

    def qparams(self) -> list[nn.Parameter]:
        return [self.range, self.zero_point]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        s = self.range.clamp(1e-6, 1e5) / self.qmax
        zq = -round_ste(-self.zero_point / s).clamp(0, self.qmax) * s  # the lower bound on the grid
        v = round_ste(((x - zq) / s).clamp(0, self.qmax))
        return v * s + zq

    @torch.no_grad()
    def rescale_step(self, factor: float) -> None:
        """Δ ← factor·Δ with the integer zero point kept: r and z scale together (Fig. 5A)."""
        self.range.mul_(factor)
        self.zero_point.mul_(factor)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, asymmetric, per={'channel' if self.step.dim() else 'tensor'}"


class AffineQuantizer(nn.Module):
    """Asymmetric quantizer with a learnable step s and a fixed integer zero point z (QDrop reference
    ``LSQFakeQuantize``), per tensor or per output channel:

        Q(x) = (clamp(round(x/s) + z, 0, 2^b − 1) − z)·s   (STE on the rounding)

    ``grad_scale``: LSQ gradient scaling of s by 1/√(N·(2^b − 1)), N = the number of elements of the input
    tensor (per channel: its elements per channel), as the reference's ``use_grad_scaling``. ``drop_prob``:
    QDrop's element-wise drop of the quantization in training mode."""

    def __init__(
        self, bits: int, channels: int | None = None, ndim: int = 4, learn_step: bool = False, grad_scale: bool = False
    ) -> None:
        super().__init__()
        _check_bits(bits)
        self.bits, self.qmin, self.qmax = bits, 0, 2**bits - 1
        shape = _param_shape(channels, ndim)
        self.step = nn.Parameter(torch.ones(shape), requires_grad=learn_step)
        self.register_buffer("zero_point", torch.zeros(shape))
        self.grad_scale = grad_scale
        self.enabled = True
        self.drop_prob = 0.0

    @torch.no_grad()
    def set_bounds(self, lo: torch.Tensor | float, hi: torch.Tensor | float) -> None:
        lo = torch.as_tensor(lo).to(self.step)
        hi = torch.as_tensor(hi).to(self.step)
        s, z = affine_qparams(lo, hi, self.bits)
        self.step.copy_(s.reshape(self.step.shape))
        self.zero_point.copy_(z.reshape(self.zero_point.shape))

    def qparams(self) -> list[nn.Parameter]:
        return [self.step]

    @torch.no_grad()
    def sanitize(self) -> None:
        """s ← max(|s|, float32 eps), what the reference does to its learned scale before every forward."""
        self.step.abs_().clamp_(min=torch.finfo(torch.float32).eps)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        s = self.step
        if self.grad_scale:
            s = grad_scale(s, 1.0 / math.sqrt(x.numel() // self.step.numel() * self.qmax))
        v = (round_ste(x / s) + self.zero_point).clamp(self.qmin, self.qmax)
        return (v - self.zero_point) * s

    forward = UniformQuantizer.forward  # quantize, or x where dropped (QDrop), or x when disabled
    rescale_step = UniformQuantizer.rescale_step  # Δ ← factor·Δ, integer zero point kept (Fig. 5A)
    extra_repr = RangeQuantizer.extra_repr


class TransformedQuantizer(nn.Module):
    """``quant(transform(w))``: a weight quantizer applied after a weight transform (e.g. SatNL in QAT)."""

    def __init__(self, transform: nn.Module, quant: UniformQuantizer) -> None:
        super().__init__()
        self.transform, self.quant = transform, quant

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self.quant(self.transform(w))


def rectified_sigmoid(v: torch.Tensor, zeta: float = 1.1, gamma: float = -0.1) -> torch.Tensor:
    """AdaRound h(V) = clip(σ(V)(ζ − γ) + γ, 0, 1) (Nagel et al., 2020, Eq. 23)."""
    return (torch.sigmoid(v) * (zeta - gamma) + gamma).clamp(0.0, 1.0)


class AdaRoundWeight(nn.Module):
    """W_q = s · (clamp(floor(W/s − o) + h(V) + z, q_min, q_max) − z + o) with the fixed step s, offset o and
    integer zero point z of ``base`` (symmetric grids: z = 0; asymmetric: o = 0).

    V is initialised so that h(V) equals the fractional part (W_q = W inside the range at start);
    ``hard=True`` uses h = 1[V ≥ 0] (the rounding decision after optimisation).
    """

    zeta, gamma = 1.1, -0.1

    def __init__(self, base: UniformQuantizer | AffineQuantizer, weight: torch.Tensor) -> None:
        super().__init__()
        self.bits = base.bits
        self.grid = getattr(base, "grid", "asymmetric")
        self.qmin, self.qmax, self.offset = base.qmin, base.qmax, getattr(base, "offset", 0.0)
        self.register_buffer("step", base.step.detach().abs().clone())
        zero = getattr(base, "zero_point", None)
        self.register_buffer("zero_point", zero.detach().clone() if zero is not None else torch.zeros_like(self.step))
        with torch.no_grad():
            v = weight.detach() / self.step - self.offset
            frac = v - torch.floor(v)  # in [0, 1): h(V) = frac is reachable (σ(V) ∈ (1/12, 11/12))
            # h(V) = frac  <=>  σ(V) = (frac − γ)/(ζ − γ)  <=>  V = −log((ζ − γ)/(frac − γ) − 1)
            init = -torch.log((self.zeta - self.gamma) / (frac - self.gamma) - 1)
        self.v = nn.Parameter(init)
        self.hard = False

    def h(self) -> torch.Tensor:
        return (self.v >= 0).to(self.v.dtype) if self.hard else rectified_sigmoid(self.v, self.zeta, self.gamma)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        base = torch.floor(w.detach() / self.step - self.offset)
        z = self.zero_point
        return ((base + self.h() + z).clamp(self.qmin, self.qmax) - z + self.offset) * self.step

    rescale_step = UniformQuantizer.rescale_step  # Δ ← factor·Δ (Fig. 5A)

    def round_loss(self, beta: float) -> torch.Tensor:
        """AdaRound regulariser Σ 1 − |2h(V) − 1|^β (Eq. 24)."""
        return (1.0 - ((rectified_sigmoid(self.v, self.zeta, self.gamma) - 0.5).abs() * 2).pow(beta)).sum()

    def extra_repr(self) -> str:
        return f"bits={self.bits}, grid={self.grid}, hard={self.hard}"


class LevelQuantizer(nn.Module):
    """Nearest-level projection onto a sorted level set (non-uniform PTQ), STE on the projection."""

    def __init__(self, levels: torch.Tensor) -> None:
        super().__init__()
        levels = torch.sort(levels.detach().reshape(-1)).values
        self.register_buffer("levels", levels)
        self.register_buffer("mids", 0.5 * (levels[1:] + levels[:-1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx = torch.bucketize(x.detach(), self.mids)
        return x + (self.levels[idx] - x).detach()

    def extra_repr(self) -> str:
        return f"levels={self.levels.numel()}"
