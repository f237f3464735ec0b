"""SAT: scale-adjusted training and calibrated-gradient PACT (Towards Efficient Training for Neural Network
Quantization, and its BMVC supplement).

Functional maths only (weights Eq. 5-10 and S23, activations Eq. 11-13); the quantizer modules and the per-layer
policy live in ``qrepro.quant.methods.sat``, the method in docs/sat.md.

Every rounding uses the straight-through estimator on the rounding only (``x + (round(x) - x).detach()``),
so all other operations (tanh, the max normalisation, the divide and multiply by alpha) stay in autograd.
"""

from __future__ import annotations

import math

import torch

from qrepro.errors import QreproError
from qrepro.quant.ste import clip, round_ste, value_ste

WEIGHT_SCHEMES = ("original", "modified", "centered")
VARIANCES = ("sample", "mean_square")
FP_BITS = 32


def _check_bits(bits: int, what: str) -> None:
    if bits != FP_BITS and not (isinstance(bits, int) and 1 <= bits <= 16):
        raise QreproError(f"{what} bit-width {bits!r} is invalid; use an integer in 1..16 or 32 (= not quantized)")


def clamp_weight(w: torch.Tensor) -> torch.Tensor:
    """Eq. (5)-(6): W^ = tanh(W) / max|tanh(W)| (per tensor, the max is *not* detached), in [-1, 1]."""
    t = torch.tanh(w)
    return t / t.abs().amax()


def quantize_k(r: torch.Tensor, k: int) -> torch.Tensor:
    """DoReFa's quantize_k: round((2^k - 1)·r)/(2^k - 1) for r in [0, 1], identity gradient."""
    n = float(2**k - 1)
    return round_ste(r * n) / n


def quantize_unit(u: torch.Tensor, bits: int, scheme: str = "original") -> torch.Tensor:
    """Quantize u in [0, 1] to ``bits`` with one of SAT's weight level schemes; identity gradient.

    - ``original`` (paper, DoReFa, Eq. 8): q = round((2^b - 1) u) / (2^b - 1), levels {0, 1/a, ..., 1}.
    - ``modified`` (authors' code default): q = min(floor(2^b u), 2^b - 1) / 2^b, levels {0, ..., 1 - 2^-b}.
    - ``centered`` (authors' code, later): q = (min(floor(2^b u), 2^b - 1) + 0.5) / 2^b.

    The whole integer mapping (round, or floor + min) is the "rounding" that the STE bypasses, so
    dq/du = 1 everywhere (also at u = 1, where the min would otherwise block the gradient).
    """
    if scheme not in WEIGHT_SCHEMES:
        raise QreproError(f"unknown SAT weight scheme {scheme!r}; choose one of: {', '.join(WEIGHT_SCHEMES)}")
    _check_bits(bits, "weight")
    if bits == FP_BITS:
        return u
    if scheme == "original":
        return quantize_k(u, bits)
    n = float(2**bits)
    k = value_ste(u * n, torch.clamp(torch.floor(u * n), max=n - 1))
    if scheme == "centered":
        k = k + 0.5
    return k / n


def dorefa_weight(w: torch.Tensor, bits: int, scheme: str = "original") -> torch.Tensor:
    """Effective weight of SAT / DoReFa (Eq. 5, 8, 9): Q = 2 q_k((W^ + 1)/2) - 1 with W^ = clamp_weight(W).

    ``bits=32`` returns the clamped weight W^ (Eq. 6) without rounding. Schemes: see ``quantize_unit``;
    Q = 2q - 1 is applied the same way for every scheme (``modified`` is therefore asymmetric, in
    [-1, 1 - 2^(1-b)], ``centered`` symmetric in [-1 + 2^-b, 1 - 2^-b]).
    """
    wc = clamp_weight(w)
    if bits == FP_BITS:
        return wc
    u = (wc + 1.0) / 2.0
    return 2.0 * quantize_unit(u, bits, scheme) - 1.0


def mean_square(x: torch.Tensor) -> torch.Tensor:
    """The paper's 'sample variance ... calculated by averaging the square of elements' (Eq. 7, 10, S23)."""
    return x.square().mean()


