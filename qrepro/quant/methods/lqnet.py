"""LQ-Net (Zhang et al., "LQ-Nets: Learned Quantization for Highly Accurate and Compact Deep Neural Networks",
ECCV 2018): learned quantizer bases fitted by quantization error minimisation (QEM). Maths: ``qrepro.quant.lqnet``;
equations, when QEM runs and the deviations: docs/lqnet.md.

Weights: one K-bit basis per output channel, codes in {-1, 1}^K; layer inputs: one basis per layer, codes in
{0, 1}^K; straight-through gradients. Training forwards gather per-level statistics in buffers and the
:class:`LQNetQEM` hook moves the bases after every optimizer step. First conv and last FC full precision.
"""

from __future__ import annotations

import torch
from torch import nn

from qrepro.errors import QreproError
from qrepro.hooks import Hook
from qrepro.quant import lqnet as lq
from qrepro.quant import ste
from qrepro.quant.layers import quantized_layers
from qrepro.quant.methods import FP_BITS, METHODS, LayerInfo, Method, builder_options, check_bits, check_choice

SUPPORTED_BITS = (1, 2, 3, 4, FP_BITS)


class _LQNetQuantizer(nn.Module):
    """Common state: the basis [C, K] (C = 1 per tensor), the code table, the QEM statistics."""

    signed: bool

    def __init__(self, bits: int, basis: torch.Tensor, *, momentum: float, ridge: float) -> None:
        super().__init__()
        self.bits, self.momentum, self.ridge = bits, momentum, ridge
        self.register_buffer("basis", basis.float())  # [C, K]; persistent: a trained model keeps its quantizer
        self.register_buffer("codes", lq.codes(bits, self.signed), persistent=False)
        levels = 2**bits
        self.register_buffer("qem_count", torch.zeros(basis.shape[0], levels), persistent=False)
        self.register_buffer("qem_sum", torch.zeros(basis.shape[0], levels), persistent=False)

    def _quantize(self, x: torch.Tensor, per_tensor: bool) -> torch.Tensor:
        """Nearest level of every entry of ``x`` (no gradient): per row of ``x`` [C, N] (one basis per channel), or
        over the whole tensor, any shape, with the one basis [1, K]. In training, QEM statistics accumulate."""
        levels, _ = lq.sorted_levels(self.basis.to(x.dtype), self.codes)
        if per_tensor:
            levels = levels[0]  # [L]: the tensor keeps its shape and memory layout (no reshape to a row)
        x = x.detach()
        if self.training:
            n, s = lq.level_stats(x, levels)
            self.qem_count.add_(n.to(self.qem_count.dtype).reshape(self.qem_count.shape))
            self.qem_sum.add_(s.to(self.qem_sum.dtype).reshape(self.qem_sum.shape))
        return lq.quantize(x, levels)

    def qem_step(self) -> None:
        """One QEM basis update from the statistics gathered since the last one (float64 solve)."""
        qem_update([self])

    def extra_repr(self) -> str:
        return f"bits={self.bits}, channels={self.basis.shape[0]}, momentum={self.momentum}, ridge={self.ridge}"


class LQNetWeightQuantizer(_LQNetQuantizer):
    """Per-output-channel basis, codes {-1, 1}^K, identity (straight-through) gradient."""

    signed = True

    def __init__(self, bits: int, out_channels: int, fan: int, *, momentum: float = 0.9, ridge: float = 1e-4):
        basis = lq.init_basis(bits, True, fan).expand(out_channels, bits).clone()
        super().__init__(bits, basis, momentum=momentum, ridge=ridge)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        q = self._quantize(w.reshape(w.shape[0], -1), per_tensor=False).reshape(w.shape)
        return w + (q - w).detach()


class LQNetActQuantizer(_LQNetQuantizer):
    """Per-layer basis, codes {0, 1}^K; gradient 1 up to the largest level (inclusive), 0 above it."""

    signed = False

    def __init__(self, bits: int, *, momentum: float = 0.9, ridge: float = 1e-4) -> None:
        super().__init__(bits, lq.init_basis(bits, False)[None], momentum=momentum, ridge=ridge)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # per tensor on x as it is: a reshape to one row would read a channels-last tensor (the layout Inductor
        # gives convolution outputs on CPU) element by element in logical order, several times slower
        q = self._quantize(x, per_tensor=True)
        top = self.basis.clamp(min=0).sum().to(x.dtype)  # the largest level (codes {0, 1}); a buffer: no gradient
        xc = ste.minimum(x, top)  # where(x <= top, x, top) without a boolean mask saved for the backward pass
        return xc + (q - xc).detach()


