"""SAT (scale-adjusted training) + CG-PACT, and the ablation baselines ``pact`` and ``dorefa``.

Papers: Towards Efficient Training for Neural Network Quantization (Eq. 5-13), its BMVC supplement (S2/S3
rescaling variants, S5 first/last bit-widths, S6 rescaling every conv not followed by BN). Maths: ``qrepro.quant.sat``.

The per-layer policy (tanh clamping + DoReFa rounding of every weight, the first and last layers, PACT inputs,
constant rescaling, the last FC's bias in eval mode, CG-PACT, signed inputs) and every option of ``_build``
(``scheme``, ``variance``, ``rescale``, ``rescale_method``, ``cg``, ``first_last``, ``signed_act``, ``alpha_init``,
``alpha_init_last``, ``weight_clamp``, ``diagnostics``): docs/sat.md, sections "Equations → code" and "Switches".
Defaults follow the authors' code; the paper's readings are switches (``scheme: original``,
``variance: mean_square``).

Registered methods (same builder, different defaults):
- ``sat``    rescale=last, cg=true        (Table 1-3, Table 4 "PACT+SAT+CG")
- ``pact``   rescale=none, cg=false       (Table 4 "PACT"; switches give "PACT+SAT" and "PACT+CG")
- ``dorefa`` rescale=none, cg=true        (clamped weights without rescaling: Fig. 2b "clamping" curve at w32)
"""

from __future__ import annotations

import fnmatch
import functools
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from qrepro.errors import QreproError
from qrepro.hooks import Context, Hook
from qrepro.quant import sat as satf
from qrepro.quant.layers import QConv2d, QLinear, quantized_layers
from qrepro.quant.methods import METHODS, LayerInfo, Method, builder_options, check_bits, check_choice

SUPPORTED_BITS = (1, 2, 3, 4, 5, 6, 7, 8, 32)
RESCALE_MODES = ("last", "no_bn", "all", "none")
RESCALE_METHODS = ("const", "std")
FIRST_LAST = ("8bit", "same", "fp")


