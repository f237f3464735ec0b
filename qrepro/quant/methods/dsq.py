"""DSQ (Gong et al., "Differentiable Soft Quantization: Bridging Full-Precision and Low-Bit Neural Networks",
ICCV 2019): a tanh soft staircase over a learned clipping range [l, u] whose sharpness, the characteristic
variable alpha, is learned too and evolves toward the hard staircase. See docs/dsq.md; maths in
``qrepro.quant.dsq``.

- every conv/linear except the first conv and the last FC (full precision): weights per layer, layer input per
  layer, each with its own (l, u, alpha);
- forward: the soft staircase Q_S in training (paper Fig. 1; ``train_forward=hard`` gives the hard values with
  Q_S's gradient), the hard staircase (sign of phi) in evaluation;
- alpha starts at ``alpha_init`` (0.2) and is learned; the ``DSQAlpha`` hook projects it into
  ``[alpha_min, alpha_max]`` after every step (alpha must stay in (0, 1) for k > 0) and records its mean per epoch;
- weight range starts at [-max|w|, max|w|] from the weights training starts from (``DSQInit`` hook, once),
  activation range at [0, act_init].
"""

from __future__ import annotations

import torch
from torch import nn

from qrepro.errors import QreproError
from qrepro.hooks import Hook
from qrepro.quant import dsq
from qrepro.quant.layers import quantized_layers
from qrepro.quant.methods import FP_BITS, METHODS, LayerInfo, Method, builder_options, check_bits, check_choice

SUPPORTED_BITS = (1, 2, 3, 4, 5, 6, 7, 8, FP_BITS)


class DSQQuantizer(nn.Module):
    """Q_S on [lower, upper] with characteristic alpha; one per layer for weights or for the layer input."""

    param_tags = {"lower": "clip", "upper": "clip", "alpha": "dsq_alpha"}

    def __init__(
        self, bits: int, *, lower: float, upper: float, alpha: float = 0.2, train_forward: str = "soft"
    ) -> None:
        super().__init__()
        self.bits, self.train_forward = bits, train_forward
        self.lower = nn.Parameter(torch.tensor(float(lower)))
        self.upper = nn.Parameter(torch.tensor(float(upper)))
        self.alpha = nn.Parameter(torch.tensor(float(alpha)))
        self.register_buffer("initialized", torch.tensor(0.0))  # weights: 1 once the range was set from them

    @torch.no_grad()
    def init_range(self, w: torch.Tensor) -> None:
        m = max(float(w.detach().abs().max()), 1e-8)
        self.lower.fill_(-m)
        self.upper.fill_(m)
        self.initialized.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.train_forward == "soft":
            return dsq.soft_quantize(x, self.lower, self.upper, self.alpha, self.bits)
        return dsq.hard_quantize(x, self.lower, self.upper, self.alpha, self.bits)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, train_forward={self.train_forward}"


class DSQInit(Hook):
    """At the start of training: each weight quantizer's range from its weights (once)."""

    def on_train_start(self, ctx) -> None:
        for _, layer in quantized_layers(ctx.model):
            if isinstance(layer.wq, DSQQuantizer) and float(layer.wq.initialized) == 0.0:
                layer.wq.init_range(layer.weight)


class DSQAlpha(Hook):
    """After every step alpha is projected into [alpha_min, alpha_max]; per epoch its mean goes to the record."""

    def __init__(self, alpha_min: float, alpha_max: float) -> None:
        self.alpha_min, self.alpha_max = alpha_min, alpha_max

    def _quantizers(self, model: nn.Module):
        for _, layer in quantized_layers(model):
            for q in (layer.wq, layer.aq):
                if isinstance(q, DSQQuantizer):
                    yield q

    def on_step_end(self, ctx, step: int) -> None:
        with torch.no_grad():
            for q in self._quantizers(ctx.model):
                q.alpha.clamp_(self.alpha_min, self.alpha_max)

    def on_epoch_end(self, ctx, epoch: int) -> dict[str, float]:
        alphas = [float(q.alpha.detach()) for q in self._quantizers(ctx.model)]
        return {"dsq_alpha_mean": sum(alphas) / len(alphas)} if alphas else {}


@METHODS.register("dsq")
def build_dsq(
    w_bits: int,
    a_bits: int,
    *,
    first_last: str = "fp",
    alpha_init: float = 0.2,
    alpha_min: float = 1e-3,
    alpha_max: float = 0.5,
    act_init: float = 4.0,
    train_forward: str = "soft",
) -> Method:
    """DSQ. first_last: fp | same. alpha_init / alpha_min / alpha_max: the characteristic variable's start and
    bounds (0 < alpha_min <= alpha_init <= alpha_max < 1). act_init: initial activation range [0, act_init].
    train_forward: soft (Q_S in training, paper) | hard (hard values, Q_S gradient)."""
    options = builder_options(locals())
    check_bits("dsq", w_bits, a_bits, SUPPORTED_BITS)
    check_choice("first_last", first_last, ("fp", "same"), "dsq")
    check_choice("train_forward", train_forward, ("soft", "hard"), "dsq")
    if not 0 < alpha_min <= alpha_init <= alpha_max < 1:
        raise QreproError(
            f"quantizer alpha bounds must satisfy 0 < alpha_min <= alpha_init <= alpha_max < 1 "
            f"(got {alpha_min}, {alpha_init}, {alpha_max}; paper: alpha_init 0.2)"
        )
    if not act_init > 0:
        raise QreproError(f"quantizer.act_init={act_init} must be > 0 (the initial activation range [0, act_init])")

    def quantize_layer(info: LayerInfo) -> tuple[nn.Module | None, nn.Module | None] | None:
        if info.role in ("first", "last") and first_last == "fp":
            return None
        wq = aq = None
        if w_bits != FP_BITS:
            wq = DSQQuantizer(w_bits, lower=-1.0, upper=1.0, alpha=alpha_init, train_forward=train_forward)
        if a_bits != FP_BITS:
            aq = DSQQuantizer(a_bits, lower=0.0, upper=act_init, alpha=alpha_init, train_forward=train_forward)
            aq.initialized.fill_(1.0)
        return wq, aq

    hooks = [DSQInit(), DSQAlpha(alpha_min, alpha_max)]
    return Method(name="dsq", quantize_layer=quantize_layer, hooks=hooks, options=options)
