"""LQ-Net maths (Zhang et al., "LQ-Nets: Learned Quantization for Highly Accurate and Compact Deep Neural
Networks", ECCV 2018), as small pure functions.

A K-bit LQ-Net quantizer has a basis ``v`` in R^K; its 2^K levels are ``v^T e`` over the codes ``e`` in
{-1, 1}^K (weights) or {0, 1}^K (activations). A value maps to its nearest level (Eq. 2: thresholds at the
midpoints of consecutive sorted levels, a value on a threshold goes to the lower level as in the authors' code).
QEM (Sec. 3.2, Eq. 5/6) alternates that encoding with the least-squares basis ``v* = (B B^T)^{-1} B x`` over the
codes ``B`` of the values ``x``; the basis then moves by a moving average.

Everything here is elementwise work plus reductions over thresholds (no sort of the data, no gather, no scatter):
the quantized value is ``q_0 + sum_i 1[x > t_i] (q_{i+1} - q_i)`` and the QEM statistics are, per threshold,
the count and the sum of the values above it. It compiles into one fused loop and runs under ``vmap``.
"""

from __future__ import annotations

import itertools

import torch

NORM_PPF_0_75 = 0.6745  # Phi^-1(0.75), the authors' initial basis scale


def codes(bits: int, signed: bool, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(2^K, K) table of the binary codes: row j is the binary expansion of j (bit k weights basis entry k),
    entries in {-1, 1} (``signed``, weights) or {0, 1} (activations)."""
    rows = [[(j >> k) & 1 for k in range(bits)] for j in range(2**bits)]
    e = torch.tensor(rows, dtype=dtype)
    return 2 * e - 1 if signed else e


def init_basis(bits: int, signed: bool, fan: int | None = None) -> torch.Tensor:
    """The authors' initial basis ``[b, 2b, 4b, ...]``: weights ``b = 0.6745 sqrt(2/fan) / 2^(K-1)`` (He
    initialisation's quartile spread over the levels), activations ``b = 2 * 0.6745 / (2^K - 1)``."""
    if signed:
        if not fan or fan <= 0:
            raise ValueError("fan must be a positive int for the weight basis")
        base = NORM_PPF_0_75 * (2.0 / fan) ** 0.5 / 2 ** (bits - 1)
    else:
        base = NORM_PPF_0_75 * 2 / (2**bits - 1)
    return torch.tensor([base * 2**k for k in range(bits)])


def sorted_levels(basis: torch.Tensor, code_table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Levels ``v^T e`` for every code, ascending: (levels [..., L], index of each level's code [..., L]).

    ``basis`` is [..., K] (one basis per output channel for weights, one per layer for activations)."""
    levels = basis @ code_table.to(basis.dtype).T
    return torch.sort(levels, dim=-1, stable=True)


def thresholds(levels: torch.Tensor) -> torch.Tensor:
    """Midpoints of consecutive sorted levels, [..., L-1]."""
    return 0.5 * (levels[..., 1:] + levels[..., :-1])


def _columns(levels: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The sorted levels and thresholds one by one, each shaped to broadcast against ``x``: [C, 1] for per-row
    ``levels`` [C, L] and ``x`` [C, N]; a 0-d tensor for one set ``levels`` [L] over the whole ``x``."""
    thr = thresholds(levels)
    if levels.dim() == 1:
        return list(levels.unbind(-1)), list(thr.unbind(-1))
    return list(levels[:, :, None].unbind(1)), list(thr[:, :, None].unbind(1))


def quantize(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Nearest sorted level of every entry of ``x`` [C, N] for ``levels`` [C, L] (one row per channel), or of
    ``x`` of any shape for one set ``levels`` [L] (per tensor). No gradient: piecewise constant."""
    lv, thr = _columns(levels)
    y = torch.zeros_like(x) + lv[0]
    for i in range(len(thr)):
        y = y + (x > thr[i]).to(x.dtype) * (lv[i + 1] - lv[i])
    return y


def level_stats(x: torch.Tensor, levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Count and sum of the entries of each row of ``x`` [C, N] that fall on each sorted level of that row's
    ``levels`` [C, L]: ([C, L], [C, L]); for one set ``levels`` [L] over all of ``x`` (any shape): ([L], [L])."""
    _, thr = _columns(levels)
    dims = tuple(range(x.dim())) if levels.dim() == 1 else (-1,)
    total = torch.full_like(levels[..., 0], x.numel() // levels[..., 0].numel())
    n_ge, s_ge = [total], [x.sum(dims)]  # "above t_{-1}": every entry
    for t in thr:
        above = (x > t).to(x.dtype)
        n_ge.append(above.sum(dims))
        s_ge.append((above * x).sum(dims))
    n_ge.append(torch.zeros_like(n_ge[0]))
    s_ge.append(torch.zeros_like(s_ge[0]))
    n, s = torch.stack(n_ge, -1), torch.stack(s_ge, -1)
    # entries on level j = (above threshold j-1) - (above threshold j)
    return n[..., :-1] - n[..., 1:], s[..., :-1] - s[..., 1:]


def normal_equations(
    counts: torch.Tensor, sums: torch.Tensor, order: torch.Tensor, code_table: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``B B^T`` [..., K, K] and ``B x`` [..., K] of QEM from the per-level counts and sums (levels in sorted
    order; ``order`` maps each sorted level to its code row)."""
    e = code_table.to(counts.dtype)[order]  # [..., L, K]: the code of each sorted level
    btb = torch.einsum("...l,...lk,...lm->...km", counts, e, e)
    bx = torch.einsum("...l,...lk->...k", sums, e)
    return btb, bx


def qem_basis(btb: torch.Tensor, bx: torch.Tensor, basis: torch.Tensor, ridge: float) -> torch.Tensor:
    """Least-squares basis ``(B B^T + ridge I)^{-1} (B x + ridge v)`` (Eq. 6; ``ridge`` = the authors' EPS term,
    which keeps a basis entry whose codes were never used where it is instead of making the system singular).

    With ``ridge = 0`` this is the plain least-squares solution (``torch.linalg.lstsq`` of B^T v = x); a
    singular system then raises."""
    k = btb.shape[-1]
    eye = torch.eye(k, dtype=btb.dtype, device=btb.device)
    return torch.linalg.solve(btb + ridge * eye, bx + ridge * basis)


def all_code_levels(basis: torch.Tensor, signed: bool) -> list[float]:
    """The levels of a 1-D basis by brute force over every code (for tests and docs)."""
    vals = [-1.0, 1.0] if signed else [0.0, 1.0]
    return sorted(
        float(sum(c * b for c, b in zip(e, basis.tolist()))) for e in itertools.product(vals, repeat=len(basis))
    )