class SATWeightQuantizer(nn.Module):
    """Weight fake-quantizer: W -> Q (Eq. 9) [-> Q* (Eq. 10 or S23)].

    ``clamp=False`` (only with ``bits=32``) skips the tanh clamping, so the layer is a plain FP layer unless
    rescaling is on. ``foldable`` marks the last FC, whose positive rescale factor applies in training
    only: in eval mode ``forward`` returns Q and ``transform_bias`` (called by the layer) divides the bias by the
    factor, as the authors' eval mode does (``fold_sat_rescale`` makes that permanent). ``gated=True``
    (``rescale: no_bn``) adds a persistent 0/1 buffer ``rescale_on`` that switches the factor on or off
    without a Python branch; it is set from the real data flow by ``calibrate_structure``.
    """

    def __init__(
        self,
        bits: int,
        scheme: str = "original",
        rescale: str | None = None,
        clamp: bool = True,
        foldable: bool = False,
        gated: bool = False,
        rescale_on: bool = True,
        variance: str = "sample",
    ) -> None:
        super().__init__()
        if scheme not in satf.WEIGHT_SCHEMES:
            raise QreproError(f"unknown SAT weight scheme {scheme!r}; choose one of: {', '.join(satf.WEIGHT_SCHEMES)}")
        if rescale is not None and rescale not in RESCALE_METHODS:
            raise QreproError(f"unknown rescale_method {rescale!r}; choose one of: {', '.join(RESCALE_METHODS)}")
        if not clamp and bits != satf.FP_BITS:
            raise QreproError("weight_clamp=false is only valid with 32-bit weights (DoReFa rounds the clamped weight)")
        if variance not in satf.VARIANCES:
            raise QreproError(f"unknown SAT variance {variance!r}; choose one of: {', '.join(satf.VARIANCES)}")
        self.bits, self.scheme, self.rescale, self.variance = bits, scheme, rescale, variance
        self.clamp, self.foldable = clamp, foldable
        self.gated = gated and rescale is not None
        if self.gated:
            self.register_buffer("rescale_on", torch.tensor(float(rescale_on)))

    def quantize(self, w: torch.Tensor) -> torch.Tensor:
        """Q before rescaling (Eq. 9; the clamped weight of Eq. 6 for 32 bits)."""
        return satf.dorefa_weight(w, self.bits, self.scheme) if self.clamp else w

    def factor(self, w: torch.Tensor, q: torch.Tensor | None = None) -> torch.Tensor:
        """The detached positive rescale factor (1 when rescaling is off)."""
        q = self.quantize(w) if q is None else q
        if self.rescale == "const":
            f = satf.sat_rescale_factor(q, satf.out_neurons(w), self.variance)
        elif self.rescale == "std":
            f = satf.std_rescale_factor(q, w, self.variance)
        else:
            return torch.ones((), dtype=w.dtype, device=w.device)
        if self.gated:
            f = torch.where(self.rescale_on > 0, f, torch.ones_like(f))
        return f

    def _folded(self) -> bool:
        """Eval mode of a foldable (last FC) layer: the factor moves from the weight into the bias."""
        return self.rescale is not None and self.foldable and not self.training

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        q = self.quantize(w)
        if self.rescale is None or self._folded():
            return q
        return q * self.factor(w, q)

    def transform_bias(self, bias: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """The bias that goes with ``forward(w)``: b / f in eval mode of a foldable layer (paper §3.3.2, the
        authors' eval mode: x Q + b / f = (x fQ + b) / f), b otherwise."""
        if not self._folded():
            return bias
        return bias / self.factor(w)

    def extra_repr(self) -> str:
        gate = ", gated" if self.gated else ""
        return (
            f"bits={self.bits}, scheme={self.scheme}, rescale={self.rescale}{gate}, variance={self.variance}, "
            f"clamp={self.clamp}, foldable={self.foldable}"
        )


class PACTQuantizer(nn.Module):
    """Activation (layer input) fake-quantizer: PACT with a trainable clip |alpha| (Eq. 11), gradient of
    Eq. (13) (``calibrated=True``, CG-PACT) or of the original PACT. ``signed`` is a persistent 0/1 buffer
    (so an automatically detected sign survives checkpoints) used without a Python branch in forward."""

    param_tags = {"alpha": "act_clip"}

    def __init__(self, bits: int, alpha_init: float = 8.0, calibrated: bool = True, signed: bool = False) -> None:
        super().__init__()
        self.bits, self.calibrated = bits, calibrated
        self.alpha = nn.Parameter(torch.tensor(float(alpha_init)))
        self.register_buffer("signed", torch.tensor(float(signed)))
        self.auto_sign = False  # set by the method when signed_act=auto

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.float16, torch.bfloat16):  # fake-quant arithmetic in float32 (exact rounding)
            return satf.pact(x.float(), self.alpha.float(), self.bits, self.calibrated, self.signed).to(x.dtype)
        return satf.pact(x, self.alpha.to(x.dtype), self.bits, self.calibrated, self.signed)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, calibrated={self.calibrated}, auto_sign={self.auto_sign}"


def _signed_policy(signed_act: Any, name: str) -> tuple[bool, bool]:
    """(signed, auto) for a layer from the ``signed_act`` option."""
    if signed_act == "auto":
        return False, True
    if isinstance(signed_act, bool):
        return signed_act, False
    if isinstance(signed_act, Sequence) and not isinstance(signed_act, str):
        return any(fnmatch.fnmatchcase(name, str(p)) for p in signed_act), False
    raise QreproError(f"signed_act={signed_act!r} is invalid; use auto, true, false or a list of layer patterns")


