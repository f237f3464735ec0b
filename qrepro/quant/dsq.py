"""DSQ maths (Gong et al., "Differentiable Soft Quantization: Bridging Full-Precision and Low-Bit Neural
Networks", ICCV 2019), as small pure functions.

b-bit uniform quantization of the clipping range ``[l, u]`` into ``2^b - 1`` intervals of width
``Delta = (u - l) / (2^b - 1)``. Inside interval ``i`` (centre ``m_i = l + (i + 0.5) Delta``) the soft staircase
(Eq. 3-5) is

    phi(x) = s tanh(k (x - m_i)),   s = 1 / tanh(0.5 k Delta),
    Q_S(x) = l + Delta (i + (phi(x) + 1) / 2),   Q_S = l below l, u above u,

and the characteristic variable ``alpha = 1 - tanh(0.5 k Delta)`` (Eq. 6) sets the sharpness:
``k = ln(2 / alpha - 1) / Delta``, ``s = 1 / (1 - alpha)``. ``alpha -> 0`` is the hard staircase; the hard
quantizer is ``l + Delta (i + (sgn(phi) + 1) / 2)`` (the nearest level, ties up), used after training.

Gradients: exact derivatives of Q_S for ``x``, ``l``, ``u`` and ``alpha`` (the interval index ``i`` is piecewise
constant); outside ``[l, u]`` the clipped value's gradient goes to the bound (``qrepro.quant.ste.clip``).
"""

from __future__ import annotations

import math

import torch

from qrepro.quant.ste import clip, value_ste


def soft_parts(
    x: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, alpha: torch.Tensor, bits: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x clipped, Delta, interval index i (no gradient), phi(x))."""
    n = 2**bits - 1
    delta = (upper - lower) / n
    xc = clip(x, lower, upper)
    i = torch.floor((xc - lower) / delta).clamp(0, n - 1).detach()
    m = lower + (i + 0.5) * delta
    k = torch.log(2.0 / alpha - 1.0) / delta
    phi = torch.tanh(k * (xc - m)) / (1.0 - alpha)
    return xc, delta, i, phi


def soft_quantize(x: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, alpha: torch.Tensor, bits: int):
    """Q_S(x) (Eq. 5)."""
    _, delta, i, phi = soft_parts(x, lower, upper, alpha, bits)
    return lower + delta * (i + (phi + 1.0) / 2.0)


def hard_quantize(x: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, alpha: torch.Tensor, bits: int):
    """The hard staircase ``l + Delta (i + (sgn(phi) + 1) / 2)`` in the forward pass, with Q_S's gradient
    (``hard=True`` of the quantizer: quantized values in training, DSQ's gradients)."""
    _, delta, i, phi = soft_parts(x, lower, upper, alpha, bits)
    soft = lower + delta * (i + (phi + 1.0) / 2.0)
    step = torch.where(phi >= 0, torch.ones_like(phi), torch.zeros_like(phi))
    return value_ste(soft, lower + delta * (i + step))


def k_from_alpha(alpha: float, delta: float) -> float:
    """Eq. 6 solved for k (for tests and docs)."""
    return math.log(2.0 / alpha - 1.0) / delta
