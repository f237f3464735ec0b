"""Quantized Conv2d / Linear built by composition: the layer holds a weight fake-quantizer ``wq`` and an
activation (input) fake-quantizer ``aq``; the maths lives in those modules.

The layers keep the FP parameter names (``weight``, ``bias``) so an FP checkpoint loads strictly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Self

import torch
import torch.nn.functional as F
from torch import nn


class _QMixin:
    wq: nn.Module | None
    aq: nn.Module | None

    @classmethod
    def from_float(cls, layer: nn.Module, wq: nn.Module | None, aq: nn.Module | None) -> Self:
        """The quantized layer sharing ``layer``'s parameters, buffers, hooks and hyper-parameters."""
        q = cls.__new__(cls)
        q.__dict__ = layer.__dict__.copy()
        q._parameters = layer._parameters
        q._buffers = layer._buffers
        q._modules = dict(layer._modules)
        q.wq, q.aq = wq, aq  # sub-modules (None allowed), so their parameters are part of the model
        for quantizer in (wq, aq):
            bind = getattr(quantizer, "bind", None)
            if callable(bind):
                bind(q)
        return q

    @staticmethod
    def _fake_quant(q: nn.Module | None, t: torch.Tensor, half_input: bool = False) -> torch.Tensor:
        """``q(t)``; under trainer.amp (or for a half-precision input) the quantizer's arithmetic stays float32."""
        if q is None:
            return t
        if torch.is_autocast_enabled(t.device.type) or (half_input and t.dtype in (torch.float16, torch.bfloat16)):
            with torch.autocast(t.device.type, enabled=False):
                return q(t.float())
        return q(t)

    def effective_weight(self) -> torch.Tensor:
        return self._fake_quant(self.wq, self.weight)  # type: ignore[attr-defined]

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        return self._fake_quant(self.aq, x, half_input=True)

    def effective_bias(self) -> torch.Tensor | None:
        """The bias used with ``effective_weight()``: the weight quantizer may adjust it through an optional
        ``transform_bias(bias, weight)`` (SAT's last FC in eval mode divides it by the rescale factor)."""
        b = self.bias  # type: ignore[attr-defined]
        tb = getattr(self.wq, "transform_bias", None)
        return tb(b, self.weight) if (b is not None and tb is not None) else b  # type: ignore[attr-defined]


class QConv2d(_QMixin, nn.Conv2d):
    """nn.Conv2d whose weight and input pass through the method's fake-quantizers."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.quantize_input(x), self.effective_weight(), self.effective_bias())


class QLinear(_QMixin, nn.Linear):
    """nn.Linear whose weight and input pass through the method's fake-quantizers."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantize_input(x), self.effective_weight(), self.effective_bias())


QUANT_LAYERS = (QConv2d, QLinear)


def quantized_layers(model: nn.Module) -> Iterator[tuple[str, QConv2d | QLinear]]:
    """(name, layer) for every quantized layer of ``model`` in module order."""
    return ((name, m) for name, m in model.named_modules() if isinstance(m, QUANT_LAYERS))


def is_quantizer_param(qualified_name: str) -> bool:
    """True for parameters/buffers owned by a quantizer sub-module (``...wq.*`` / ``...aq.*``)."""
    parts = qualified_name.split(".")
    return "wq" in parts[:-1] or "aq" in parts[:-1]


@torch.no_grad()
def calibration_forward(
    model: nn.Module,
    x: torch.Tensor,
    layers: Sequence[nn.Module],
    pre_hook: Callable[[nn.Module, tuple[torch.Tensor, ...]], None],
    restore: Callable[[str], bool] = lambda name: True,
) -> None:
    """One training-mode forward of ``x`` with ``pre_hook`` on each of ``layers`` (data-dependent initialisation
    of quantizers from the inputs they see, in order), then the model's mode and every buffer whose name passes
    ``restore`` (e.g. BatchNorm statistics, not the quantizers' own state) are put back."""
    saved = {k: v.clone() for k, v in model.named_buffers() if restore(k)}
    was_training = model.training
    handles = [layer.register_forward_pre_hook(pre_hook) for layer in layers]
    try:
        model.train()
        model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
        bufs = dict(model.named_buffers())
        for k, v in saved.items():
            bufs[k].copy_(v)
