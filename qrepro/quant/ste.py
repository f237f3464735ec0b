"""Straight-through estimators shared by the quantizers.

Every helper here is written as ``x + (f(x) - x).detach()`` so it compiles and captures into CUDA graphs
(no custom autograd.Function, no data-dependent Python control flow).
"""

from __future__ import annotations

import torch


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) in the forward pass, identity gradient (STE on the rounding only)."""
    return x + (torch.round(x) - x).detach()


def floor_ste(x: torch.Tensor) -> torch.Tensor:
    """floor(x) in the forward pass, identity gradient."""
    return x + (torch.floor(x) - x).detach()


def sign_ste(x: torch.Tensor) -> torch.Tensor:
    """sign(x) with sign(0) = +1 in the forward pass, identity gradient."""
    s = torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))
    return x + (s - x).detach()


def value_ste(x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Forward ``value``, backward as if the output were ``x`` (generic STE)."""
    return x + (value - x).detach()
