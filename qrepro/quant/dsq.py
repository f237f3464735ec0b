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
constant), written out in one autograd function; outside ``[l, u]`` the clipped value's gradient goes to the
bound, with the indicator gradients of ``qrepro.quant.ste.clip``.
"""

from __future__ import annotations

import math

import torch

from qrepro.quant.ste import sum_to


def _interval(x: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, bits: int):
    """(t, i, r): ``t = (x_c - l) / Delta`` for x clipped to [l, u], the interval index ``i`` and the offset from
    its centre ``r = t - i - 1/2``, so that ``k (x_c - m_i) = ln(2 / alpha - 1) r`` (Eq. 6 with ``k Delta`` a
    scalar: every per-element operation is a multiply or add)."""
    n = 2**bits - 1
    t = (torch.minimum(torch.maximum(x, lower), upper) - lower) * (n / (upper - lower))
    i = torch.floor(t).clamp(0, n - 1)
    return t, i, t - (i + 0.5)


class _Staircase(torch.autograd.Function):
    """Q_S (or, ``hard``, the hard staircase) with Q_S's exact gradients written out, so the compiled backward is
    one pass over the saved input: with ``G = (Q_S - l) / Delta`` and ``D = dQ_S/dx = 2 s K sigma (1 - sigma)``
    (``K = ln(2 / alpha - 1)``, ``sigma = sigmoid(2 K r)``),

        dQ/dx = D 1[l < x < u],
        dQ/dl = 1 - G/n + D (t/n - 1) 1[l < x < u],   dQ/du = G/n - D (t/n) 1[l < x < u],
        dQ/dalpha = Delta (s^2 (sigma - 1/2) - 4 s sigma (1 - sigma) r / (alpha (2 - alpha))),

    which on a clipped value (x <= l: G = 0; x >= u: G = n) is the bound's gradient, as ``ste.clip`` gives.
    Autograd's own graph of the same function ran slower under Inductor on the CPU (docs/dsq.md)."""

    generate_vmap_rule = True  # batched members (torch.func.vmap)

    @staticmethod
    def forward(x, lower, upper, alpha, bits, hard):  # type: ignore[override]
        t, i, r = _interval(x, lower, upper, bits)
        delta = (upper - lower) / (2**bits - 1)
        if hard:  # sgn(phi) = sgn(r), ties up
            return lower + delta * (i + (r >= 0).to(r.dtype))
        s = 1.0 / (1.0 - alpha)
        sig = torch.sigmoid((2.0 * torch.log(2.0 / alpha - 1.0)) * r)
        return (lower + delta * (0.5 - 0.5 * s)) + delta * i + (s * delta) * sig

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        x, lower, upper, alpha, bits, _ = inputs
        ctx.bits = bits
        ctx.save_for_backward(x, lower, upper, alpha)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        x, lower, upper, alpha = ctx.saved_tensors
        n = 2**ctx.bits - 1
        t, i, r = _interval(x, lower, upper, ctx.bits)
        # 0/1 floats from sign(), not comparisons: see ste.SavesInputs
        inside = torch.sign(x - lower).clamp(min=0) * torch.sign(upper - x).clamp(min=0)
        k = torch.log(2.0 / alpha - 1.0)
        s = 1.0 / (1.0 - alpha)
        sig = torch.sigmoid((2.0 * k) * r)
        ss = sig * (1.0 - sig)
        gx = g * ((2.0 * s * k) * ss * inside)
        tn, gn = t * (1.0 / n), (i + (0.5 - 0.5 * s) + s * sig) * (1.0 / n)
        g_lower = sum_to(g * (1.0 - gn) + gx * (tn - 1.0), lower)
        g_upper = sum_to(g * gn - gx * tn, upper)
        da = (s * s) * (sig - 0.5) - (4.0 * s / (alpha * (2.0 - alpha))) * ss * r
        g_alpha = sum_to(g * da * ((upper - lower) / n), alpha)
        return sum_to(gx, x), g_lower, g_upper, g_alpha, None, None


def soft_quantize(x: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, alpha: torch.Tensor, bits: int):
    """Q_S(x) (Eq. 5) = ``l + Delta (i + 1/2 + s tanh(z) / 2)``, ``s = 1 / (1 - alpha)``, ``z = k (x_c - m_i)``.

    ``tanh(z)`` is evaluated as ``2 sigmoid(2 z) - 1`` (equal in float64 to ~1e-15): Inductor's CPU sigmoid, fwd +
    bwd, costs about half of its tanh (measured on the 2-core CPU, docs/dsq.md)."""
    return _Staircase.apply(x, lower, upper, alpha, bits, False)


def hard_quantize(x: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, alpha: torch.Tensor, bits: int):
    """The hard staircase ``l + Delta (i + (sgn(phi) + 1) / 2)`` in the forward pass, with Q_S's gradient
    (``hard=True`` of the quantizer: quantized values in training, DSQ's gradients). sgn(phi) = sgn(z), ties up."""
    return _Staircase.apply(x, lower, upper, alpha, bits, True)


def k_from_alpha(alpha: float, delta: float) -> float:
    """Eq. 6 solved for k (for tests and docs)."""
    return math.log(2.0 / alpha - 1.0) / delta
