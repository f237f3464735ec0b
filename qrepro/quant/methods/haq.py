"""``quantizer=haq``: HAQ ("HAQ: Hardware-Aware Automated Quantization with Mixed Precision", CVPR 2019): per-layer
bit-widths from a policy the authors published (``qrepro.quant.haq_policies``; the reinforcement-learning search is
not part of it), or null for uniform bit-widths, applied with the authors' quantizers; see docs/haq.md.

- ``linear`` policies (latency/energy rows): HAQ's linear quantizer (maths: ``qrepro.quant.kmeans``) with per-layer
  [w_bits, a_bits] (a_bits -1: input unquantized); ranges calibrated once on one full-precision training-mode
  forward of the first batch (:class:`HAQCalibration`, as the authors' ``calibrate``, BatchNorm statistics moved
  too); an input with a negative value in that batch is quantized two-sided (the authors' ``half_wave=False``).
- ``kmeans`` policies (model-size rows, weight-only): :class:`qrepro.quant.methods.dc.KMeansWeightQuantizer` with
  per-layer bits, k-means++ and the mean centroid gradient as the authors' code.
- ``policy: null``: the linear quantizer at the precision's bits, the first layer's weights at ``first_w_bits``
  and its input unquantized, as in the published policy.

A policy must have one entry per Conv2d/Linear of the model it names.
"""

from __future__ import annotations

import torch
from torch import nn

from qrepro.errors import QreproError
from qrepro.hooks import Context, Hook
from qrepro.quant import kmeans as km
from qrepro.quant.haq_policies import POLICIES, policy_names
from qrepro.quant.layers import calibration_forward, quantized_layers
from qrepro.quant.methods import FP_BITS, METHODS, BitsQuantizer, LayerInfo, Method, builder_options, check_bits
from qrepro.quant.methods.dc import KMeansInit, KMeansWeightQuantizer

SUPPORTED_BITS = (2, 3, 4, 5, 6, 7, 8, FP_BITS)


class HAQWeightQuantizer(BitsQuantizer):
    """round(clip(w, -t, t)/s)·s, s = t/(2^(b-1) - 1); t (buffer ``threshold``) set once by calibration."""

    def __init__(self, bits: int) -> None:
        if not 2 <= bits <= 16:
            raise QreproError(f"HAQ linear weight quantization needs 2..16 bits, got {bits}")
        super().__init__(bits)
        self.register_buffer("threshold", torch.ones(()))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def bind(self, layer: nn.Module) -> None:
        self.to(dtype=layer.weight.dtype, device=layer.weight.device)  # type: ignore[attr-defined]

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return km.linear_weight(w, self.threshold, self.bits)

    @torch.no_grad()
    def calibrate(self, w: torch.Tensor) -> None:
        self.threshold.fill_(km.weight_threshold(w, self.bits))
        self.initialized.fill_(True)


class HAQActQuantizer(BitsQuantizer):
    """HAQ's activation quantizer with a trainable range ``alpha`` (tag ``act_clip``); ``signed`` and ``levels``
    are buffers set by calibration (so a checkpoint keeps them)."""

    param_tags = {"alpha": "act_clip"}

    def __init__(self, bits: int, init_range: float = km.ACT_INIT_RANGE) -> None:
        if not 2 <= bits <= 16:
            raise QreproError(f"HAQ activation quantization needs 2..16 bits, got {bits}")
        super().__init__(bits)
        self.init_range = init_range
        self.alpha = nn.Parameter(torch.tensor(float(init_range)))
        self.register_buffer("signed", torch.zeros(()))
        self.register_buffer("levels", torch.tensor(2.0**bits - 1))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def bind(self, layer: nn.Module) -> None:
        self.to(dtype=layer.weight.dtype, device=layer.weight.device)  # type: ignore[attr-defined]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.float16, torch.bfloat16):
            return km.linear_act(x.float(), self.alpha.float(), self.levels, self.signed).to(x.dtype)
        return km.linear_act(x, self.alpha, self.levels, self.signed)

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor) -> None:
        signed = bool(x.min() < 0)
        eff = self.bits - 1 if signed else self.bits
        self.signed.fill_(float(signed))
        self.levels.fill_(2.0**eff - 1)
        self.alpha.fill_(km.act_range(x, eff, self.init_range))
        self.initialized.fill_(True)


