"""QNet maths (Yang et al., "Quantization Networks", CVPR 2019), as small pure functions.

Quantization as a non-linear function (Eq. 3/4): a sum of sigmoid steps

    y = alpha * (sum_i s_i sigmoid(T (beta x - b_i)) - o),

with step heights ``s_i`` (differences of consecutive target values), thresholds ``b_i``, offset ``o``
(half the total height for symmetric weights, 0 for activations), learned output scale ``alpha`` and input
scale ``beta``, and a temperature ``T`` raised during training; as ``T -> inf`` the steps become the hard
quantizer ``alpha * (sum_i s_i 1[beta x > b_i] - o)`` (inference). Training uses the soft function and its exact
gradient (no straight-through estimator).

Targets here: ``2^b`` uniform values, ``[-1, 1]`` for weights, ``[0, 1]`` for activations; thresholds at the
midpoints of consecutive targets (the paper initialises them from the clustered weights; for uniform targets
that is the midpoints).
"""

from __future__ import annotations

import torch


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
    return _staircase(x, alpha, beta, heights, thresholds, offset, lambda d: torch.sigmoid(temperature * d))


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
