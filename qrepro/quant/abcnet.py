"""ABC-Net maths (Lin, Zhao & Pan, "Towards Accurate Binary Convolutional Neural Network", NeurIPS 2017), as
small pure functions.

Weights (Sec. 3.1): ``W ~ sum_i alpha_i B_i`` with M binary bases ``B_i = sign(W - mean(W) + u_i std(W))``,
shifts ``u_i = -1 + (i - 1) 2 / (M - 1)`` (u = 0 for M = 1), and ``alpha`` the least-squares fit (Eq. 3)
``argmin ||vec(W) - B alpha||^2`` (or trained). Gradient (Eq. 4, straight-through): ``dW = sum_i alpha_i dB_i``.

Activations (Sec. 3.2): ``A ~ sum_n beta_n H_{v_n}(R)``, ``H_v(R) = 2 * 1[clip(R + v, 0, 1) >= 0.5] - 1`` in
{-1, +1}, with trainable shifts ``v_n`` and scales ``beta_n``; straight-through gradient through the clip:
``dH_v/dR = dH_v/dv = 1[0 <= R + v <= 1]``.
"""

from __future__ import annotations

import torch

from qrepro.quant.ste import SavesInputs, sign_ste


def weight_shifts(m: int) -> list[float]:
    """``u_i = -1 + (i - 1) 2 / (M - 1)``, i = 1..M (0 for M = 1)."""
    return [0.0] if m == 1 else [-1.0 + i * 2.0 / (m - 1) for i in range(m)]


def weight_bases(w: torch.Tensor, m: int) -> torch.Tensor:
    """[M, *w.shape] bases in {-1, +1} (sign(0) = +1), straight-through (identity) gradient to ``w``.

    mean and std (population) are statistics of the bases' thresholds: no gradient flows through them (Eq. 4
    differentiates the bases only)."""
    mean, std = w.detach().mean(), w.detach().std(unbiased=False)
    return torch.stack([sign_ste(w - mean + u * std) for u in weight_shifts(m)])


def fit_alpha(w: torch.Tensor, bases: torch.Tensor, ridge: float = 1e-8) -> torch.Tensor:
    """Eq. 3: least-squares ``alpha`` for ``vec(W) ~ B alpha`` (no gradient). ``ridge`` (times the number of
    weights) keeps identical bases (e.g. all-zero weights) from making the system singular: they share alpha."""
    b = bases.detach().reshape(bases.shape[0], -1)
    x = w.detach().reshape(-1)
    btb = b @ b.T
    eye = torch.eye(b.shape[0], dtype=b.dtype, device=b.device)
    return torch.linalg.solve(btb + ridge * x.numel() * eye, b @ x)


def combine(bases: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """``sum_i alpha_i B_i``."""
    return torch.tensordot(alpha, bases, dims=1)


def binary_activation(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``H_v(x) = 2 * 1[clip(x + v, 0, 1) >= 0.5] - 1`` with gradient ``1[0 <= x + v <= 1]`` to x and v."""
    s = x + shift
    surrogate = torch.where((s >= 0) & (s <= 1), s, s.detach())  # the clip's linear region, ends included
    hard = torch.where(s >= 0.5, torch.ones_like(s), -torch.ones_like(s))
    return surrogate + (hard - surrogate).detach()


def quantize_act(x: torch.Tensor, shifts: torch.Tensor, betas: torch.Tensor) -> torch.Tensor:
    """``sum_n beta_n H_{v_n}(x)``, with the gradients of :func:`binary_activation` summed over the bases."""
    return _ActBases.apply(x, shifts, betas)


class _ActBases(SavesInputs):
    """:func:`quantize_act` with its gradients written out, so the compiled backward is one pass over the saved
    input: ``dy/dx = sum_n beta_n 1[0 <= x + v_n <= 1]``, ``dy/dv_n = beta_n 1[0 <= x + v_n <= 1]``,
    ``dy/dbeta_n = H_{v_n}(x)`` (autograd's graph of the same sum ran slower under Inductor on the CPU)."""

    @staticmethod
    def forward(x, shifts, betas):  # type: ignore[override]
        out = None
        for n in range(shifts.shape[0]):
            h = betas[n] * (2.0 * (x + shifts[n] >= 0.5).to(x.dtype) - 1.0)
            out = h if out is None else out + h
        return out

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        x, shifts, betas = ctx.saved_tensors
        gx, g_shift, g_beta = None, [], []
        for n in range(shifts.shape[0]):
            s = x + shifts[n]
            gi = g * ((s >= 0) & (s <= 1)).to(g.dtype)
            g_shift.append(gi.sum() * betas[n])
            g_beta.append((g * (2.0 * (s >= 0.5).to(g.dtype) - 1.0)).sum())
            gx = gi * betas[n] if gx is None else gx + gi * betas[n]
        return gx, torch.stack(g_shift), torch.stack(g_beta)
