"""``quantizer=nagel_damp`` / ``quantizer=nagel_freeze``: "Overcoming Oscillations in Quantization-Aware Training".

One LSQ-style quantizer (maths: :mod:`qrepro.quant.nagel`) with two switches, each its own registry name:
``nagel_damp`` adds the oscillation dampening loss (Method.regularizer), ``nagel_freeze`` tracks the oscillation
frequency of every integer weight after each optimizer step and freezes those above a threshold; both schedules are
per step (:class:`NagelSchedule`). Layer policy (the authors' "LSQ_paper" set-up), options and defaults:
docs/nagel.md.
"""

from __future__ import annotations

import torch
from torch import nn

from qrepro.errors import QreproError
from qrepro.hooks import Context, Hook
from qrepro.quant import nagel as F
from qrepro.quant.layers import is_quantizer_param, quantized_layers
from qrepro.quant.methods import FP_BITS, METHODS, LayerInfo, Method, builder_options, check_bits, init_from_batch

SUPPORTED_BITS = (2, 3, 4, 5, 6, 7, 8, FP_BITS)
EDGE_BITS = 8
_TRACKING = ("prev_int", "prev_dir", "freq", "frozen_int", "frozen_int_next", "ema_int", "frozen", "frozen_next")
_MASKS = ("frozen", "frozen_next")  # the boolean tracking buffers


