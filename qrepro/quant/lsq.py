"""LSQ (Esser et al., "Learned Step Size Quantization", ICLR 2020) and LSQ+ (Bhalgat et al., "LSQ+: Improving
low-bit quantization through learnable offsets and better initialization", CVPR Workshops 2020).

Functional maths only (quantizers with their gradients, step-size initialisations); the quantizer modules and the
per-layer policy live in ``qrepro.quant.methods.lsq``, the method in docs/lsq.md.

Q_N, Q_P: signed b-bit (weights) Q_N = 2^(b-1), Q_P = 2^(b-1) - 1; unsigned (activations) Q_N = 0, Q_P = 2^b - 1.
"""

from __future__ import annotations

import math

import torch

from qrepro.errors import QreproError
from qrepro.quant.ste import clip, round_ste

FP_BITS = 32


def bounds(bits: int, signed: bool) -> tuple[int, int]:
    """(Q_N, Q_P) of LSQ: signed 2^(b-1), 2^(b-1) - 1; unsigned 0, 2^b - 1 (b >= 2 when signed)."""
    if not isinstance(bits, int) or not 1 <= bits <= 16 or (signed and bits < 2):
        raise QreproError(
            f"LSQ bit-width {bits!r} is invalid; use 2..16 for signed (weights) or 1..16 for unsigned (activations)"
        )
    return (2 ** (bits - 1), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """x in the forward pass, g·(incoming gradient) in the backward pass (LSQ)."""
    y = x * g
    return y + (x - y).detach()


def step_grad_scale(n: int, qp: int) -> float:
    """LSQ: g = 1/sqrt(N·Q_P), N = number of weights of the layer, or features of its input per example."""
    return 1.0 / math.sqrt(n * qp)


def lsq_quantize(v: torch.Tensor, s: torch.Tensor, qn: int, qp: int, g: float = 1.0) -> torch.Tensor:
    """LSQ: v^ = round(clip(v/s, -Q_N, Q_P))·s with s's gradient scaled by ``g``.

    Gradients (Eq. 3): dv^/ds = round(v/s) - v/s for -Q_N < v/s < Q_P, -Q_N for v/s <= -Q_N, Q_P for
    v/s >= Q_P (a value on a bound takes the bound's branch, as Eq. 3 writes it); dv^/dv = 1 strictly inside, 0
    otherwise. ``s`` must be positive (it is a step size; the quantizer modules keep it so).
    """
    s = grad_scale(s, g)
    lo, hi = v.new_full((), -float(qn)), v.new_full((), float(qp))
    return round_ste(clip(v / s, lo, hi)) * s


def lsqplus_quantize(
    x: torch.Tensor, s: torch.Tensor, beta: torch.Tensor, qn: int, qp: int, g: float = 1.0
) -> torch.Tensor:
    """LSQ+: x^ = round(clip((x - beta)/s, -Q_N, Q_P))·s + beta, s and beta's gradients scaled by ``g``.

    Gradients: dx^/ds as LSQ's step gradient with (x - beta) for v; dx^/dbeta = 0 strictly inside the range,
    1 on or beyond a bound; dx^/dx = 1 strictly inside, 0 otherwise."""
    s, beta = grad_scale(s, g), grad_scale(beta, g)
    lo, hi = x.new_full((), -float(qn)), x.new_full((), float(qp))
    return round_ste(clip((x - beta) / s, lo, hi)) * s + beta


@torch.no_grad()
def lsq_init_step(v: torch.Tensor, qp: int) -> torch.Tensor:
    """LSQ: s = 2<|v|>/sqrt(Q_P), over the initial weights or the first batch of activations."""
    return 2.0 * v.detach().abs().mean() / math.sqrt(qp)


@torch.no_grad()
def lsqplus_weight_init(w: torch.Tensor, bits: int) -> torch.Tensor:
    """LSQ+: s = max(|mu - 3 sigma|, |mu + 3 sigma|) / 2^(b-1) (mu, sigma of the layer's weights)."""
    w = w.detach()
    mu, sigma = w.mean(), w.std()
    return torch.maximum((mu - 3 * sigma).abs(), (mu + 3 * sigma).abs()) / 2 ** (bits - 1)


@torch.no_grad()
def lsqplus_act_init_minmax(x: torch.Tensor, qn: int, qp: int) -> tuple[torch.Tensor, torch.Tensor]:
    """LSQ+ min-max: s = (max(x) - min(x)) / (Q_P + Q_N), beta = min(x) + Q_N·s (so [min, max] maps onto the
    grid [-Q_N, Q_P]). A constant batch gets a tiny positive step."""
    lo, hi = x.detach().amin(), x.detach().amax()
    s = ((hi - lo) / (qp + qn)).clamp_min(torch.finfo(x.dtype).tiny)
    return s, lo + qn * s


@torch.no_grad()
def lsqplus_act_init_mse(
    x: torch.Tensor, qn: int, qp: int, grid: int = 100, max_elems: int = 1 << 16
) -> tuple[torch.Tensor, torch.Tensor]:
    """LSQ+ MSE initialisation: the (s, beta) minimising ||x^ - x||^2 on ``x``.

    Searched over clipping ranges [lo, hi] with hi = max(x)·i/grid (i = 1..grid) and lo = min(x)·j/(grid/10)
    (j = 0..grid/10; only lo = min(x) when min(x) >= 0), s = (hi - lo)/(Q_P + Q_N), beta = lo + Q_N·s; at most
    ``max_elems`` values of ``x`` (a strided subsample) enter the error. Ties keep the widest range.
    """
    flat = x.detach().reshape(-1)
    v = flat[:: max(1, math.ceil(flat.numel() / max_elems))]
    mn, mx = v.amin(), v.amax()
    if not bool(mx > mn):
        return lsqplus_act_init_minmax(x, qn, qp)
    his = torch.linspace(1.0 / grid, 1.0, grid, dtype=v.dtype, device=v.device)
    his = mn + (mx - mn) * his if bool(mn >= 0) else mx * his
    nlo = max(grid // 10, 1)
    los = mn * torch.linspace(0.0, 1.0, nlo + 1, dtype=v.dtype, device=v.device) if bool(mn < 0) else mn.reshape(1)
    lo, hi = torch.meshgrid(los, his, indexing="ij")
    lo, hi = lo.reshape(-1, 1), hi.reshape(-1, 1)
    ok = (hi > lo).reshape(-1)
    lo, hi = lo[ok], hi[ok]
    s = (hi - lo) / (qp + qn)
    beta = lo + qn * s
    err = torch.empty(len(s), dtype=v.dtype, device=v.device)
    for i in range(0, len(s), 16):  # chunks keep the memory at 16 x max_elems
        sl = slice(i, i + 16)
        q = torch.clamp(torch.round((v - beta[sl]) / s[sl]), -qn, qp) * s[sl] + beta[sl]
        err[sl] = (q - v).square().sum(dim=1)
    best = int(torch.nonzero(err <= err.min()).reshape(-1)[-1])
    return s[best, 0], beta[best, 0]