class HAQCalibration(Hook):
    """Calibrate the HAQ quantizers not yet initialised, on ``ctx.sample_batch`` (training start)."""

    def on_train_start(self, ctx: Context) -> None:
        calibrate_model(ctx.model, None if ctx.sample_batch is None else ctx.sample_batch[0])


@torch.no_grad()
def calibrate_model(model: nn.Module, x: torch.Tensor | None) -> int:
    """Weight thresholds from the weights; activation ranges from one forward of ``x`` with every quantizer of
    the model switched off (a full-precision forward in training mode, as the authors'; it updates the BatchNorm
    running statistics as theirs does). Returns the number of quantizers calibrated."""
    layers = [layer for _, layer in quantized_layers(model)]
    weights = [lay for lay in layers if isinstance(lay.wq, HAQWeightQuantizer) and not bool(lay.wq.initialized)]
    for layer in weights:
        layer.wq.calibrate(layer.weight)
    todo = [layer for layer in layers if isinstance(layer.aq, HAQActQuantizer) and not bool(layer.aq.initialized)]
    if not todo:
        return len(weights)
    if x is None:
        raise QreproError("HAQ activation calibration needs a sample batch (the first training batch)")
    saved = [(layer, layer.wq, layer.aq) for layer in layers]
    inputs: dict[nn.Module, torch.Tensor] = {}

    def pre_hook(mod: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        inputs[mod] = args[0].detach()

    try:
        for layer, _, _ in saved:
            layer.wq, layer.aq = None, None
        # training mode as the authors' (BatchNorm batch statistics), whose moved running statistics are kept
        calibration_forward(model, x, todo, pre_hook, restore=lambda k: False)
    finally:
        for layer, wq, aq in saved:
            layer.wq, layer.aq = wq, aq
    for layer in todo:
        layer.aq.calibrate(inputs[layer])
    return len(weights) + len(todo)


@METHODS.register("haq")
def build_haq(
    w_bits: int,
    a_bits: int,
    *,
    policy: str | None = None,
    first_w_bits: int = 8,
    kmeans_init: str = "kmeans++",
    centroid_grad: str = "mean",
    kmeans_max_iter: int = 50,
    seed: int = 0,
) -> Method:
    """HAQ with a published ``policy`` (per-layer bits; the precision's bits are then not used) or uniform bits."""
    options = builder_options(locals())
    if policy is not None and policy not in POLICIES:
        raise QreproError(f"unknown HAQ policy {policy!r}; published policies: {', '.join(policy_names())}")
    pol = None if policy is None else POLICIES[policy]
    if pol is None:
        check_bits("haq", w_bits, a_bits, SUPPORTED_BITS)
        if not 2 <= first_w_bits <= 16:
            raise QreproError(f"quantizer.first_w_bits={first_w_bits} must be in 2..16 (HAQ: 8)")
    kind = "linear" if pol is None else pol["kind"]
    if kind == "kmeans":  # validates the k-means options once
        KMeansWeightQuantizer(2, kmeans_init, centroid_grad, kmeans_max_iter, seed=seed)
    n_layers = None if pol is None else len(pol["bits"])

    def quantize_layer(info: LayerInfo) -> tuple[nn.Module | None, nn.Module | None] | None:
        if pol is None:
            wb, ab = (first_w_bits, FP_BITS) if info.role == "first" else (info.w_bits, info.a_bits)
        else:
            if info.index >= n_layers or (info.role == "last" and info.index != n_layers - 1):
                n = info.index + 1 if info.role == "last" else f"more than {n_layers}"
                raise QreproError(
                    f"HAQ policy {policy!r} has {n_layers} layers but the model has {n} Conv2d/Linear layers; "
                    f"the policy is published for model={pol['model']}"
                )
            entry = pol["bits"][info.index]  # k-means: the weight bits; linear: [w_bits, a_bits], -1 = unquantized
            if kind == "kmeans":
                return KMeansWeightQuantizer(int(entry), kmeans_init, centroid_grad, kmeans_max_iter, seed=seed), None
            wb, ab = (FP_BITS if int(b) < 0 else int(b) for b in entry)
        wq = None if wb == FP_BITS else HAQWeightQuantizer(wb)
        aq = None if ab == FP_BITS else HAQActQuantizer(ab)
        return wq, aq

    hooks: list[Hook] = [KMeansInit()] if kind == "kmeans" else [HAQCalibration()]
    return Method(name="haq", quantize_layer=quantize_layer, hooks=hooks, options=options)
