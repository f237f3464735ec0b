"""Maths of "Overcoming Oscillations in Quantization-Aware Training" (Nagel et al., ICML 2022).

Quantizer (LSQ-style symmetric uniform, per tensor, the authors' ``SymmetricUniformQuantizer``):

    x_int = clip(round(x/s), n, p),   x_q = s·x_int,   s = max(s_param, 1e-8),

with ``(n, p) = (−2^(b−1), 2^(b−1) − 1)`` for signed and ``(0, 2^b − 1)`` for unsigned tensors, the
straight-through estimator on the rounding and torch.clamp's gradient on the clipping (so s is learned as in LSQ,
without LSQ's gradient scale). Ranges are initialised by a 1-D MSE grid search (:func:`mse_scale`).

Oscillation dampening (Eq. 7): ``L_damp = Σ_layers agg((s·x_int − clip(w, s·n, s·p))²)`` with the quantized
target detached (the authors' default aggregation ``kernel_mean``: sum over the output channels, mean over the
rest). Its weight λ follows a cosine from ``λ_0`` to ``λ_T`` after a relative start (:func:`cosine_anneal`).

Oscillation tracking and freezing (Sec. 4.2): per integer weight, with ``Δ = round(x_int^{t−1} − x_int^t)``,
``o^t = 1[sign(Δ)·d^{t−1} = −1]`` (``d``: the direction of the last change), the frequency
``f^t = m·o^t + (1 − m)·f^{t−1}``; a weight with ``f^t > f_th`` is frozen to ``round(EMA(x_int))``.
"""

from __future__ import annotations

import math

import torch

from qrepro.errors import QreproError
from qrepro.quant.ste import round_ste

SCALE_EPS = 1e-8


def int_range(bits: int, signed: bool) -> tuple[float, float]:
    """(n, p): the integer grid of a ``bits``-bit symmetric quantizer."""
    if not 2 <= bits <= 8:
        raise QreproError(f"the Nagel et al. quantizer supports 2..8 bits, got {bits}; choose e.g. precision=w4a4")
    return (-float(2 ** (bits - 1)), float(2 ** (bits - 1) - 1)) if signed else (0.0, float(2**bits - 1))


def effective_scale(s: torch.Tensor) -> torch.Tensor:
    """s = max(s_param, 1e-8) (torch.clamp: no gradient below the floor)."""
    return torch.clamp(s, min=SCALE_EPS)


def to_integer(x: torch.Tensor, s: torch.Tensor, n: float | torch.Tensor, p: float | torch.Tensor) -> torch.Tensor:
    """x_int = clip(round_STE(x/s), n, p)."""
    return torch.clamp(round_ste(x / s), n, p)


def quantize(x: torch.Tensor, s: torch.Tensor, n: float | torch.Tensor, p: float | torch.Tensor) -> torch.Tensor:
    """x_q = s·clip(round_STE(x/s), n, p)."""
    return s * to_integer(x, s, n, p)


def dampening_term(
    w: torch.Tensor,
    w_q: torch.Tensor,
    s: torch.Tensor,
    n: float | torch.Tensor,
    p: float | torch.Tensor,
    aggregation: str = "kernel_mean",
) -> torch.Tensor:
    """One layer's dampening loss: agg((w_q.detach() − clip(w, s·n, s·p))²) (the clip bounds carry s's gradient)."""
    w_clip = torch.minimum(torch.maximum(w, s * n), s * p)
    loss = (w_q.detach() - w_clip) ** 2
    reduce = {"sum": torch.sum, "mean": torch.mean, "kernel_mean": lambda t: t.sum(0).mean()}.get(aggregation)
    if reduce is None:
        raise QreproError(f"dampening aggregation must be sum, mean or kernel_mean, got {aggregation!r}")
    return reduce(loss)


def cosine_anneal(t: float, t_max: float, start: float, end: float, rel_start: float) -> float:
    """start until ``rel_start·t_max``, then end + (start − end)·(1 + cos(π·r))/2 with r the relative progress."""
    t0 = rel_start * t_max
    if t < t0:
        return start
    r = (t - t0) / (t_max - t0)
    return end + 0.5 * (start - end) * (1.0 + math.cos(r * math.pi))


@torch.no_grad()
def mse_scale(x: torch.Tensor, bits: int, num_candidates: int = 100, margin: float = 0.5) -> tuple[float, bool]:
    """(scale, signed) of the range that minimises Σ(x − x_q)² over the grid ``c·m/num_candidates``,
    c = 1..num_candidates, ``m = max(|min x|, max x) + margin``; one-sided (unsigned, range [0, c·step]) when
    min x >= 0. The first minimiser wins (the authors' 1-D grid search)."""
    x = x.detach()
    signed = bool(x.min() < 0)
    step = (max(abs(float(x.min())), float(x.max())) + margin) / num_candidates
    n, p = int_range(bits, signed)
    best, best_c = math.inf, 1
    for c in range(1, num_candidates + 1):
        hi = max(step * c, SCALE_EPS)
        s = torch.tensor(hi / p, dtype=x.dtype, device=x.device)
        loss = float(((x - s * torch.clamp(torch.round(x / s), n, p)) ** 2).sum())
        if loss < best:
            best, best_c = loss, c
    return max(step * best_c, SCALE_EPS) / p, signed


@torch.no_grad()
def track_oscillations(
    x_int: torch.Tensor, prev_int: torch.Tensor, prev_dir: torch.Tensor, freq: torch.Tensor, momentum: float
) -> torch.Tensor:
    """One tracking step, in place on ``prev_int``, ``prev_dir``, ``freq``: returns the 0/1 oscillation mask."""
    delta = torch.round(prev_int - x_int)
    direction = torch.sign(delta)
    osc = (prev_dir * direction == -1).to(freq.dtype)
    freq.mul_(1 - momentum).add_(momentum * osc)
    prev_dir.copy_(torch.where(delta != 0, direction, prev_dir))
    prev_int.copy_(x_int)
    return osc


@torch.no_grad()
def freeze_step(
    x_int: torch.Tensor,
    freq: torch.Tensor,
    frozen: torch.Tensor,
    frozen_int: torch.Tensor,
    ema_int: torch.Tensor,
    threshold: float,
    momentum: float,
) -> None:
    """Freeze weights whose oscillation frequency exceeds ``threshold`` at round(EMA(x_int)) (the EMA before this
    step's update), then update the EMA; in place. A threshold of 0 does nothing (the authors' warm start)."""
    if threshold <= 0:
        return
    new = freq > threshold
    frozen.logical_or_(new)
    frozen_int.copy_(torch.where(new, torch.round(ema_int), frozen_int))
    ema_int.mul_(1 - momentum).add_(momentum * x_int)
