"""Straight-through estimators shared by the quantizers.

Every helper here is written as ``x + (f(x) - x).detach()`` so it compiles and captures into CUDA graphs
(no custom autograd.Function, no data-dependent Python control flow).
"""

from __future__ import annotations

import torch


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) in the forward pass, identity gradient (STE on the rounding only)."""
    return x + (torch.round(x) - x).detach()


def sign_ste(x: torch.Tensor) -> torch.Tensor:
    """sign(x) with sign(0) = +1 in the forward pass, identity gradient."""
    s = torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))
    return x + (s - x).detach()


def value_ste(x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Forward ``value``, backward as if the output were ``x`` (generic STE)."""
    return x + (value - x).detach()


class SavesInputs(torch.autograd.Function):
    """A function whose backward pass is rebuilt from its saved float inputs, so a compiled graph does not store
    boolean masks between forward and backward (Inductor's C++ backend writes those slowly; docs/speed.md §3)."""

    generate_vmap_rule = True  # batched members (torch.func.vmap, qrepro/engine/members.py)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        ctx.save_for_backward(*inputs)


class _Clip(SavesInputs):
    """clip(x, lo, hi) with the indicator gradients of ``where(x >= hi, hi, where(x <= lo, lo, x))``."""

    @staticmethod
    def forward(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return torch.minimum(torch.maximum(x, lo), hi)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        x, lo, hi = ctx.saved_tensors
        # the masks as 0/1 floats from sign(), not comparisons: a comparison's bool result could be moved into
        # the forward graph by the partitioner and saved there instead of x (cheaper in bytes, slow on CPU)
        up = torch.sign(hi - x).clamp(min=0)  # 1[x < hi]
        inside = torch.sign(x - lo).clamp(min=0) * up  # 1[lo < x < hi]
        gx = g * inside
        g_hi = sum_to(g * (1 - up), hi) if ctx.needs_input_grad[2] else None  # 1[x >= hi]
        g_lo = sum_to(g * (up - inside), lo) if ctx.needs_input_grad[1] else None  # 1[x <= lo and x < hi]
        return sum_to(gx, x), g_lo, g_hi


class _Minimum(SavesInputs):
    """min(x, hi) with the gradients of ``where(x <= hi, x, hi)``."""

    @staticmethod
    def forward(x: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return torch.minimum(x, hi)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        x, hi = ctx.saved_tensors
        above = torch.sign(x - hi).clamp(min=0)  # 1[x > hi], a 0/1 float (see _Clip.backward)
        g_hi = sum_to(g * above, hi) if ctx.needs_input_grad[1] else None
        return sum_to(g * (1 - above), x), g_hi


def sum_to(g: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The gradient of a broadcast input: ``g`` summed over the broadcast dimensions of ``like``."""
    return g if g.shape == like.shape else g.sum_to_size(like.shape)


def clip(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """x clipped to [lo, hi] (tensors broadcastable with x, lo <= hi), exactly as
    ``where(x >= hi, hi, where(x <= lo, lo, x))`` in value and gradient: d/dx = 1[lo < x < hi],
    d/dhi = 1[x >= hi], d/dlo = 1[x <= lo and x < hi] (summed over broadcast elements). A value on a bound
    gets the bound's gradient, not x's. The masks multiply the incoming gradient, so a non-finite x or
    gradient gives non-finite gradients everywhere it reaches (the where() form would zero some of them);
    training stops on a non-finite loss before that matters."""
    return _Clip.apply(x, lo, hi)


def minimum(x: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """min(x, hi) (``hi`` broadcastable with x), exactly as ``where(x <= hi, x, hi)`` in value and gradient:
    d/dx = 1[x <= hi] (a value on the bound keeps x's gradient), d/dhi = 1[x > hi] (summed over broadcast
    elements). Like :func:`clip`, the mask is rebuilt in the backward pass from the saved float input."""
    return _Minimum.apply(x, hi)
