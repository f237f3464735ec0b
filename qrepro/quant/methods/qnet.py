"""QNet (Yang et al., "Quantization Networks", CVPR 2019): quantization as a sum of sigmoid steps whose
temperature rises during training, with learned input and output scales. Maths: ``qrepro.quant.qnet``; policy and
our choices: docs/qnet.md.

Every conv/linear but the first conv and the last FC gets a weight quantizer (targets in [-1, 1]) and an input
quantizer (targets in [0, 1]): the soft function in training, the hard steps in evaluation. Temperature
``T_e = t_start + t_step * e`` (:class:`QNetTemperature`); weight scales from the weights (:class:`QNetInit`, once).
"""

from __future__ import annotations

import torch
from torch import nn

from qrepro.errors import QreproError
from qrepro.hooks import Hook
from qrepro.quant import qnet as qn
from qrepro.quant.layers import quantized_layers
from qrepro.quant.methods import FP_BITS, METHODS, LayerInfo, Method, builder_options, check_bits, check_choice

SUPPORTED_BITS = (1, 2, 3, 4, FP_BITS)


class QNetQuantizer(nn.Module):
    param_tags = {"alpha": "qnet_scale", "beta": "qnet_scale"}

    def __init__(self, bits: int, signed: bool, *, scale: float = 1.0, temperature: float = 1.0) -> None:
        super().__init__()
        self.bits, self.signed = bits, signed
        h, b, o = qn.steps(bits, signed)
        self.offset = o
        self.register_buffer("heights", h.float(), persistent=False)
        self.register_buffer("thresholds", b.float(), persistent=False)
        self.register_buffer("temperature", torch.tensor(float(temperature)))
        self.register_buffer("initialized", torch.tensor(0.0 if signed else 1.0))
        self.alpha = nn.Parameter(torch.tensor(float(scale)))
        self.beta = nn.Parameter(torch.tensor(1.0 / scale))

    @torch.no_grad()
    def init_scales(self, w: torch.Tensor) -> None:
        m = max(float(w.detach().abs().max()), 1e-8)
        self.alpha.fill_(m)
        self.beta.fill_(1.0 / m)
        self.initialized.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, b = self.heights.to(x.dtype), self.thresholds.to(x.dtype)
        if self.training:
            return qn.soft_quantize(x, self.alpha, self.beta, self.temperature.to(x.dtype), h, b, self.offset)
        return qn.hard_quantize(x, self.alpha, self.beta, h, b, self.offset)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self.signed}"


def _quantizers(model: nn.Module):
    for _, layer in quantized_layers(model):
        for q in (layer.wq, layer.aq):
            if isinstance(q, QNetQuantizer):
                yield layer, q


class QNetInit(Hook):
    """Weight scales from the weights training starts from (once per quantizer)."""

    def on_train_start(self, ctx) -> None:
        for layer, q in _quantizers(ctx.model):
            if q is layer.wq and float(q.initialized) == 0.0:
                q.init_scales(layer.weight)


class QNetTemperature(Hook):
    """``T_e = t_start + t_step * e`` for the epoch about to run (e counted from 0)."""

    def __init__(self, t_start: float, t_step: float) -> None:
        self.t_start, self.t_step = t_start, t_step

    def _set(self, model: nn.Module, epoch: int) -> None:
        for _, q in _quantizers(model):
            q.temperature.fill_(self.t_start + self.t_step * epoch)

    def on_train_start(self, ctx) -> None:
        self._set(ctx.model, ctx.epoch)

    def on_epoch_end(self, ctx, epoch: int) -> dict[str, float]:
        self._set(ctx.model, epoch + 1)
        return {"qnet_temperature": self.t_start + self.t_step * epoch}


@METHODS.register("qnet")
def build_qnet(
    w_bits: int,
    a_bits: int,
    *,
    first_last: str = "fp",
    t_start: float = 1.0,
    t_step: float = 1.0,
    act_init: float = 2.0,
) -> Method:
    """QNet. t_start / t_step: temperature schedule T_e = t_start + t_step * e. act_init: activation scale
    (targets [0, act_init] at the start). first_last: fp | same."""
    options = builder_options(locals())
    check_bits("qnet", w_bits, a_bits, SUPPORTED_BITS)
    check_choice("first_last", first_last, ("fp", "same"), "qnet")
    if not (t_start > 0 and t_step >= 0):
        raise QreproError(f"quantizer.t_start={t_start} must be > 0 and t_step={t_step} >= 0")
    if not act_init > 0:
        raise QreproError(f"quantizer.act_init={act_init} must be > 0")

    def quantize_layer(info: LayerInfo) -> tuple[nn.Module | None, nn.Module | None] | None:
        if info.role in ("first", "last") and first_last == "fp":
            return None
        wq = QNetQuantizer(w_bits, True, temperature=t_start) if w_bits != FP_BITS else None
        aq = QNetQuantizer(a_bits, False, scale=act_init, temperature=t_start) if a_bits != FP_BITS else None
        return wq, aq

    hooks = [QNetInit(), QNetTemperature(t_start, t_step)]
    return Method(name="qnet", quantize_layer=quantize_layer, hooks=hooks, options=options)