class NagelQuantizer(nn.Module):
    """x_q = s·clip(round(x/s), n, p); the grid's sign is fixed at initialisation (``n_int``/``p_int`` buffers).

    As a weight quantizer it also holds the oscillation state: ``frozen`` (bool), ``frozen_int`` (the frozen
    integers), ``prev_int``/``prev_dir`` (last integers and the direction of their last change), ``freq`` (the
    oscillation-frequency EMA) and ``ema_int`` (the integers' EMA that frozen weights take)."""

    param_tags = {"scale": "nagel_scale"}

    def __init__(self, bits: int, track: bool = False) -> None:
        super().__init__()
        self.bits, self.track = bits, track
        self.scale = nn.Parameter(torch.ones(()))
        n, p = F.int_range(bits, True)  # (validates bits)
        # the grid (n, p): buffers (checkpointed; the sign is set from data at initialisation) mirrored as Python
        # floats, which the forward uses: torch.clamp with number bounds, as the authors' code (with tensor bounds
        # PyTorch splits the gradient at x_int = n or p between x and the bound)
        self.register_buffer("n_int", torch.tensor(n))
        self.register_buffer("p_int", torch.tensor(p))
        self.n, self.p = n, p
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        if track:
            for name in _TRACKING:
                self.register_buffer(name, torch.zeros(0, dtype=torch.bool if name in _MASKS else None))
            self.register_buffer("ema_ready", torch.zeros((), dtype=torch.bool))

    def grid(self) -> tuple[float, float]:
        """(n, p), the integer grid."""
        return self.n, self.p

    def integers(self, x: torch.Tensor) -> torch.Tensor:
        """x_int with frozen weights replaced by their frozen integers (no gradient to those)."""
        n, p = self.grid()
        x_int = F.to_integer(x, F.effective_scale(self.scale).to(x.dtype), n, p)
        if self.track and self.frozen.numel():
            x_int = torch.where(self.frozen, self.frozen_int.to(x.dtype), x_int)
        return x_int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.effective_scale(self.scale).to(x.dtype) * self.integers(x)

    @torch.no_grad()
    def init_from(self, x: torch.Tensor) -> None:
        s, signed = F.mse_scale(x, self.bits)
        n, p = F.int_range(self.bits, signed)
        self.n_int.fill_(n)
        self.p_int.fill_(p)
        self.n, self.p = n, p
        self.scale.fill_(s)
        self.initialized.fill_(True)

    @torch.no_grad()
    def reset_tracking(self, x_int: torch.Tensor) -> None:
        """Start tracking at ``x_int``: no direction yet, zero frequency, nothing frozen."""
        for name in _TRACKING:
            setattr(self, name, torch.zeros_like(x_int, dtype=torch.bool if name in _MASKS else None))
        self.prev_int = x_int.detach().clone()
        self.ema_ready.fill_(False)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # tracking buffers change shape
        if self.track:
            for name in _TRACKING:
                if prefix + name in state_dict:
                    setattr(self, name, torch.empty_like(state_dict[prefix + name]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.n, self.p = float(self.n_int), float(self.p_int)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, track={self.track}"


def _weight_quantizers(model: nn.Module) -> list[tuple[nn.Module, NagelQuantizer]]:
    return [(layer, layer.wq) for _, layer in quantized_layers(model) if isinstance(layer.wq, NagelQuantizer)]


def tracked(model: nn.Module) -> list[tuple[nn.Module, NagelQuantizer]]:
    return [(layer, wq) for layer, wq in _weight_quantizers(model) if wq.track]


class DampeningLoss(nn.Module):
    """λ·Σ_layers agg((w_q − clip(w, s·n, s·p))²) over every Nagel weight quantizer; λ is a buffer (set by
    :class:`NagelSchedule`, read inside a compiled graph without recompiling)."""

    def __init__(self, aggregation: str = "kernel_mean", weight: float = 0.0) -> None:
        super().__init__()
        self.aggregation = aggregation
        self.register_buffer("weight", torch.tensor(float(weight), dtype=torch.float64))  # λ, cast where used

    def forward(self, model: nn.Module) -> torch.Tensor | None:
        terms = []
        for layer, wq in _weight_quantizers(model):
            w = layer.weight
            s = F.effective_scale(wq.scale).to(w.dtype)
            terms.append(F.dampening_term(w, s * wq.integers(w), s, *wq.grid(), self.aggregation))
        if not terms:
            return None
        total = sum(terms[1:], terms[0])
        return total * self.weight.to(total.dtype)


class NagelInit(Hook):
    """MSE initialisation of the uninitialised scales (none on resume): weights from the weights, inputs from one
    training-mode forward of ``ctx.sample_batch`` (``init_from_batch``; every buffer but the quantizers' is restored
    after). Then the tracking state."""

    def on_train_start(self, ctx: Context) -> None:
        x = None if ctx.sample_batch is None else ctx.sample_batch[0]
        missing = "the Nagel et al. quantizer needs a sample batch to initialise its activation ranges"
        init_from_batch(ctx.model, x, NagelQuantizer, missing, restore=lambda k: not is_quantizer_param(k))
        for layer, wq in tracked(ctx.model):
            if wq.prev_int.shape != layer.weight.shape:
                wq.reset_tracking(wq.integers(layer.weight.detach()))


class NagelSchedule(Hook):
    """Per-step annealing of λ (dampening) and of the freezing threshold, and the oscillation tracking.

    Before step ``t`` (1-based, the authors' iteration) λ and the threshold take their cosine schedules' values
    at ``t`` over ``total_steps`` (the LR schedule's; without a schedule they keep their starting values);
    tracking follows each optimizer step, on the integers the
    next forward sees. Reports the mean oscillation frequency, the frozen fraction and λ / the threshold."""

    def __init__(
        self,
        damp: DampeningLoss | None,
        damp_range: tuple[float, float],
        damp_start: float,
        freeze_range: tuple[float, float] | None,
        freeze_start: float,
        momentum: float,
        use_ema: bool,
    ) -> None:
        self.damp, self.damp_range, self.damp_start = damp, damp_range, damp_start
        self.freeze_range, self.freeze_start = freeze_range, freeze_start
        self.momentum, self.use_ema = momentum, use_ema
        self.total_steps: int | None = None
        self.threshold = 0.0

    def _set(self, t: int) -> None:
        total = self.total_steps
        if total is None:  # no LR schedule to follow (benchmarks, bare loops): the starting values throughout
            if self.damp is not None:
                self.damp.weight.fill_(self.damp_range[0])
            self.threshold = self.freeze_range[0] if self.freeze_range is not None else 0.0
            return
        t = min(t, total)  # the schedules end at the last step
        if self.damp is not None:
            self.damp.weight.fill_(F.cosine_anneal(t, total, *self.damp_range, self.damp_start))
        if self.freeze_range is not None:
            start = self.freeze_start * total
            self.threshold = 0.0 if t < start else F.cosine_anneal(t, total, *self.freeze_range, self.freeze_start)

    def on_train_start(self, ctx: Context) -> None:
        total = getattr(ctx.scheduler, "total_steps", None)
        self.total_steps = None if total is None else int(total)
        if self.damp is not None:
            self.damp.to(next(ctx.model.parameters()).device)
        self._set(ctx.step + 1)

    def on_step_end(self, ctx: Context, step: int) -> None:
        self._set(step + 1)
        if self.freeze_range is None:
            return
        with torch.no_grad():
            for layer, wq in tracked(ctx.model):
                # decisions of the previous tracking take effect now: a weight frozen when the frequency of the
                # integers of forward t passes the threshold is frozen from forward t + 1 on (as the authors' tracker,
                # which decides inside forward t after computing its integers)
                wq.frozen.copy_(wq.frozen_next)
                wq.frozen_int.copy_(wq.frozen_int_next)
                x_int = wq.integers(layer.weight)
                F.track_oscillations(x_int, wq.prev_int, wq.prev_dir, wq.freq, self.momentum)
                if self.threshold > 0:
                    if self.use_ema and not bool(wq.ema_ready):
                        wq.ema_int.copy_(x_int)
                        wq.ema_ready.fill_(True)
                    if self.use_ema:
                        th, m = self.threshold, self.momentum
                        F.freeze_step(x_int, wq.freq, wq.frozen_next, wq.frozen_int_next, wq.ema_int, th, m)
                    else:
                        new = wq.freq > self.threshold
                        wq.frozen_next.logical_or_(new)
                        wq.frozen_int_next.copy_(torch.where(new, x_int, wq.frozen_int_next))

    def on_epoch_end(self, ctx: Context, epoch: int) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.damp is not None:
            out["damp_weight"] = float(self.damp.weight)
        qs = [wq for _, wq in tracked(ctx.model) if wq.freq.numel()]
        if qs:
            n = sum(q.freq.numel() for q in qs)
            out["osc_freq"] = float(sum(q.freq.sum() for q in qs)) / n
            out["frozen_frac"] = float(sum(q.frozen.sum() for q in qs)) / n
            out["freeze_threshold"] = self.threshold
        return out

    def state_dict(self) -> dict[str, float]:
        return {"threshold": self.threshold}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.threshold = float(state.get("threshold", 0.0))


def _build(
    name: str,
    w_bits: int,
    a_bits: int,
    *,
    damp: bool,
    freeze: bool,
    edge_bits: int = EDGE_BITS,
    damp_weight: float = 0.0,
    damp_weight_final: float = 0.1,
    damp_anneal_start: float = 0.25,
    damp_aggregation: str = "kernel_mean",
    freeze_threshold: float = 0.1,
    freeze_threshold_final: float = 0.01,
    freeze_anneal_start: float = 0.25,
    freeze_momentum: float = 0.001,
    freeze_use_ema: bool = True,
    freeze_max_bits: int = 4,
) -> Method:
    check_bits(name, w_bits, a_bits, SUPPORTED_BITS)
    if damp_aggregation not in ("sum", "mean", "kernel_mean"):
        raise QreproError(f"quantizer.damp_aggregation must be sum, mean or kernel_mean, got {damp_aggregation!r}")
    if not 0 < freeze_momentum <= 1:
        raise QreproError(f"quantizer.freeze_momentum must be in (0, 1], got {freeze_momentum!r}")
    for k, v in (("freeze_anneal_start", freeze_anneal_start), ("damp_anneal_start", damp_anneal_start)):
        if not 0 <= v < 1:
            raise QreproError(f"quantizer.{k} must be in [0, 1), got {v!r}")

    def quantize_layer(info: LayerInfo) -> tuple[nn.Module | None, nn.Module | None] | None:
        edge = info.role != "middle"  # LSQ_paper: first/last layers at edge_bits where quantized, the image FP
        wb, ab = (edge_bits if edge and b != FP_BITS else b for b in (w_bits, a_bits))
        ab = FP_BITS if info.role == "first" else ab
        wq = NagelQuantizer(wb, track=freeze and wb <= freeze_max_bits) if wb != FP_BITS else None
        aq = NagelQuantizer(ab) if ab != FP_BITS else None
        return wq, aq

    loss = DampeningLoss(damp_aggregation, damp_weight) if damp and w_bits != FP_BITS else None
    hooks: list[Hook] = [NagelInit()]
    if loss is not None or (freeze and w_bits != FP_BITS):
        hooks.append(
            NagelSchedule(
                loss,
                (damp_weight, damp_weight_final),
                damp_anneal_start,
                (freeze_threshold, freeze_threshold_final) if freeze else None,
                freeze_anneal_start,
                freeze_momentum,
                freeze_use_ema,
            )
        )
    options = {"damp": damp, "freeze": freeze, "edge_bits": edge_bits}
    return Method(name=name, quantize_layer=quantize_layer, regularizer=loss, hooks=hooks, options=options)


@METHODS.register("nagel_damp")
def build_nagel_damp(
    w_bits: int,
    a_bits: int,
    *,
    edge_bits: int = EDGE_BITS,
    damp_weight: float = 0.0,
    damp_weight_final: float = 0.1,
    damp_anneal_start: float = 0.25,
    damp_aggregation: str = "kernel_mean",
) -> Method:
    """Oscillation dampening: λ from ``damp_weight`` to ``damp_weight_final`` (cosine after the relative
    ``damp_anneal_start``), aggregation ``kernel_mean`` (authors' defaults; run script: 0 -> 0.1)."""
    return _build("nagel_damp", w_bits, a_bits, damp=True, freeze=False, **builder_options(locals()))


@METHODS.register("nagel_freeze")
def build_nagel_freeze(
    w_bits: int,
    a_bits: int,
    *,
    edge_bits: int = EDGE_BITS,
    freeze_threshold: float = 0.1,
    freeze_threshold_final: float = 0.01,
    freeze_anneal_start: float = 0.25,
    freeze_momentum: float = 0.001,
    freeze_use_ema: bool = True,
    freeze_max_bits: int = 4,
) -> Method:
    """Iterative weight freezing: threshold from ``freeze_threshold`` to ``freeze_threshold_final`` (cosine after
    ``freeze_anneal_start``, 0 before), frequency EMA momentum ``freeze_momentum``."""
    return _build("nagel_freeze", w_bits, a_bits, damp=False, freeze=True, **builder_options(locals()))
