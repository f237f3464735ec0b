"""SAWB: statistics-aware weight binning (Choi et al., "Bridging the accuracy gap for 2-bit quantized neural
networks (QNN)", 2018), PACT's weight quantizer in PACT-SAWB.

Functional maths only; the quantizer module lives in ``qrepro.quant.methods.pact_sawb``, the method in docs/pact.md.

The coefficients (c1, c2) of ``sawb_alpha``, fitted per bit-width: 2 bits (3.212, 2.178) are the paper's (3.2, 2.1)
to more digits; 1 bit (0, -1) gives alpha = E|w|, the optimal binary scale; 3-5 bits are the fitted values of the
same family. Each pair puts alpha within a few percent of the MSE-optimal clip of a Gaussian (tests/test_pact_family.py
checks it).
"""

from __future__ import annotations

import torch

from qrepro.errors import QreproError
from qrepro.quant.ste import clip, round_ste

COEFFS: dict[int, tuple[float, float]] = {
    1: (0.0, -1.0),
    2: (3.212, 2.178),
    3: (7.509, 6.892),
    4: (12.68, 12.80),
    5: (17.74, 18.64),
}


def _coeffs(bits: int) -> tuple[float, float]:
    if bits not in COEFFS:
        raise QreproError(f"SAWB has coefficients for {sorted(COEFFS)}-bit weights, not {bits!r}; choose one of those")
    return COEFFS[bits]


@torch.no_grad()
def sawb_alpha(w: torch.Tensor, bits: int) -> torch.Tensor:
    """alpha_w = c1·sqrt(E[w^2]) - c2·E[|w|] from the layer's current weights (per tensor, a statistic: no
    gradient), floored at a tiny positive value."""
    c1, c2 = _coeffs(bits)
    w = w.detach()
    a = c1 * w.square().mean().sqrt() - c2 * w.abs().mean()
    return a.clamp_min(torch.finfo(w.dtype).tiny)


def sawb_quantize(w: torch.Tensor, bits: int, alpha: torch.Tensor | None = None) -> torch.Tensor:
    """w_q = alpha·(2·round(n·u)/n - 1), u = (clip(w, -alpha, alpha) + alpha)/(2·alpha), n = 2^b - 1: 2^b uniform
    levels that include +-alpha ({-alpha, -alpha/3, alpha/3, alpha} at 2 bits: no level at zero), straight-through
    on the rounding, so dw_q/dw = 1 strictly inside (-alpha, alpha) and 0 outside."""
    a = sawb_alpha(w, bits) if alpha is None else alpha.detach()
    n = float(2**bits - 1)
    u = (clip(w, -a, a) + a) / (2 * a)
    return a * (2 * round_ste(u * n) / n - 1)
