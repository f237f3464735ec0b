"""APoT (Additive Powers-of-Two Quantization): weight and activation fake-quantizers and the per-layer policy.

Policy (paper Sec. 4.1 and the authors' code):
- middle conv/linear layers: weights normalised per tensor (Eq. 9), then signed APoT with RCF (Eq. 7):
  sign x the (b-1)-bit magnitude set, 2-bit weights ternary {-alpha, 0, alpha}; the layer input is
  quantized unsigned on the b-bit set with its own RCF threshold.
- first conv and last FC: 8-bit weights scaled by the largest positive weight, no clamp, input not
  quantized. The authors' 32-bit baseline also uses these layers, so ``precision=w32a32`` with
  ``quantizer=apot`` quantizes only them (their FP model).

Options default to the paper; the authors' code deviations are switches (``wn_grad``, ``wn_std``,
``wn_eps``, ``w_grad``, ``init_a_alpha``) that the experiment configs set and document.
"""

from __future__ import annotations

import torch
from torch import nn

from qrepro.errors import QreproError
from qrepro.hooks import Hook
from qrepro.quant import apot as qa
from qrepro.quant.layers import quantized_layers
from qrepro.quant.methods import (
    FP_BITS,
    METHODS,
    BitsQuantizer,
    LayerInfo,
    Method,
    builder_options,
    check_bits,
    check_choice,
)
from qrepro.registry import register_converter

SUPPORTED_BITS = (2, 3, 4, 5, 6, 7, 8, FP_BITS)
LEVEL_FAMILIES = ("apot", "pot", "uniform", "lloyd")
W_GRADS = ("ste", "clipped", "clipped_above_2bit")


class APoTWeightQuantizer(nn.Module):
    """W -> WN (Eq. 9) -> alpha * sign * Pi_Q(1,b-1)(clip(W~/alpha)) (Eq. 7), per tensor.

    ``clip``: ``rcf`` (Eq. 8 gradient for alpha), ``pact`` (Eq. 11 gradient), ``max`` (no clipping:
    alpha = max|W~|, not learned; Table 3 "RCF x"). ``grad``: weight gradient ``ste`` (1 everywhere) or
    ``clipped`` (0 outside +-alpha).
    """

    param_tags = {"alpha": "weight_clip"}

    def __init__(
        self,
        bits: int,
        *,
        levels: str = "apot",
        clip: str = "rcf",
        grad: str = "ste",
        wn: bool = True,
        wn_detach: bool = False,
        wn_unbiased: bool = False,
        wn_eps: float = 1e-5,
        init_alpha: float = 3.0,
        lloyd_iters: int = 30,
    ) -> None:
        super().__init__()
        self.bits, self.family, self.clip, self.grad = bits, levels, clip, grad
        self.wn, self.wn_detach, self.wn_unbiased, self.wn_eps = wn, wn_detach, wn_unbiased, wn_eps
        self.lloyd_iters = lloyd_iters
        # lloyd: uniform until LloydRefit fits them, persistent so a trained model keeps its levels
        lloyd = levels == "lloyd"
        init = qa.magnitude_levels("uniform" if lloyd else levels, bits)
        self.register_buffer("levels", init.float(), persistent=lloyd)
        if clip != "max":
            self.alpha = nn.Parameter(torch.tensor(float(init_alpha)))

    def normalized(self, w: torch.Tensor) -> torch.Tensor:
        if not self.wn:
            return w
        return qa.weight_norm(w, eps=self.wn_eps, unbiased=self.wn_unbiased, detach=self.wn_detach)

    def threshold(self, w_norm: torch.Tensor) -> torch.Tensor:
        return w_norm.detach().abs().max() if self.clip == "max" else self.alpha

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        x = self.normalized(w)
        if self.clip == "pact":
            return qa.pact_weight(x, self.alpha, self.levels, grad=self.grad)
        return qa.rcf_weight(x, self.threshold(x), self.levels, grad=self.grad)

    @torch.no_grad()
    def refit_levels(self, w: torch.Tensor) -> None:
        """Lloyd-Max refit of the magnitude levels to |W~| / alpha clipped at 1 (family ``lloyd`` only)."""
        x = self.normalized(w.detach())
        u = torch.clamp(x.abs() / self.threshold(x).detach(), max=1.0)
        new = qa.lloyd_max_levels(u, self.levels.numel(), iters=self.lloyd_iters, init=self.levels)
        self.levels.copy_(new)

    def extra_repr(self) -> str:
        return (
            f"bits={self.bits}, levels={self.family}, clip={self.clip}, grad={self.grad}, wn={self.wn}, "
            f"wn_detach={self.wn_detach}, wn_unbiased={self.wn_unbiased}, wn_eps={self.wn_eps}"
        )