def _build(
    name: str,
    w_bits: int,
    a_bits: int,
    *,
    scheme: str = "modified",
    rescale: str = "last",
    rescale_method: str = "const",
    variance: str = "sample",
    cg: bool = True,
    first_last: str = "8bit",
    signed_act: Any = False,
    alpha_init: float = 8.0,
    alpha_init_last: float = 10.0,
    weight_clamp: bool = True,
    diagnostics: bool = False,
) -> Method:
    options = builder_options(locals())
    check_bits(name, w_bits, a_bits, SUPPORTED_BITS)
    check_choice("scheme", scheme, satf.WEIGHT_SCHEMES, name)
    check_choice("rescale", rescale, RESCALE_MODES, name)
    check_choice("rescale_method", rescale_method, RESCALE_METHODS, name)
    check_choice("variance", variance, satf.VARIANCES, name)
    check_choice("first_last", first_last, FIRST_LAST, name)
    if not weight_clamp and w_bits != satf.FP_BITS:
        raise QreproError(
            f"quantizer.weight_clamp=false needs 32-bit weights (got w_bits={w_bits}); use precision=w32a32"
        )
    _signed_policy(signed_act, "")  # validate early

    def quantize_layer(info: LayerInfo) -> tuple[nn.Module | None, nn.Module | None] | None:
        first, last = info.role == "first", info.role == "last"
        if (first or last) and first_last == "fp":  # a plain FP layer: no clamping, no input quantizer
            return None
        wb = info.w_bits
        if wb != satf.FP_BITS and (first or last) and first_last == "8bit":
            wb = 8
        do_rescale = rescale == "all" or (last and rescale != "none") or rescale == "no_bn"
        # no_bn: gated by the data flow (calibrate_structure); next_module is only the initial guess, since
        # module order misses residual additions (a PreResNet conv3 is listed right before the next BN)
        gated = rescale == "no_bn" and not last
        wq = SATWeightQuantizer(
            wb,
            scheme,
            rescale_method if do_rescale else None,
            clamp=weight_clamp,
            foldable=last,
            gated=gated,
            rescale_on=not isinstance(info.next_module, _BatchNorm),
            variance=variance,
        )
        aq = None
        if not first and info.a_bits != satf.FP_BITS:  # first conv: uint8 image, not quantized
            signed, auto = _signed_policy(signed_act, info.name)
            aq = PACTQuantizer(info.a_bits, alpha_init_last if last else alpha_init, calibrated=cg, signed=signed)
            aq.auto_sign = auto
        return wq, aq

    hooks: list[Hook] = []
    if (signed_act == "auto" and a_bits != satf.FP_BITS) or rescale == "no_bn":
        hooks.append(StructureCalibration())
    if diagnostics:
        hooks.append(SATDiagnostics())
    if not isinstance(signed_act, (str, bool)):
        options["signed_act"] = list(signed_act)
    return Method(name=name, quantize_layer=quantize_layer, hooks=hooks, options=options)


@METHODS.register("sat")
def build_sat(w_bits: int, a_bits: int, **options: Any) -> Method:
    """SAT + CG-PACT (the paper's method). Options: the keywords of ``_build`` (see the module docstring)."""
    return _build("sat", w_bits, a_bits, **options)


@METHODS.register("pact")
def build_pact(w_bits: int, a_bits: int, **options: Any) -> Method:
    """PACT baseline of Table 4: DoReFa weights, PACT activations with the original gradient, no rescaling."""
    return _build("pact", w_bits, a_bits, **{"rescale": "none", "cg": False, **options})


@METHODS.register("dorefa")
def build_dorefa(w_bits: int, a_bits: int, **options: Any) -> Method:
    """Clamped/DoReFa weights without SAT's rescaling (Fig. 2b 'clamping'); CG-PACT for activations."""
    return _build("dorefa", w_bits, a_bits, **{"rescale": "none", **options})


# ---------------------------------------------------------------------------------------------------------
# signed inputs, folding, diagnostics


