"""``quantizer=ewgs``: element-wise gradient scaling ("Network Quantization with Element-wise Gradient Scaling").

Policy (the authors' ResNets): the first and last layers stay full precision; every other Conv2d/Linear gets an
:class:`EWGSWeightQuantizer` (learnable interval and output scale α) and an :class:`EWGSActQuantizer` on its input.
:class:`EWGSInit` sets intervals and scales on the first batch; :class:`EWGSHessianDelta` re-estimates δ from the
Hessian trace every ``update_every`` epochs unless ``use_hessian`` is false (``delta: 0`` then is the
straight-through baseline). Maths: :mod:`qrepro.quant.ewgs`; initialisation formulas and options: docs/ewgs.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as TF
from torch import nn

from qrepro.errors import QreproError
from qrepro.hooks import Context, Hook
from qrepro.quant import ewgs as F
from qrepro.quant.layers import calibration_forward, quantized_layers
from qrepro.quant.methods import FP_BITS, METHODS, BitsQuantizer, LayerInfo, Method, check_bits

SUPPORTED_BITS = (1, 2, 3, 4, 5, 6, 7, 8, FP_BITS)


class _EWGSInterval(BitsQuantizer):
    """A learnable interval [l, u] and the EWGS discretiser over it, with its gradient scale δ (buffer ``delta``)."""

    param_tags = {"lower": "ewgs_interval", "upper": "ewgs_interval"}

    def __init__(self, bits: int | None, delta: float = 0.0) -> None:
        if bits is not None:
            F.levels(bits)
        super().__init__(bits)
        self.lower = nn.Parameter(torch.zeros(()))
        self.upper = nn.Parameter(torch.zeros(()))
        self.register_buffer("delta", torch.tensor(float(delta)))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.retain = False  # EWGSHessianDelta: keep the discretiser's output and its gradient
        self.captured: torch.Tensor | None = None

    def discretize(self, x: torch.Tensor) -> torch.Tensor:
        """EWGS(clip((x − l)/(u − l), 0, 1)) in [0, 1]."""
        q = F.discretize(F.normalize(x, self.lower.to(x.dtype), self.upper.to(x.dtype)), 2**self.bits, self.delta)
        if self.retain:
            q.retain_grad()
            self.captured = q
        return q


class EWGSWeightQuantizer(_EWGSInterval):
    """w_q = |α|·2·(EWGS(clip((w − l)/(u − l), 0, 1)) − 1/2); ``bits=None`` keeps w and applies |α| only
    (a layer whose input alone is quantized still has the authors' output scale)."""

    param_tags = {**_EWGSInterval.param_tags, "output_scale": "ewgs_scale"}

    def __init__(self, bits: int | None, delta: float = 0.0) -> None:
        super().__init__(bits, delta)
        self.output_scale = nn.Parameter(torch.ones(()))

    def quantize(self, w: torch.Tensor) -> torch.Tensor:
        """The quantized weight in [−1, 1], without the output scale."""
        return w if self.bits is None else (self.discretize(w) - 0.5) * 2.0

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self.quantize(w) * torch.abs(self.output_scale).to(w.dtype)

    def transform_bias(self, bias: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The output scale multiplies the whole output, bias included."""
        return bias * torch.abs(self.output_scale).to(bias.dtype)


class EWGSActQuantizer(_EWGSInterval):
    """x_q = EWGS(clip((x − l)/(u − l), 0, 1)) in [0, 1]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.discretize(x)


def _raw_output(layer: nn.Module, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The layer's conv/linear on (x, w) with its plain bias."""
    if isinstance(layer, nn.Conv2d):
        return layer._conv_forward(x, w, layer.bias)
    return TF.linear(x, w, layer.bias)


def _ewgs_layers(model: nn.Module) -> list[nn.Module]:
    return [layer for _, layer in quantized_layers(model) if isinstance(layer.wq, EWGSWeightQuantizer)]


@torch.no_grad()
def initialize(model: nn.Module, x: torch.Tensor | None) -> int:
    """Set the intervals and output scales of uninitialised EWGS layers from one training-mode forward of
    ``x``; each layer from its own input as it arrives (so later layers see quantized earlier ones). BatchNorm
    running statistics (and every other buffer) are restored afterwards. Returns the number of layers set."""
    todo = [layer for layer in _ewgs_layers(model) if not bool(layer.wq.initialized)]
    if not todo:
        return 0
    if x is None:
        raise QreproError("EWGS needs a sample batch to initialise its quantizer intervals")

    def pre_hook(layer: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        if bool(layer.wq.initialized):
            return
        inp, wq, aq = args[0], layer.wq, layer.aq
        if wq.bits is not None:
            lo, hi = F.init_weight_interval(layer.weight)
            wq.lower.fill_(lo)
            wq.upper.fill_(hi)
        q_in = inp
        if isinstance(aq, EWGSActQuantizer):
            lo, hi = F.init_activation_interval(inp)
            aq.lower.fill_(lo)
            aq.upper.fill_(hi)
            aq.initialized.fill_(True)
            q_in = aq(inp)
        out = _raw_output(layer, inp, layer.weight)
        q_out = _raw_output(layer, q_in, wq.quantize(layer.weight))
        q_mean = float(q_out.abs().mean())
        # degenerate batch (every quantized output 0, e.g. 1-bit inputs all below u/2): keep α = 1, not inf
        wq.output_scale.fill_(float(out.abs().mean()) / q_mean if q_mean > 0 else 1.0)
        wq.initialized.fill_(True)

    calibration_forward(model, x, todo, pre_hook, restore=lambda k: not k.endswith("initialized"))
    return len(todo)


def estimate_hessian_deltas(
    model: nn.Module,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    *,
    max_iter: int = 50,
    tol: float = 1e-3,
    generator: torch.Generator | None = None,
) -> dict[str, list[float]]:
    """Set every EWGS discretiser's δ from the Hessian trace on ``batches`` (training-mode forwards, cross
    entropy). Returns {"act": [...], "weight": [...]} in layer order. Parameter gradients are cleared after."""
    layers = _ewgs_layers(model)
    acts = [layer.aq for layer in layers if isinstance(layer.aq, EWGSActQuantizer)]
    weights = [layer.wq for layer in layers if layer.wq.bits is not None]
    saved = {k: v.clone() for k, v in model.named_buffers()}
    was_training = model.training
    for q in (*acts, *weights):
        q.retain = True
    try:
        model.train()

        def forward_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            model.zero_grad(set_to_none=True)
            return TF.cross_entropy(model(x), y)

        def capture() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
            return [q.captured for q in acts], [q.captured for q in weights]

        da, dw = F.estimate_deltas(forward_loss, batches, capture, max_iter=max_iter, tol=tol, generator=generator)
    finally:
        for q in (*acts, *weights):
            q.retain, q.captured = False, None
        model.zero_grad(set_to_none=True)
        model.train(was_training)
        bufs = dict(model.named_buffers())
        for k, v in saved.items():
            bufs[k].copy_(v)
    with torch.no_grad():
        for q, d in zip((*acts, *weights), (*da, *dw)):
            q.delta.fill_(d)
    return {"act": da, "weight": dw}


class EWGSInit(Hook):
    """Initialise intervals and output scales on ``ctx.sample_batch`` (skipped on resume)."""

    def on_train_start(self, ctx: Context) -> None:
        initialize(ctx.model, None if ctx.sample_batch is None else ctx.sample_batch[0])


class EWGSHessianDelta(Hook):
    """Every ``every`` epochs, δ of every discretiser from the Hessian trace on ``batches`` training batches
    (Hutchinson probes from a generator seeded with ``seed`` + epoch, so the training RNG stream is untouched;
    ``seed=None``: from the global RNG, as the authors' code). Reports the mean δ of activations and weights."""

    def __init__(
        self, every: int = 1, batches: int = 3, max_iter: int = 50, tol: float = 1e-3, seed: int | None = 0
    ) -> None:
        self.every, self.batches, self.max_iter, self.tol, self.seed = every, batches, max_iter, tol, seed

    def on_epoch_end(self, ctx: Context, epoch: int) -> dict[str, float]:
        if (epoch + 1) % self.every or ctx.data is None:
            return {}
        batches = []
        for i, b in enumerate(ctx.data.train):
            if i == self.batches:
                break
            batches.append((b[0], b[1]))
        g = None
        if self.seed is not None:
            g = torch.Generator(device=batches[0][0].device).manual_seed(self.seed + epoch)
        d = estimate_hessian_deltas(ctx.model, batches, max_iter=self.max_iter, tol=self.tol, generator=g)
        return {f"ewgs_delta_{k}": sum(v) / len(v) for k, v in d.items() if v}


@METHODS.register("ewgs")
def build_ewgs(
    w_bits: int,
    a_bits: int,
    *,
    quantize_first_last: bool = False,
    delta: float = 0.0,
    use_hessian: bool = True,
    update_every: int = 1,
    hessian_batches: int = 3,
    hessian_max_iter: int = 50,
    hessian_tol: float = 1e-3,
    seed: int | None = 0,
) -> Method:
    """EWGS. ``delta``: the initial (or, with ``use_hessian: false``, fixed) gradient scale δ >= 0;
    ``use_hessian``: re-estimate δ every ``update_every`` epochs from ``hessian_batches`` batches (authors: 3),
    Hutchinson with at most ``hessian_max_iter`` probes and relative tolerance ``hessian_tol`` (50, 1e-3), probes
    drawn from a generator seeded with ``seed`` + epoch (``seed: null``: the global RNG)."""
    check_bits("ewgs", w_bits, a_bits, SUPPORTED_BITS)
    if not (isinstance(delta, (int, float)) and delta >= 0):
        raise QreproError(f"quantizer.delta must be a number >= 0, got {delta!r}")
    if update_every < 1 or hessian_batches < 1 or hessian_max_iter < 1:
        raise QreproError("quantizer.update_every, hessian_batches and hessian_max_iter must be >= 1")

    def quantize_layer(info: LayerInfo) -> tuple[nn.Module | None, nn.Module | None] | None:
        if (info.role in ("first", "last") and not quantize_first_last) or w_bits == a_bits == FP_BITS:
            return None
        wq = EWGSWeightQuantizer(None if w_bits == FP_BITS else w_bits, delta)
        aq = EWGSActQuantizer(a_bits, delta) if a_bits != FP_BITS else None
        return wq, aq

    hooks: list[Hook] = [EWGSInit()]
    if use_hessian:
        hooks.append(EWGSHessianDelta(update_every, hessian_batches, hessian_max_iter, hessian_tol, seed))
    options = {"quantize_first_last": quantize_first_last, "delta": float(delta), "use_hessian": use_hessian}
    return Method(name="ewgs", quantize_layer=quantize_layer, hooks=hooks, options=options)
