"""Robust-quantization training terms: SatNL, SymReg (Park et al., ECCV 2022), KURE (Shkolnik et al., 2020).

Sources: the supplement of Symmetry Regularization and Saturating Nonlinearity for Robust Quantization (§2, §5, §9).
The main paper's text was not among our sources, so SymReg is formalised as the squared 1-D
Wasserstein-2 distance between the empirical distributions of W and -W.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from qrepro.errors import QreproError

#: Saturating non-linearities f with the three properties the supplement (§5) asks for: odd, bounded
#: (|f| < 1) and decreasing slope for |x| > 0. All are normalised to f'(0) = 1, so d·f(W/d) ≈ W for |W| << d.
SATNL_FUNCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "tanh": torch.tanh,
    "softsign": lambda x: x * torch.rsqrt(1.0 + x * x),  # the algebraic sigmoid x / sqrt(1 + x²)
    "atan": lambda x: (2.0 / math.pi) * torch.atan((math.pi / 2.0) * x),
    "erf": lambda x: torch.erf((math.sqrt(math.pi) / 2.0) * x),
}


def satnl(w: torch.Tensor, d: float | torch.Tensor = 1.0, fn: str = "tanh") -> torch.Tensor:
    """Saturating non-linearity on the weights: W' = d · f(W / d), so W' ∈ (−d, d) (supplement §5, Fig. 3A).

    ``d`` may be a float or a (detached or learnable) tensor broadcastable to ``w``.
    """
    if fn not in SATNL_FUNCTIONS:
        raise QreproError(f"unknown SatNL function {fn!r}; choose one of: {', '.join(SATNL_FUNCTIONS)}")
    return d * SATNL_FUNCTIONS[fn](w / d)


def symreg_loss(w: torch.Tensor) -> torch.Tensor:
    """SymReg for one weight tensor: mean((sort(W) + flip(sort(W)))²).

    This is the squared Wasserstein-2 distance W2²(P_W, P_{−W}) between the empirical distribution of the
    weights and of their negation (the k-th smallest of −W is −(k-th largest of W)). It is zero iff the
    multiset of weights is symmetric about zero. The gradient flows through the sort values (a permutation).
    """
    s = torch.sort(w.reshape(-1)).values
    return (s + s.flip(0)).square().mean()


def kurtosis(w: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Kurtosis E[((W − μ)/σ)^4] of a tensor with the population (biased) standard deviation."""
    x = w.reshape(-1)
    mu = x.mean()
    var = (x - mu).square().mean()
    return (x - mu).pow(4).mean() / (var.square() + eps)


def kure_loss(w: torch.Tensor, target: float = 1.8) -> torch.Tensor:
    """KURE penalty (Shkolnik et al., 2020, Eq. 4) for one tensor: (Kurt[W] − K_T)², K_T = 1.8 (uniform)."""
    return (kurtosis(w) - target).square()
