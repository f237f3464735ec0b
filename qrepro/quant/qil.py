"""QIL maths (Jung et al., "Learning to Quantize Deep Networks by Optimizing Quantization Intervals with Task
Loss", CVPR 2019), as small pure functions.

A quantization interval is given by its centre ``c`` and half-width ``d``. Values below ``c - d`` (in magnitude
for weights) are pruned to 0, values above ``c + d`` clipped to 1, and those inside mapped linearly with
``alpha = 0.5 / d``, ``beta = -0.5 c / d + 0.5`` (Eq. 2 and 4):

- weights (Eq. 2): ``w_hat = sign(w) (alpha |w| + beta)^gamma`` inside, 0 below, ``sign(w)`` above;
- activations (Eq. 4): ``x_hat = alpha x + beta`` inside (gamma = 1), 0 below, 1 above;
- discretizer (Eq. 3): ``round(q_D x_hat) / q_D`` with ``q_D = 2^(N-1) - 1`` (weights, signed) or ``2^N - 1``
  (activations), a straight-through rounding. The outputs lie in [-1, 1] / [0, 1]; the batch normalisation
  after each quantized convolution absorbs the scale.

Gradients reach ``c``, ``d`` and ``gamma`` through the transformer (not through the rounding). At ``t = 0`` (a
weight exactly on the pruning boundary) ``t^gamma`` is taken as the constant 0: its gradient there is 0 (the
one-sided derivative ``gamma t^(gamma-1)`` is unbounded for gamma < 1).
"""

from __future__ import annotations

import torch

from qrepro.quant.ste import round_ste

D_MIN = 1e-8  # the half-width is |d| floored here, so the interval never collapses to a division by zero


def interval_position(v: torch.Tensor, c: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``clip(alpha v + beta, 0, 1) = clip((v - (c - d)) / (2 d), 0, 1)``: 0 below the interval, 1 above."""
    d = d.abs().clamp_min(D_MIN)
    return ((v - (c - d)) / (2 * d)).clamp(0.0, 1.0)


def weight_transform(w: torch.Tensor, c: torch.Tensor, d: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """Eq. 2: ``sign(w) t^gamma`` with ``t`` the position of ``|w|`` in the interval."""
    t = interval_position(w.abs(), c, d)
    tg = torch.where(t > 0, t.clamp_min(torch.finfo(t.dtype).tiny) ** gamma, torch.zeros_like(t))
    return torch.sign(w) * tg


def discretize(x_hat: torch.Tensor, levels: int) -> torch.Tensor:
    """Eq. 3: ``round(levels * x_hat) / levels`` with a straight-through rounding."""
    return round_ste(x_hat * levels) / levels


def quantize_weight(w: torch.Tensor, c: torch.Tensor, d: torch.Tensor, gamma: torch.Tensor, bits: int) -> torch.Tensor:
    return discretize(weight_transform(w, c, d, gamma), 2 ** (bits - 1) - 1)


def quantize_act(x: torch.Tensor, c: torch.Tensor, d: torch.Tensor, bits: int) -> torch.Tensor:
    return discretize(interval_position(x, c, d), 2**bits - 1)