class APoTActQuantizer(nn.Module):
    """x -> alpha * Pi_Q(1,b)(min(x/alpha, 1)) (unsigned, RCF or PACT gradient), per tensor."""

    param_tags = {"alpha": "act_clip"}

    def __init__(self, bits: int, *, levels: str = "apot", clip: str = "rcf", init_alpha: float = 8.0) -> None:
        super().__init__()
        self.bits, self.family, self.clip = bits, levels, clip
        self.register_buffer("levels", qa.level_set(levels, bits).float(), persistent=False)
        self.alpha = nn.Parameter(torch.tensor(float(init_alpha)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.clip == "pact":
            return qa.pact_act(x, self.alpha, self.levels)
        return qa.rcf_act(x, self.alpha, self.levels)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, levels={self.family}, clip={self.clip}"


class MaxScaledWeightQuantizer(BitsQuantizer):
    """First conv / last FC: b-bit weights scaled by the largest positive weight, no clamp (authors' code)."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return qa.max_scaled_weight(w, self.bits)


class LloydRefit(Hook):
    """Refits the Lloyd-Max weight levels of every ``levels=lloyd`` quantizer at the start of training and
    after every epoch (Table 3 "Lloyd" ablation)."""

    def _refit(self, model: nn.Module) -> None:
        for _, layer in quantized_layers(model):
            wq = layer.wq
            if isinstance(wq, APoTWeightQuantizer) and wq.family == "lloyd":
                wq.refit_levels(layer.weight)

    def on_train_start(self, ctx) -> None:
        self._refit(ctx.model)

    def on_epoch_end(self, ctx, epoch: int) -> dict[str, float]:
        self._refit(ctx.model)
        return {}


@METHODS.register("apot")
def build_apot(
    w_bits: int,
    a_bits: int,
    *,
    levels: str = "apot",
    act_levels: str | None = None,
    w_clip: str = "rcf",
    a_clip: str = "rcf",
    wn: bool = True,
    wn_grad: str = "attached",
    wn_std: str = "biased",
    wn_eps: float = 1e-5,
    w_grad: str = "ste",
    init_w_alpha: float = 3.0,
    init_a_alpha: float = 8.0,
    first_last: str = "8bit",
    first_last_bits: int = 8,
    lloyd_iters: int = 30,
) -> Method:
    """APoT method. Weight/activation level families (``levels``, ``act_levels``), clipping (``w_clip``, ``a_clip``),
    weight normalisation (``wn``, ``wn_grad``, ``wn_std``, ``wn_eps``), the weight gradient (``w_grad``) and the
    first/last layers: docs/apot.md, "Layer policy and options"."""
    options = builder_options(locals())
    del options["lloyd_iters"]  # not one of the recorded options
    check_bits("apot", w_bits, a_bits, SUPPORTED_BITS)
    check_choice("levels", levels, LEVEL_FAMILIES, "apot")
    if act_levels is None:
        options["act_levels"] = act_levels = "apot" if levels == "lloyd" else levels
    for opt, allowed in (
        ("act_levels", ("apot", "pot", "uniform")),
        ("w_clip", ("rcf", "pact", "max")),
        ("a_clip", ("rcf", "pact")),
        ("wn_grad", ("attached", "detached")),
        ("wn_std", ("biased", "unbiased")),
        ("w_grad", W_GRADS),
        ("first_last", ("8bit", "fp")),
    ):
        check_choice(opt, options[opt], allowed, "apot")
    # the authors' ImageNet code clips the weight gradient only above 2 bits (its 2-bit path passes it unclipped)
    layer_w_grad = "clipped" if w_grad == "clipped" or (w_grad == "clipped_above_2bit" and w_bits > 2) else "ste"
    if not 2 <= first_last_bits <= 16:
        raise QreproError(f"quantizer.first_last_bits={first_last_bits} must be in 2..16 (paper: 8)")

    def quantize_layer(info: LayerInfo) -> tuple[nn.Module | None, nn.Module | None] | None:
        if info.role in ("first", "last"):
            return (MaxScaledWeightQuantizer(first_last_bits), None) if first_last == "8bit" else None
        wq = aq = None
        if w_bits != FP_BITS:
            wq = APoTWeightQuantizer(
                w_bits,
                levels=levels,
                clip=w_clip,
                grad=layer_w_grad,
                wn=wn,
                wn_detach=wn_grad == "detached",
                wn_unbiased=wn_std == "unbiased",
                wn_eps=wn_eps,
                init_alpha=init_w_alpha,
                lloyd_iters=lloyd_iters,
            )
        if a_bits != FP_BITS:
            aq = APoTActQuantizer(a_bits, levels=act_levels, clip=a_clip, init_alpha=init_a_alpha)
        return wq, aq

    hooks = [LloydRefit()] if levels == "lloyd" and w_bits != FP_BITS else []
    return Method(name="apot", quantize_layer=quantize_layer, hooks=hooks, options=options)


# ------------------------------------------------------------------------- authors' CIFAR checkpoints
_AUTHORS_ACT_ALPHA = "act_alpha"
_AUTHORS_WGT_ALPHA = "weight_quant.wgt_alpha"


@register_converter("apot-authors-cifar")
def convert_authors_cifar_checkpoint(state: dict) -> dict | None:
    """State dict of the APoT authors' CIFAR-10 ResNet (their ``res20_{32,4,3,2}bit.pth.tar``) -> ours.

    Accepts the whole checkpoint ``{epoch, state_dict, best_prec, optimizer}`` or its ``state_dict``.
    Returns None when the keys are not the authors' (so other converters can try). Key mapping
    (model ``resnet20``/``resnet56`` with ``shortcut=B``, ``quantizer=apot``):

    ============================================  =====================================
    authors (DataParallel)                        qrepro
    ============================================  =====================================
    ``module.<key>``                              ``<key>``
    ``layerS.B.downsample.0.weight``              ``layerS.B.shortcut.0.weight``
    ``layerS.B.downsample.1.<bn key>``            ``layerS.B.shortcut.1.<bn key>``
    ``<conv>.act_alpha``                          ``<conv>.aq.alpha``
    ``<conv>.weight_quant.wgt_alpha``             ``<conv>.wq.alpha``
    ============================================  =====================================

    Every other key (``conv1``, ``bn1``, ``layerS.B.{conv,bn}{1,2}``, ``fc``) keeps its name. Their first
    conv / last FC (``first_conv`` / ``last_fc``) hold no quantizer state (the 8-bit weight scale is the
    max weight, recomputed), and the level sets are rebuilt from the bit-width, so nothing else is needed.
    """
    sd = state.get("state_dict") if isinstance(state.get("state_dict"), dict) else state
    if not sd or not all(isinstance(k, str) for k in sd):
        return None
    keys = [k.removeprefix("module.") for k in sd]
    quantized = any(k.endswith((_AUTHORS_ACT_ALPHA, _AUTHORS_WGT_ALPHA)) for k in keys)
    fp_layout = (
        all(k.startswith("module.") for k in sd)
        and "layer1.0.conv1.weight" in keys
        and "fc.weight" in keys
        and any(".downsample.0.weight" in k for k in keys)
    )
    if not (quantized or fp_layout):
        return None
    out = {}
    for key, value in zip(keys, sd.values()):
        key = key.replace(".downsample.", ".shortcut.")
        if key.endswith("." + _AUTHORS_WGT_ALPHA):
            key = key[: -len(_AUTHORS_WGT_ALPHA)] + "wq.alpha"
        elif key.endswith("." + _AUTHORS_ACT_ALPHA):
            key = key[: -len(_AUTHORS_ACT_ALPHA)] + "aq.alpha"
        out[key] = value
    return out