@torch.no_grad()
def calibrate_structure(model: nn.Module, x: torch.Tensor) -> dict[str, list[str]]:
    """Read two structural facts off one forward pass on ``x`` (eval mode, nothing else changes):

    - ``signed``: auto-sign PACT quantizers whose layer input takes negative values get ``signed = 1``
      (ReLU outputs are >= 0, linear-bottleneck and residual outputs are not; any weights decide it);
    - ``rescaled``: gated weight quantizers (``rescale: no_bn``) get ``rescale_on = 1`` unless the layer's
      output tensor goes straight into a BatchNorm (ETR II / supplement S6: rescale layers without BN after).
    Returns the layer names with ``signed`` / ``rescale_on`` set to 1.
    """
    neg: dict[str, bool] = {}
    out_of: dict[int, str] = {}
    keep: list[torch.Tensor] = []  # keep outputs alive so their ids are not reused during the pass
    into_bn: set[str] = set()
    layers = dict(quantized_layers(model))
    auto = [n for n, lay in layers.items() if isinstance(lay.aq, PACTQuantizer) and lay.aq.auto_sign]
    gated = [n for n, lay in layers.items() if isinstance(lay.wq, SATWeightQuantizer) and lay.wq.gated]

    def pre(mod: nn.Module, args: tuple, name: str) -> None:
        neg[name] = neg.get(name, False) or bool((args[0] < 0).any())

    def post(mod: nn.Module, args: tuple, out: torch.Tensor, name: str) -> None:
        out_of[id(out)] = name
        keep.append(out)

    def bn_pre(mod: nn.Module, args: tuple) -> None:
        if id(args[0]) in out_of:
            into_bn.add(out_of[id(args[0])])

    handles = [layers[n].aq.register_forward_pre_hook(functools.partial(pre, name=n)) for n in auto]
    handles += [layers[n].register_forward_hook(functools.partial(post, name=n)) for n in gated]
    handles += [m.register_forward_pre_hook(bn_pre) for m in model.modules() if isinstance(m, _BatchNorm)]
    was_training = model.training
    model.eval()
    try:
        model(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    for name, signed in neg.items():
        layers[name].aq.signed.fill_(float(signed))
    for name in gated:
        layers[name].wq.rescale_on.fill_(float(name not in into_bn))
    return {"signed": [n for n in layers if neg.get(n)], "rescaled": [n for n in gated if n not in into_bn]}


class StructureCalibration(Hook):
    """``signed_act: auto`` / ``rescale: no_bn``: read the data flow off the first training batch."""

    def on_train_start(self, ctx: Context) -> None:
        if ctx.sample_batch is None:
            raise QreproError(
                "signed_act=auto and rescale=no_bn need a sample batch at train start; "
                "set quantizer.signed_act explicitly and use rescale=all or last"
            )
        rep = calibrate_structure(ctx.model, ctx.sample_batch[0])
        layers = dict(quantized_layers(ctx.model))
        if any(isinstance(l.aq, PACTQuantizer) and l.aq.auto_sign for l in layers.values()):
            print(f"sat: two-sided activation quantization for {len(rep['signed'])} layer inputs {rep['signed']}")
        gated = [n for n, l in layers.items() if isinstance(l.wq, SATWeightQuantizer) and l.wq.gated]
        if gated:
            print(f"sat: no_bn rescaling on {len(rep['rescaled'])}/{len(gated)} gated layers {rep['rescaled']}")


@torch.no_grad()
def fold_sat_rescale(model: nn.Module) -> list[str]:
    """Fold the rescale factor f > 0 of the last FC into its bias for inference (paper §3.3.2).

    The folded layer computes x Q^T + b / f = (x (fQ)^T + b) / f: logits divided by a positive constant, so
    the arg-max (and the ranking) is unchanged and the extra multiply disappears. Eval mode already computes
    this on the fly (as the authors' code does); folding freezes the factor at its current value, in place, for
    inference or export. Rescaled layers that are not the last FC (S6: convs followed by a residual addition) keep their
    factor. Returns the names of the folded layers.
    """
    folded = []
    for name, layer in quantized_layers(model):
        wq = layer.wq
        if isinstance(wq, SATWeightQuantizer) and wq.rescale is not None and wq.foldable:
            f = wq.factor(layer.weight)
            if layer.bias is not None:
                layer.bias.div_(f)
            wq.rescale = None
            folded.append(name)
    return folded


def sat_kappas(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Logit scale kappa0 (Eq. S17a) and gradient-flow kappa1 per layer (Eq. S17b) on one batch.

    Uses the effective weights Xi (the output of ``wq``), VAR = mean square for weights (as the paper) and
    the variance for gradients; layers are paired in module order. For a conv -> linear pair the average
    pooling in between has k_pool^2 = (conv output size per sample) / (linear in_features) (the feature-map
    area for global pooling); k_pool = 1 otherwise, as the paper sets for the stem's max pooling (S1.2).
    The forward/backward runs in the model's current mode and leaves parameters, gradients and buffers
    (BN running statistics) unchanged.
    """
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    eff: dict[str, torch.Tensor] = {}
    out_hw: dict[str, int] = {}  # output elements per sample
    handles = []
    for name, m in layers:
        wq = getattr(m, "wq", None) if isinstance(m, (QConv2d, QLinear)) else None
        if wq is not None:

            def wq_hook(mod: nn.Module, args: tuple, out: torch.Tensor, _n: str = name) -> None:
                eff[_n] = out

            handles.append(wq.register_forward_hook(wq_hook))

        def shape_hook(mod: nn.Module, args: tuple, out: torch.Tensor, _n: str = name) -> None:
            out_hw[_n] = out[0].numel()

        handles.append(m.register_forward_hook(shape_hook))
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        with torch.enable_grad():
            loss = F.cross_entropy(model(x), y)
            ws = [eff.get(n, m.weight) for n, m in layers]
            grads = torch.autograd.grad(loss, ws, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
    out: dict[str, float] = {}
    last = layers[-1][1]
    if isinstance(last, nn.Linear) and len(layers) > 1:
        k = math.sqrt(max(out_hw[layers[-2][0]] / last.in_features, 1.0))
        out["sat_kappa0"] = float(last.in_features * satf.mean_square(ws[-1].detach()) / k**2)
    for i in range(len(layers) - 1):
        n0 = layers[i][0]
        g0, g1 = grads[i], grads[i + 1]
        if g0 is None or g1 is None:
            continue
        nxt = layers[i + 1][1]
        k = math.sqrt(max(out_hw[n0] / nxt.in_features, 1.0)) if isinstance(nxt, nn.Linear) else 1.0
        # n_l = input neurons c_in/groups*k*k of layer l, n^_l+1 = output neurons c_out*k*k of layer l+1
        n_l, nh_l1 = ws[i][0].numel(), ws[i + 1].numel() // ws[i + 1].shape[1]
        v0, v1 = satf.mean_square(ws[i].detach()), satf.mean_square(ws[i + 1].detach())
        val = k**2 * (n_l * v0) / (nh_l1 * v1) * g0.var() / g1.var()
        out[f"sat_kappa1/{n0}"] = float(val)
    k1 = [v for k, v in out.items() if k.startswith("sat_kappa1/")]
    if k1:
        out["sat_kappa1_median"] = float(torch.tensor(k1).median())
    return out


class SATDiagnostics(Hook):
    """``diagnostics: true``: log kappa0 and kappa1 (Eq. S17) at the end of each epoch on a fixed batch."""

    def __init__(self, max_samples: int = 128) -> None:
        self.max_samples = max_samples
        self.batch: tuple[torch.Tensor, torch.Tensor] | None = None

    def on_train_start(self, ctx: Context) -> None:
        if ctx.sample_batch is not None:
            x, y = ctx.sample_batch
            self.batch = (x[: self.max_samples].detach(), y[: self.max_samples].detach())

    def on_epoch_end(self, ctx: Context, epoch: int) -> dict[str, float]:
        if self.batch is None:
            return {}
        return sat_kappas(ctx.model, *self.batch)
