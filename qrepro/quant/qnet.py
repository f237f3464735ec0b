"""QNet maths (Yang et al., "Quantization Networks", CVPR 2019), as small pure functions.

Quantization as a non-linear function (Eq. 3/4): a sum of sigmoid steps

    y = alpha * (sum_i s_i sigmoid(T (beta x - b_i)) - o),

with step heights ``s_i`` (differences of consecutive target values), thresholds ``b_i``, offset ``o``
(half the total height for symmetric weights, 0 for activations), learned output scale ``alpha`` and input
scale ``beta``, and a temperature ``T`` raised during training; as ``T -> inf`` the steps become the hard
quantizer ``alpha * (sum_i s_i 1[beta x > b_i] - o)`` (inference). Training uses the soft function and its exact
gradient (no straight-through estimator), written out in one autograd function.

Targets here: ``2^b`` uniform values, ``[-1, 1]`` for weights, ``[0, 1]`` for activations; thresholds at the
midpoints of consecutive targets (the paper initialises them from the clustered weights; for uniform targets
that is the midpoints).
"""

from __future__ import annotations

import torch

from qrepro.quant.ste import sum_to


def targets(bits: int, signed: bool) -> torch.Tensor:
    lo = -1.0 if signed else 0.0
    return torch.linspace(lo, 1.0, 2**bits, dtype=torch.float64)


def steps(bits: int, signed: bool) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(heights s_i, thresholds b_i, offset o) of the target set."""
    t = targets(bits, signed)
    return t[1:] - t[:-1], 0.5 * (t[1:] + t[:-1]), float(-t[0])


def soft_quantize(
    x: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    temperature: torch.Tensor,
    heights: torch.Tensor,
    thresholds: torch.Tensor,
    offset: float,
) -> torch.Tensor:
    """Eq. 3: ``alpha (sum_i s_i sigmoid(T (beta x - b_i)) - o)``."""
    return _SoftSteps.apply(x, alpha, beta, temperature, heights, thresholds, offset)


class _SoftSteps(torch.autograd.Function):
    """Eq. 3 with its exact gradients written out, so the compiled backward is one pass over the saved input:
    with ``sigma_i = sigmoid(T (beta x - b_i))`` and ``S' = sum_i s_i sigma_i (1 - sigma_i)``,

        dy/dx = alpha T beta S',   dy/dalpha = sum_i s_i sigma_i - o,   dy/dbeta = alpha T x S',
        dy/dT = alpha sum_i s_i sigma_i (1 - sigma_i) (beta x - b_i).

    Autograd's own graph of the same function ran slower under Inductor on the CPU (docs/qnet.md)."""

    generate_vmap_rule = True  # batched members (torch.func.vmap)

    @staticmethod
    def forward(x, alpha, beta, temperature, heights, thresholds, offset):  # type: ignore[override]
        return _staircase(x, alpha, beta, heights, thresholds, offset, lambda d: torch.sigmoid(temperature * d))

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        x, alpha, beta, temperature, heights, thresholds, ctx.offset = inputs
        ctx.save_for_backward(x, alpha, beta, temperature, heights, thresholds)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        x, alpha, beta, temperature, heights, thresholds = ctx.saved_tensors
        z = beta * x
        total = slope = slope_t = None
        for i in range(heights.shape[0]):
            d = z - thresholds[i]
            sig = torch.sigmoid(temperature * d)
            ds = heights[i] * (sig * (1.0 - sig))
            total = heights[i] * sig if total is None else total + heights[i] * sig
            slope = ds if slope is None else slope + ds
            if ctx.needs_input_grad[3]:
                slope_t = ds * d if slope_t is None else slope_t + ds * d
        gs = g * slope
        need = ctx.needs_input_grad
        g_alpha = sum_to(g * (total - ctx.offset), alpha) if need[1] else None
        g_beta = sum_to(gs * x * (alpha * temperature), beta) if need[2] else None
        g_t = sum_to(g * slope_t * alpha, temperature) if need[3] else None
        g_x = sum_to(gs * (alpha * temperature * beta), x) if need[0] else None
        return g_x, g_alpha, g_beta, g_t, None, None, None


def hard_quantize(
    x: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    heights: torch.Tensor,
    thresholds: torch.Tensor,
    offset: float,
) -> torch.Tensor:
    """T -> inf: ``alpha (sum_i s_i 1[beta x > b_i] - o)`` (a value on a threshold takes the lower target)."""
    return _staircase(x, alpha, beta, heights, thresholds, offset, lambda d: (d > 0).to(d.dtype))


def _staircase(x, alpha, beta, heights, thresholds, offset, step) -> torch.Tensor:
    """``alpha (sum_i s_i step(beta x - b_i) - o)``."""
    z = beta * x
    y = torch.zeros_like(z) - offset
    for i in range(heights.shape[0]):
        y = y + heights[i] * step(z - thresholds[i])
    return alpha * y
