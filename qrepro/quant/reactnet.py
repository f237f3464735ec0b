"""Binarization of ReActNet / Bi-Real Net (Liu et al., "ReActNet", ECCV 2020; Liu et al., "Bi-Real Net", ECCV 2018).

Activations (Bi-Real Net Eq. 5–6, used by ReActNet's RSign): forward ``sign(x)``; backward the derivative of the
piecewise polynomial approximation

    F(x) = −1 (x < −1),   x² + 2x (−1 ≤ x < 0),   −x² + 2x (0 ≤ x < 1),   1 (x ≥ 1)
    ∂F/∂x = 2 + 2x on [−1, 0),   2 − 2x on [0, 1),   0 elsewhere.

Weights (ReActNet's ``HardBinaryConv``): forward ``α_o · sign(W_o)`` with the per-output-channel scale
``α_o = mean |W_o|`` (a constant: no gradient flows through it); backward the clipped straight-through estimator
``∂/∂W = 1[−1 < W < 1]`` (the gradient of ``torch.clamp(W, −1, 1)``, 0 on the bounds; it is not multiplied by α).

``sign`` is torch's (sign(0) = 0), as in the authors' code. Both are written as ``f + (sign-value − f).detach()``,
so they compile and need no custom autograd function. The wrong readings used as controls and ablations:
``act_grad="ste"`` (the clipped identity of BNNs, ∂/∂x = 1[|x| < 1]) and ``weight_scale="tensor"`` (one mean |W|
for the whole tensor) or ``"none"`` (plain ±1).
"""

from __future__ import annotations

import torch

from qrepro.errors import QreproError
from qrepro.quant.ste import SavesInputs, clip, value_ste

ACT_GRADS = ("approx", "ste")
WEIGHT_SCALES = ("channel", "tensor", "none")


def approx_sign_surrogate(x: torch.Tensor) -> torch.Tensor:
    """F(x): the piecewise polynomial whose derivative is the backward pass of the binary activation."""
    one = torch.ones_like(x)
    return torch.where(x < -1, -one, torch.where(x < 0, x * x + 2 * x, torch.where(x < 1, -x * x + 2 * x, one)))


class _ApproxSign(SavesInputs):
    """sign(x) forward; backward ∂F/∂x = 1[|x| < 1] (2 − 2|x|) (= 2 + 2x on [−1, 0), 2 − 2x on [0, 1), 0 elsewhere).

    The same values and gradients as ``F + (sign(x) − F).detach()`` with the ``where`` form of F, but the backward
    pass is rebuilt from the saved float input: the ``where`` form makes a compiled step store three boolean masks
    of the activation's size for the backward pass, which Inductor's CPU code writes slowly (docs/speed.md)."""

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return torch.sign(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        a = x.abs()
        inside = torch.sign(1 - a).clamp(min=0)  # 1[|x| < 1] as a 0/1 float (see qrepro.quant.ste)
        t = g * a
        # (2g - g|x|) - g|x|: the where form's autograd sums its terms in this order (g x + (g x + 2 g) on
        # [-1, 0)), so the gradient is the same to the last bit
        return inside * ((2 * g - t) - t)


def binary_activation(x: torch.Tensor, grad: str = "approx") -> torch.Tensor:
    """sign(x) forward; backward ∂F/∂x (``approx``, Bi-Real/ReActNet) or 1[|x| < 1] (``ste``)."""
    if grad == "approx":
        return _ApproxSign.apply(x)
    if grad != "ste":
        raise QreproError(f"binary activation gradient {grad!r} is not valid; choose one of {', '.join(ACT_GRADS)}")
    return value_ste(_clamp_unit(x), torch.sign(x))


def weight_scale(w: torch.Tensor, mode: str = "channel") -> torch.Tensor:
    """α: mean |W| per output channel (``channel``, shape (C_out, 1, ...)), over the whole tensor (``tensor``)
    or 1 (``none``); detached."""
    with torch.no_grad():
        if mode == "channel":
            return w.abs().mean(dim=tuple(range(1, w.dim())), keepdim=True)
        if mode == "tensor":
            return w.abs().mean()
        if mode == "none":
            return torch.ones((), dtype=w.dtype, device=w.device)
    raise QreproError(f"binary weight scale {mode!r} is not valid; choose one of {', '.join(WEIGHT_SCALES)}")


def binarize_weight(w: torch.Tensor, scale: str = "channel") -> torch.Tensor:
    """α·sign(W) forward, gradient of clamp(W, −1, 1) backward (ReActNet's ``HardBinaryConv``)."""
    return value_ste(_clamp_unit(w), weight_scale(w, scale) * torch.sign(w))


def _clamp_unit(x: torch.Tensor) -> torch.Tensor:
    """``torch.clamp(x, -1, 1)`` in value and gradient (1[-1 < x < 1], 0 on the bounds), through ``ste.clip``,
    which rebuilds the mask in the backward pass instead of a compiled step saving it as a boolean tensor."""
    one = torch.ones((), dtype=x.dtype, device=x.device)
    return clip(x, -one, one)
