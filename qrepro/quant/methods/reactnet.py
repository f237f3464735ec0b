"""``quantizer=reactnet``: binarization of ReActNet / Bi-Real Net (maths: :mod:`qrepro.quant.reactnet`); see
docs/reactnet.md.

Policy: the first and last layers and the shortcut projections (module names with a ``keep_real`` part) stay
real-valued; every other Conv2d/Linear gets :class:`BinaryActivation` on its input at ``a_bits = 1`` (the sign of
RSign; its learnable shift is the model's ``move0``) and :class:`BinaryWeight` at ``w_bits = 1`` (α·sign(W), α =
mean |W| per output channel). ``precision=w32a1`` is ReActNet's step 1, ``w1a1`` its step 2. The binary weights
expose sign(W) (``discrete`` / ``from_discrete``) for the transition-rate optimizers and monitor. ``distill``:
ReActNet's distributional loss against a real-valued teacher as the training loss (``Method.loss``).
"""

from __future__ import annotations

import torch
from torch import nn

from qrepro.errors import QreproError
from qrepro.hooks import Hook
from qrepro.quant import reactnet as F
from qrepro.quant.distill import Distillation
from qrepro.quant.methods import FP_BITS, METHODS, LayerInfo, Method, check_bits
from qrepro.quant.transitions import TRMonitor

SUPPORTED_BITS = (1, FP_BITS)


class BinaryActivation(nn.Module):
    """sign(x) with the piecewise-polynomial gradient (``grad="approx"``) or the clipped STE (``"ste"``)."""

    bits = 1

    def __init__(self, grad: str = "approx") -> None:
        super().__init__()
        if grad not in F.ACT_GRADS:
            raise QreproError(f"quantizer.act_grad={grad!r} is not valid; choose one of {', '.join(F.ACT_GRADS)}")
        self.grad = grad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.binary_activation(x, self.grad)

    def extra_repr(self) -> str:
        return f"grad={self.grad}"


class BinaryWeight(nn.Module):
    """α·sign(W) with the clipped STE; exposes the discrete weights sign(W) ∈ {−1, 0, 1} for TR counting."""

    bits = 1

    def __init__(self, scale: str = "channel") -> None:
        super().__init__()
        if scale not in F.WEIGHT_SCALES:
            raise QreproError(
                f"quantizer.weight_scale={scale!r} is not valid; choose one of {', '.join(F.WEIGHT_SCALES)}"
            )
        self.scale = scale

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return F.binarize_weight(w, self.scale)

    @torch.no_grad()
    def discrete(self, w: torch.Tensor) -> torch.Tensor:
        """sign(W) as int8 (what the transition rate counts)."""
        return torch.sign(w).to(torch.int8)

    def from_discrete(self, wd: torch.Tensor) -> torch.Tensor:
        """The binary levels ±1 of discrete weights (α left out: it is a per-channel constant of the step)."""
        return wd.float()

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


@METHODS.register("reactnet")
def build_reactnet(
    w_bits: int,
    a_bits: int,
    *,
    act_grad: str = "approx",
    weight_scale: str = "channel",
    keep_real: list[str] | tuple[str, ...] = ("downsample",),
    quantize_first_last: bool = False,
    monitor_tr: bool = True,
    monitor_every: int = 100,
    monitor_momentum: float = 0.99,
    distill: dict | None = None,
) -> Method:
    """Binary activations (a_bits = 1) and/or binary weights (w_bits = 1); 32 leaves that operand real."""
    check_bits("reactnet", w_bits, a_bits, SUPPORTED_BITS)
    BinaryActivation(act_grad), BinaryWeight(weight_scale)  # validate the options once, here
    if isinstance(keep_real, str) or not all(isinstance(k, str) for k in keep_real):
        raise QreproError(f"quantizer.keep_real must be a list of module-name parts, got {keep_real!r}")
    keep = set(keep_real)

    def quantize_layer(info: LayerInfo) -> tuple[nn.Module | None, nn.Module | None] | None:
        if info.role in ("first", "last") and not quantize_first_last:
            return None
        if keep & set(info.name.split(".")):
            return None
        wq = BinaryWeight(weight_scale) if w_bits == 1 else None
        aq = BinaryActivation(act_grad) if a_bits == 1 else None
        return wq, aq

    hooks: list[Hook] = []
    loss = None
    if distill is not None:
        if (
            not isinstance(distill, dict)
            or not distill.get("model")
            or set(distill) - {"model", "options", "checkpoint"}
        ):
            raise QreproError(
                f"quantizer.distill must be null or {{model, options, checkpoint}} (the teacher), got {distill!r}"
            )
        loss = Distillation(spec=dict(distill))
        hooks.append(loss)  # builds the teacher at the start of training
    if monitor_tr and w_bits == 1:
        hooks.append(TRMonitor(every=monitor_every, momentum=monitor_momentum))
    options = dict(act_grad=act_grad, weight_scale=weight_scale, keep_real=sorted(keep))
    options.update(quantize_first_last=quantize_first_last, monitor_tr=monitor_tr, distill=distill)
    return Method(name="reactnet", quantize_layer=quantize_layer, hooks=hooks, loss=loss, options=options)