def weight_var(x: torch.Tensor, variance: str = "mean_square") -> torch.Tensor:
    """VAR[x] of the rescaling equations (10) and (S23) over all elements of a weight tensor.

    - ``mean_square``: mean(x^2), as the paper's text defines it;
    - ``sample``: the unbiased sample variance sum((x - mean(x))^2) / (N - 1), i.e. ``torch.std(x)**2`` as the
      authors' code computes it. The two differ where mean(x) != 0: ~0.1 % for the symmetric ``original``
      levels, ~9 % at 2 bits for the asymmetric ``modified`` levels.
    """
    if variance == "mean_square":
        return mean_square(x)
    if variance == "sample":
        return x.var()
    raise QreproError(f"unknown SAT variance {variance!r}; choose one of: {', '.join(VARIANCES)}")


def out_neurons(w: torch.Tensor) -> int:
    """Number of output neurons of a layer: C_out * k_h * k_w for a conv, out_features for a linear."""
    return math.prod(w.shape[:1] + w.shape[2:])


def sat_rescale(q: torch.Tensor, n_out: int, variance: str = "mean_square") -> torch.Tensor:
    """Constant rescaling, Eq. (10): Q* = Q / sqrt(n_out * VAR[Q]); VAR is treated as a constant (detached).

    With the paper's VAR (``variance="mean_square"``) mean(Q*^2) = 1 / n_out exactly; with the authors'
    ``variance="sample"`` the unbiased variance of Q* is 1 / n_out.
    """
    return q * sat_rescale_factor(q, n_out, variance)


def sat_rescale_factor(q: torch.Tensor, n_out: int, variance: str = "mean_square") -> torch.Tensor:
    """The (detached, positive) factor 1 / sqrt(n_out VAR[Q]) of Eq. (10)."""
    return torch.rsqrt(n_out * weight_var(q.detach(), variance))


def std_rescale_factor(q: torch.Tensor, w: torch.Tensor, variance: str = "mean_square") -> torch.Tensor:
    """The (detached, positive) factor sqrt(VAR[W] / VAR[Q]) of Eq. (S23)."""
    return torch.sqrt(weight_var(w.detach(), variance) / weight_var(q.detach(), variance))


def std_rescale(q: torch.Tensor, w: torch.Tensor, variance: str = "mean_square") -> torch.Tensor:
    """Rescaling with the standard deviation of the original weights, Eq. (S23):
    Q* = sqrt(VAR[W] / VAR[Q]) Q, both variances detached like the constant rescaling of Eq. (10)."""
    return q * std_rescale_factor(q, w, variance)


def pact(
    x: torch.Tensor, alpha: torch.Tensor, bits: int, calibrated: bool = True, signed: bool | torch.Tensor = False
) -> torch.Tensor:
    """PACT activation quantization, Eq. (11): clip x to [0, |alpha|] (or [-|alpha|, |alpha|] when signed)
    and quantize q = lo + (|alpha| - lo) q_k((x~ - lo) / (|alpha| - lo)) with a = 2^b - 1 levels steps.

    Unsigned (lo = 0) this is exactly q = alpha q_k(x~ / alpha). Signed (lo = -alpha) it is
    alpha (2 q_k((x~/alpha + 1)/2) - 1): 2^b uniform levels on [-alpha, alpha], the same DoReFa grid as the
    weights (no level at zero). ``signed`` may be a bool or a 0/1 tensor (a buffer), so the choice needs no
    Python branch in the forward pass.

    Gradients:
    - ``calibrated=True`` (CG-PACT, Eq. 13): the divide and multiply by alpha stay in autograd and only the
      rounding is straight-through, giving dq/dalpha = q_k(x~/alpha) - x~/alpha inside the clip range,
      1 above alpha (and -1 below -alpha when signed).
    - ``calibrated=False`` (original PACT): dq/dalpha = 1[x >= alpha] (- 1[x <= -alpha] when signed), i.e. the
      quantization error is ignored.
    dq/dx = 1 inside the range, 0 outside, in both cases.
    """
    _check_bits(bits, "activation")
    a = alpha.abs()
    s = signed.to(a.dtype) if isinstance(signed, torch.Tensor) else float(bool(signed))
    lo = -a * s
    # the clip's gradients are exactly 1[x >= alpha] / 1[x <= lo] (no tie splitting as with clamp / minimum);
    # ste.clip recomputes the masks in the backward pass instead of saving them (docs/speed.md section 3)
    xc = clip(x, lo, a)
    if bits == FP_BITS:  # clipping only (PACT as an activation function, no rounding)
        return xc
    span = a - lo
    q = lo + span * quantize_k((xc - lo) / span, bits)
    return q if calibrated else value_ste(xc, q)
