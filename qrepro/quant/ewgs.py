"""Quantizer of "Network Quantization with Element-wise Gradient Scaling" (EWGS, Lee et al., CVPR 2021).

Forward (the paper's Sec. 3.1, as the authors' ``QConv``): an input ``x`` is normalised by a learnable
interval ``[l, u]`` and discretised to ``n = 2^b`` levels,

    x_n = clip((x − l)/(u − l), 0, 1),    x_q = round((n − 1)·x_n)/(n − 1),

activations use ``x_q`` in ``[0, 1]``, weights ``2·(x_q − 1/2)`` in ``[−1, 1]``. The layer's output is multiplied
by a learnable ``|α|`` (the authors' ``output_scale``), which for a bias-free layer equals multiplying the
quantized weight by ``|α|``.

Backward (Eq. 4): the discretiser's gradient is scaled element-wise,

    g_{x_n} = g_{x_q} · (1 + δ · sign(g_{x_q}) · (x_n − x_q)),

with δ >= 0 (δ = 0 is the straight-through estimator). Everything before the discretiser (normalisation and
clipping) keeps its true gradient, so ``l`` and ``u`` are learned. δ is either fixed or set from the Hessian
(Sec. 3.3): ``δ = Tr(H)/N / (3·std(g))`` of the discretiser's output, averaged over a few batches, clipped at 0
(:func:`hessian_delta`, Hutchinson's estimator with Rademacher probes, as the authors' ``update_grad_scales``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from qrepro.errors import QreproError
from qrepro.quant.tr import HALF_NORMAL_STD


def levels(bits: int) -> int:
    """Number of quantization levels n = 2^b (1..8 bits)."""
    if not 1 <= bits <= 8:
        raise QreproError(f"EWGS supports 1..8 bits, got {bits}; choose e.g. precision=w4a4")
    return 2**bits


class _EWGSRound(torch.autograd.Function):
    """round((n−1)·u)/(n−1) forward; g·(1 + δ·sign(g)·(u − u_q)) backward (Eq. 4)."""

    @staticmethod
    def forward(u: torch.Tensor, steps: float, delta: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return torch.round(u * steps) / steps

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        u, _, delta = inputs
        ctx.save_for_backward(u - output, delta)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        diff, delta = ctx.saved_tensors
        return g * (1 + delta.to(g.dtype) * torch.sign(g) * diff), None, None


def discretize(u: torch.Tensor, n_levels: int, delta: torch.Tensor | float) -> torch.Tensor:
    """EWGS discretiser on ``u`` in [0, 1] with ``n_levels`` levels and gradient scale ``delta`` (Eq. 4)."""
    delta_t = torch.as_tensor(delta, dtype=u.dtype, device=u.device)
    return _EWGSRound.apply(u, float(n_levels - 1), delta_t)


def normalize(x: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """x_n = clip((x − l)/(u − l), 0, 1); torch.clamp's gradient (1 on the closed interval) as the authors'."""
    return ((x - lower) / (upper - lower)).clamp(0.0, 1.0)


def quantize_activation(
    x: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, bits: int, delta: torch.Tensor | float
) -> torch.Tensor:
    """Activation x_q in [0, 1]."""
    return discretize(normalize(x, lower, upper), levels(bits), delta)


def quantize_weight(
    w: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, bits: int, delta: torch.Tensor | float
) -> torch.Tensor:
    """Weight 2·(x_q − 1/2) in [−1, 1] (without the output scale)."""
    return (discretize(normalize(w, lower, upper), levels(bits), delta) - 0.5) * 2.0


def _nonempty(lower: float, upper: float) -> tuple[float, float]:
    """A degenerate interval (a constant tensor: u <= l, so (x − l)/(u − l) would divide by 0) gets width 1."""
    return (lower, upper) if upper > lower else (lower, lower + 1.0)


def init_weight_interval(w: torch.Tensor) -> tuple[float, float]:
    """(l, u) = (−3·std(w), 3·std(w)) (the authors' initialisation)."""
    s = 3.0 * float(w.detach().std())
    return _nonempty(-s, s)


def init_activation_interval(x: torch.Tensor) -> tuple[float, float]:
    """(l, u) = (min(x), 3·std(x)/sqrt(1 − 2/π)) on the first batch (the authors' initialisation)."""
    x = x.detach()
    return _nonempty(float(x.min()), float(x.std() / HALF_NORMAL_STD * 3.0))


def hutchinson_trace(
    grads: Sequence[torch.Tensor],
    params: Sequence[torch.Tensor],
    max_iter: int = 50,
    tol: float = 1e-3,
    generator: torch.Generator | None = None,
) -> list[float]:
    """Samples v^T H v of Hutchinson's estimator (Rademacher v) until the running mean changes by less than
    ``tol`` (relative) or ``max_iter`` samples; ``grads`` must carry a graph (``backward(create_graph=True)``).
    Returns the samples (their mean estimates Tr(H)); the stopping rule is the one the authors' code uses."""
    samples: list[float] = []
    trace = 0.0
    for _ in range(max_iter):
        vs = [_rademacher(p, generator) for p in params]
        hv = torch.autograd.grad(grads, params, grad_outputs=vs, only_inputs=True, retain_graph=True)
        samples.append(float(sum((h * v).sum() for h, v in zip(hv, vs))))
        mean = sum(samples) / len(samples)
        if abs(mean - trace) / (trace + 1e-6) < tol:
            return samples
        trace = mean
    return samples


def _rademacher(p: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """±1 with probability 1/2 each, shaped like ``p`` (drawn as ``randint_like(p, 2)`` with 0 mapped to −1)."""
    v = torch.empty_like(p).random_(0, 2, generator=generator)
    return v.masked_fill_(v == 0, -1.0)


def hessian_delta(trace_mean: float, numel: int, grad: torch.Tensor) -> float:
    """δ of one batch (Sec. 3.3): average Hessian trace over 3·std of the gradient, Tr(H)/N / (3·std(g))."""
    return (trace_mean / numel) / (float(grad.detach().std()) * 3.0)


def estimate_deltas(
    forward_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    capture: Callable[[], tuple[list[torch.Tensor], list[torch.Tensor]]],
    *,
    max_iter: int = 50,
    tol: float = 1e-3,
    generator: torch.Generator | None = None,
) -> tuple[list[float], list[float]]:
    """δ for every activation and weight discretiser, averaged over ``batches`` and clipped at 0.

    ``forward_loss(x, y)`` runs the model with the discretisers' outputs retained (their ``.grad`` kept);
    ``capture()`` returns them afterwards as (activations, weights), in layer order. Per batch the activation
    traces come first and then the weight traces, layer by layer (the authors' order, so their random probes
    and ours agree under the same seed)."""
    acc_a: list[float] = []
    acc_w: list[float] = []
    for x, y in batches:
        loss = forward_loss(x, y)
        acts, weights = capture()
        for t in (*acts, *weights):
            t.grad = None
        loss.backward(create_graph=True)
        for acc, ts in ((acc_a, acts), (acc_w, weights)):
            if not acc:
                acc.extend([0.0] * len(ts))
            grads = [t.grad for t in ts]
            for i, (t, g) in enumerate(zip(ts, grads)):
                samples = hutchinson_trace([g], [t], max_iter=max_iter, tol=tol, generator=generator)
                acc[i] += hessian_delta(sum(samples) / len(samples), t.numel(), g)
    n = max(len(batches), 1)
    return [max(v / n, 0.0) for v in acc_a], [max(v / n, 0.0) for v in acc_w]