@torch.no_grad()
def qem_update(quantizers: list[_LQNetQuantizer]) -> None:
    """One QEM update of each quantizer's basis from its statistics, then the statistics are cleared.

    The quantizers must share bits, codes, ridge and momentum (``LQNetQEM`` groups them): their bases [C_i, K] and
    statistics are stacked into one batch of K x K systems, so a step costs a few tensor operations for the whole
    network instead of a dozen per quantizer. Each basis row's system is the one it would have alone."""
    first = quantizers[0]
    basis = torch.cat([q.basis for q in quantizers]).double()
    counts = torch.cat([q.qem_count for q in quantizers]).double()
    sums = torch.cat([q.qem_sum for q in quantizers]).double()
    _, order = lq.sorted_levels(basis, first.codes)
    btb, bx = lq.normal_equations(counts, sums, order, first.codes)
    new = lq.qem_basis(btb, bx, basis, first.ridge)
    moved = first.momentum * basis + (1 - first.momentum) * new
    for q, b in zip(quantizers, moved.split([q.basis.shape[0] for q in quantizers])):
        q.basis.copy_(b)
    torch._foreach_zero_([t for q in quantizers for t in (q.qem_count, q.qem_sum)])


class LQNetQEM(Hook):
    """After every optimizer step: one QEM update of every LQ-Net basis (weights and activations), batched over
    the quantizers that share bits, signedness, ridge and momentum."""

    def on_step_end(self, ctx, step: int) -> None:
        groups: dict[tuple, list[_LQNetQuantizer]] = {}
        for _, layer in quantized_layers(ctx.model):
            for q in (layer.wq, layer.aq):
                if isinstance(q, _LQNetQuantizer):
                    key = (q.bits, q.signed, q.ridge, q.momentum, q.basis.device, q.basis.dtype)
                    groups.setdefault(key, []).append(q)
        for qs in groups.values():
            qem_update(qs)


@METHODS.register("lqnet")
def build_lqnet(
    w_bits: int,
    a_bits: int,
    *,
    first_last: str = "fp",
    momentum: float = 0.9,
    w_ridge: float = 1e-4,
    a_ridge: float = 1e-4,
) -> Method:
    """LQ-Net. first_last: fp (paper) | same (the network's bit-widths there too; the first layer's input is
    then quantized by an activation basis). momentum: moving average of the QEM basis (authors: 0.9).
    w_ridge / a_ridge: the eps of ``(B B^T + eps I)^{-1} (B x + eps v)`` (authors: 1e-4 for weights; their
    activation solve has none and fails when a code goes unused, so ours keeps a small one)."""
    options = builder_options(locals())
    check_bits("lqnet", w_bits, a_bits, SUPPORTED_BITS)
    check_choice("first_last", first_last, ("fp", "same"), "lqnet")
    if not 0.0 <= momentum < 1.0:
        raise QreproError(f"quantizer.momentum={momentum} must be in [0, 1) (authors: 0.9)")
    for name, r in (("w_ridge", w_ridge), ("a_ridge", a_ridge)):
        if not r > 0:
            raise QreproError(f"quantizer.{name}={r} must be > 0 (it keeps the QEM solve regular; authors: 1e-4)")

    def quantize_layer(info: LayerInfo) -> tuple[nn.Module | None, nn.Module | None] | None:
        if info.role in ("first", "last") and first_last == "fp":
            return None
        m = info.module
        wq = aq = None
        if w_bits != FP_BITS:
            w = m.weight
            fan = w[0].numel() // w.shape[1] * w.shape[0] if w.dim() == 4 else w.shape[0]  # k*k*out (authors)
            wq = LQNetWeightQuantizer(w_bits, w.shape[0], fan, momentum=momentum, ridge=w_ridge)
        if a_bits != FP_BITS:
            aq = LQNetActQuantizer(a_bits, momentum=momentum, ridge=a_ridge)
        return wq, aq

    return Method(name="lqnet", quantize_layer=quantize_layer, hooks=[LQNetQEM()], options=options)
