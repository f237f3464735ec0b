"""ACIQ: analytic clipping for integer quantization (Banner et al., 2018), as used in the SymReg/SatNL
supplement §9.1.

Expected MSE of b-bit uniform quantization of X with clipping range [−α, α] (supplement Eq. 1–4):
    E(α) = 2 ∫_α^∞ f(x)(x − α)² dx  +  α² / (3 · 4^b)        (truncation + rounding, Δ = 2α / 2^b)
Closed forms of the truncation term:
    Laplace(0, β):   2 β² exp(−α/β)
    Normal(0, σ²):   2 σ² [(1 + a²) Q(a) − a φ(a)],  a = α/σ,  Q = 1 − Φ
Both E are convex in α, so the optimum is the unique root of dE/dα, found by bisection in float64:
    Laplace: −2β exp(−α/β) + 2α/(3·4^b) = 0;  Normal: 4σ(aQ(a) − φ(a)) + 2α/(3·4^b) = 0.
An unsigned b-bit quantizer of a half-distribution on [0, α] (post-ReLU activations) has Δ = α/2^b and one
tail of density 2f, so its error is the signed error at b + 1 bits: α*_unsigned(b) = α*_signed(b + 1).
"""

from __future__ import annotations

import math
from functools import cache

import torch

from qrepro.errors import QreproError

DISTRIBUTIONS = ("laplace", "gaussian")


def _check(dist: str, bits: int) -> None:
    if dist not in DISTRIBUTIONS:
        raise QreproError(f"unknown ACIQ distribution {dist!r}; choose one of: {', '.join(DISTRIBUTIONS)}")
    if not 1 <= bits <= 16:
        raise QreproError(f"ACIQ bit-width must be in 1..16, got {bits}")


def _phi(a: float) -> float:
    return math.exp(-0.5 * a * a) / math.sqrt(2.0 * math.pi)


def _q(a: float) -> float:
    return 0.5 * math.erfc(a / math.sqrt(2.0))


def clip_mse(alpha: float, bits: int, dist: str = "laplace", scale: float = 1.0) -> float:
    """Expected squared error E(α) of the ACIQ model for a zero-mean Laplace (β = scale) or normal
    (σ = scale) variable quantized to ``bits`` bits on [−α, α] (supplement Eq. 4)."""
    _check(dist, bits)
    rounding = alpha * alpha / (3.0 * 4.0**bits)
    if dist == "laplace":
        return 2.0 * scale * scale * math.exp(-alpha / scale) + rounding
    a = alpha / scale
    return 2.0 * scale * scale * ((1.0 + a * a) * _q(a) - a * _phi(a)) + rounding


def _dmse(a: float, bits: int, dist: str) -> float:
    # derivative of clip_mse in units of the scale (scale = 1)
    r = 2.0 * a / (3.0 * 4.0**bits)
    if dist == "laplace":
        return -2.0 * math.exp(-a) + r
    return 4.0 * (a * _q(a) - _phi(a)) + r


@cache
def optimal_clip_ratio(bits: int, dist: str = "laplace") -> float:
    """α*/scale minimising :func:`clip_mse` (β for Laplace, σ for normal), by bisection to 1e-12."""
    _check(dist, bits)
    lo, hi = 0.0, 1.0
    while _dmse(hi, bits, dist) < 0:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _dmse(mid, bits, dist) < 0 else (lo, mid)
        if hi - lo < 1e-12:
            break
    return 0.5 * (lo + hi)


def fit_scale(x: torch.Tensor, dist: str = "laplace", signed: bool = True) -> torch.Tensor:
    """Scale of a zero-centred Laplace (β = E|x|) or normal (σ = sqrt(E x²)) fitted to ``x``.

    The clipping range is symmetric about zero, so the fit is about zero too. For ``signed=False`` (a
    non-negative tensor) the half-distribution is fitted to the positive values only (β = E[x | x > 0],
    σ² = E[x² | x > 0]); exact zeros (ReLU) are represented exactly by the quantizer and do not count.
    """
    _check(dist, 8)
    x = x.detach().reshape(-1).double()
    if signed:
        return x.abs().mean() if dist == "laplace" else x.square().mean().sqrt()
    n = (x > 0).sum().clamp_min(1)
    return x.clamp_min(0).sum() / n if dist == "laplace" else (x.clamp_min(0).square().sum() / n).sqrt()


def aciq_alpha(
    scale: torch.Tensor | float, bits: int, dist: str = "laplace", signed: bool = True
) -> torch.Tensor | float:
    """ACIQ clipping value α* = ratio(b) · scale (ratio at b + 1 bits for an unsigned half-distribution)."""
    return optimal_clip_ratio(bits if signed else bits + 1, dist) * scale
