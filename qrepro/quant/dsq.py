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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Delta, interval index i (no gradient), z = k (x_c - m_i)) for x clipped to [l, u].

    Written for speed with the same maths: ``k Delta = ln(2 / alpha - 1)`` is a scalar, so
    ``z = ln(2 / alpha - 1) (t - i - 1/2)`` with ``t = (x_c - l) (2^b - 1) / (u - l)``; every per-element
    operation is a multiply or add (a division by a broadcast scalar stays a vector division in Inductor's
    CPU code)."""
    n = 2**bits - 1
    t = (clip(x, lower, upper) - lower) * (n / (upper - lower))
    i = torch.floor(t).clamp(0, n - 1).detach()
    return (upper - lower) / n, i, torch.log(2.0 / alpha - 1.0) * (t - (i + 0.5))


def soft_quantize(x: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, alpha: torch.Tensor, bits: int):
    """Q_S(x) (Eq. 5) = ``l + Delta (i + 1/2 + s tanh(z) / 2)``, ``s = 1 / (1 - alpha)``.

    ``tanh(z)`` is evaluated as ``2 sigmoid(2 z) - 1`` (equal in float64 to ~1e-15): Inductor's CPU sigmoid, fwd +
    bwd, costs about half of its tanh (measured on the 2-core CPU, docs/dsq.md)."""
    delta, i, z = soft_parts(x, lower, upper, alpha, bits)
    s = 0.5 / (1.0 - alpha)
    return (lower + delta * (0.5 - s)) + delta * i + (2.0 * s * delta) * torch.sigmoid(2.0 * z)


def hard_quantize(x: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, alpha: torch.Tensor, bits: int):
    """The hard staircase ``l + Delta (i + (sgn(phi) + 1) / 2)`` in the forward pass, with Q_S's gradient
    (``hard=True`` of the quantizer: quantized values in training, DSQ's gradients). sgn(phi) = sgn(z), ties up."""
    delta, i, z = soft_parts(x, lower, upper, alpha, bits)
    s = 0.5 / (1.0 - alpha)
    soft = (lower + delta * (0.5 - s)) + delta * i + (2.0 * s * delta) * torch.sigmoid(2.0 * z)
    return value_ste(soft, lower + delta * (i + (z >= 0).to(z.dtype)))


def k_from_alpha(alpha: float, delta: float) -> float:
    """Eq. 6 solved for k (for tests and docs)."""
    return math.log(2.0 / alpha - 1.0) / delta
