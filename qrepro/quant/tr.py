"""Quantizer of "Scheduling Weight Transitions for Quantization-Aware Training" (TR scheduling).

Weights (main paper Eq. 13, supplement Eqs. S4–S6), for b >= 2 bits:

    w_n = clip(γ·w / s, α, β),   w_d = round(w_n),   w_q = w_d / γ,
    γ = 2^(b−1),  α = −2^(b−1),  β = 2^(b−1) − 1          (2-bit: α = −2, β = 1, γ = 2).

``w_d`` are the integer *discrete weights* whose changes are the transitions of Eq. (5). As in the authors'
code, ``w_q`` is not multiplied back by ``s`` (the following BatchNorm absorbs the scale), so the level
spacing ``δ = 1/γ`` is constant during training (Sec. S5). Binary weights (b = 1) use the signum function:
``w_n = clip(w/s, −1, 1)``, ``w_d = sign(w_n)`` (sign(0) = +1), ``w_q = w_d`` (γ = 1).

Activations (b >= 2 bits, unsigned): ``x_q = round(clip(x/s_a · 2^b, 0, 2^b − 1)) / 2^b``. Binary activations
(b = 1) follow the authors' code (``custom_modules.QConv.act_quantization``): ``x_q = round(clip(x/s_a, 0, 1))``,
i.e. {0, 1} with the threshold at s_a/2 (the b >= 2 formula would give {0, 1/2} with the threshold at s_a/4).

Scale denominators: ``eps=None`` divides by ``s`` (the paper's formulas); a number divides by ``|s| + eps``, as
the authors' code does with eps = 1e-6 (``quantizer.scale_eps``). Division comes first and the power-of-two
factor after (exact), so the values are those of ``(w/s)·γ`` to the last bit.

Gradients: the straight-through estimator on the rounding/signum only; ``clip`` keeps its true gradient,
so ∂w_q/∂w = 1/s and ∂w_q/∂s = −w/s² inside the clipping range and 0 outside (likewise for activations;
with ``eps`` the denominator is ``|s| + eps`` and ∂/∂s carries sign(s)).
"""

from __future__ import annotations

import math

import torch

from qrepro.errors import QreproError
from qrepro.quant.ste import round_ste, sign_ste

# 3·std(x)/sqrt(1 − 2/π): std of a half-normal |z| is σ·sqrt(1 − 2/π), so this is 3σ of the Gaussian
# whose rectified version the layer input is.
HALF_NORMAL_STD = math.sqrt(1.0 - 2.0 / math.pi)


def weight_constants(bits: int) -> tuple[float, float, float]:
    """(α, β, γ) of Eq. (13) for ``bits``-bit weights; binary weights (b = 1) return (−1, 1, 1)."""
    if not 1 <= bits <= 8:
        raise QreproError(f"TR weight quantizer supports 1..8 bits, got {bits}; choose e.g. precision=w2a2")
    if bits == 1:
        return -1.0, 1.0, 1.0
    g = float(2 ** (bits - 1))
    return -g, g - 1.0, g


def scale_denominator(scale: torch.Tensor, eps: float | None = None) -> torch.Tensor:
    """The divisor of the quantizers: ``s`` (eps None, paper) or ``|s| + eps`` (authors' code: eps = 1e-6)."""
    return scale if eps is None else torch.abs(scale) + eps


def normalize_weight(w: torch.Tensor, scale: torch.Tensor, bits: int, eps: float | None = None) -> torch.Tensor:
    """w_n = clip(γ·w/s, α, β) (Eq. S4); for binary weights clip(w/s, −1, 1)."""
    alpha, beta, gamma = weight_constants(bits)
    return torch.clamp(w / scale_denominator(scale, eps) * gamma, alpha, beta)


def discrete_weight(w: torch.Tensor, scale: torch.Tensor, bits: int, eps: float | None = None) -> torch.Tensor:
    """Integer discrete weights w_d = round(w_n) (Eq. S5), sign(w_n) for binary (sign(0) = +1); no gradient."""
    with torch.no_grad():
        wn = normalize_weight(w, scale, bits, eps)
        return torch.where(wn >= 0, 1.0, -1.0).to(wn.dtype) if bits == 1 else torch.round(wn)


def quantize_weight(w: torch.Tensor, scale: torch.Tensor, bits: int, eps: float | None = None) -> torch.Tensor:
    """Fake-quantized weights w_q = w_d/γ (Eqs. S4–S6) with the STE on the rounding (sign for b = 1)."""
    _, _, gamma = weight_constants(bits)
    wn = normalize_weight(w, scale, bits, eps)
    wd = sign_ste(wn) if bits == 1 else round_ste(wn)
    return wd / gamma


def level_spacing(bits: int) -> float:
    """δ: distance between adjacent quantized weight levels (1/γ; 2 for binary ±1)."""
    return 2.0 if bits == 1 else 1.0 / weight_constants(bits)[2]


def quantize_activation(x: torch.Tensor, scale: torch.Tensor, bits: int, eps: float | None = None) -> torch.Tensor:
    """x_q = round(clip(x/s_a·2^b, 0, 2^b − 1))/2^b for b >= 2, round(clip(x/s_a, 0, 1)) for b = 1 (authors'
    code: {0, 1}, threshold s_a/2), with the STE on the rounding."""
    if not 1 <= bits <= 8:
        raise QreproError(f"TR activation quantizer supports 1..8 bits, got {bits}; choose e.g. precision=w2a2")
    u = x / scale_denominator(scale, eps)
    if bits == 1:
        return round_ste(torch.clamp(u, 0.0, 1.0))
    n = float(2**bits)
    return round_ste(torch.clamp(u * n, 0.0, n - 1.0)) / n


def init_weight_scale(w: torch.Tensor) -> torch.Tensor:
    """Initial weight scale s = 3·std(w) (the authors' initialisation)."""
    return 3.0 * w.detach().double().std().to(w.dtype)


def init_activation_scale(x: torch.Tensor) -> torch.Tensor:
    """Initial activation scale s_a = 3·std(x)/sqrt(1 − 2/π) on the first batch (the authors' code)."""
    return (3.0 * x.detach().double().std() / HALF_NORMAL_STD).to(x.dtype)
