"""Clipping searches and non-uniform level sets for post-training quantization (supplement §7, Fig. 4A)."""

from __future__ import annotations

import torch

from qrepro.errors import QreproError


def mse_alpha_candidates(amax: torch.Tensor, num: int = 80, low: float = 0.2) -> torch.Tensor:
    """Candidate clipping values α = amax · c for c on a uniform grid in [low, 1]."""
    return amax * torch.linspace(low, 1.0, num, dtype=amax.dtype, device=amax.device)


def pot_levels(bits: int, alpha: torch.Tensor | float) -> torch.Tensor:
    """Signed power-of-two (logarithmic) levels: {0} ∪ {±α·2^−k : k = 0 … 2^(b−1) − 2}.

    One sign bit and b − 1 bits coding 2^(b−1) magnitudes (zero and 2^(b−1) − 1 powers of two), so
    b = 2 gives the ternary set {−α, 0, α}.
    """
    if not 2 <= bits <= 8:
        raise QreproError(f"power-of-two PTQ supports 2..8 weight bits, got {bits}")
    alpha = torch.as_tensor(alpha, dtype=torch.float32)
    mags = alpha * torch.pow(2.0, -torch.arange(2 ** (bits - 1) - 1, dtype=torch.float32, device=alpha.device))
    zero = torch.zeros(1, dtype=mags.dtype, device=mags.device)
    return torch.cat([-mags, zero, mags.flip(0)])  # ascending


def project(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Nearest level (``levels`` sorted ascending), via bucketize on the midpoints."""
    mids = 0.5 * (levels[1:] + levels[:-1])
    return levels[torch.bucketize(x, mids)]


def best_pot_levels(w: torch.Tensor, bits: int, num: int = 100) -> torch.Tensor:
    """PoT levels whose scale α minimises ‖W − Q(W)‖² over α = max|W|·c, c ∈ [0.2, 1]."""
    w = w.detach().reshape(-1).float()
    cands = [pot_levels(bits, a) for a in mse_alpha_candidates(w.abs().max(), num)]
    return cands[int(torch.argmin(torch.stack([(project(w, lv) - w).square().sum() for lv in cands])))]


def kmeans_levels(w: torch.Tensor, bits: int, iters: int = 50) -> torch.Tensor:
    """2^b levels from 1-D k-means (Lloyd's algorithm) on the weights, initialised at the quantiles.

    Vectorised: assignment by bucketize on level midpoints, update by scatter-add; an empty cluster keeps
    its level.
    """
    if not 1 <= bits <= 8:
        raise QreproError(f"k-means PTQ supports 1..8 weight bits, got {bits}")
    x = w.detach().reshape(-1).double()
    k = 2**bits
    q = (torch.arange(k, dtype=x.dtype, device=x.device) + 0.5) / k
    levels = torch.quantile(x, q) if x.numel() <= 16_000_000 else torch.sort(x).values[(q * x.numel()).long()]
    for _ in range(iters):
        levels = torch.sort(levels).values
        idx = torch.bucketize(x, 0.5 * (levels[1:] + levels[:-1]))
        s = torch.zeros(k, dtype=x.dtype, device=x.device).scatter_add_(0, idx, x)
        n = torch.zeros(k, dtype=x.dtype, device=x.device).scatter_add_(0, idx, torch.ones_like(x))
        new = torch.where(n > 0, s / n.clamp_min(1), levels)
        if torch.equal(new, levels):
            break
        levels = new
    return torch.sort(levels).values.float()
