"""DoReFa-Net as published (Zhou et al., "DoReFa-Net: Training low bitwidth convolutional neural networks with low
bitwidth gradients", 2016), weights and activations (gradients stay 32-bit, as in the tables that quote it).

Functional maths only; the quantizer modules live in ``qrepro.quant.methods.dorefanet``, the method in
docs/dorefanet.md.
"""

from __future__ import annotations

import torch

from qrepro.errors import QreproError
from qrepro.quant.sat import dorefa_weight, quantize_k
from qrepro.quant.ste import clip, value_ste

FP_BITS = 32


def _check(bits: int, what: str) -> None:
    if bits != FP_BITS and not (isinstance(bits, int) and 1 <= bits <= 16):
        raise QreproError(f"DoReFa-Net {what} bit-width {bits!r} is invalid; use 1..16 or 32 (= not quantized)")


def weight(w: torch.Tensor, k: int) -> torch.Tensor:
    """The k-bit DoReFa-Net weight, w at k = 32.

    k > 1: 2·quantize_k(tanh(w)/(2 max|tanh(w)|) + 1/2) - 1, the max in the graph as in the authors' code (this is
    ``qrepro.quant.sat.dorefa_weight`` with the ``original`` levels). k = 1: sign(w)·E(|w|), E detached and the sign
    straight-through (d/dw = 1), sign(0) = 0 as tf.sign in the authors' code."""
    _check(k, "weight")
    if k == FP_BITS:
        return w
    if k == 1:
        e = w.detach().abs().mean()
        return value_ste(w, torch.sign(w) * e)
    return dorefa_weight(w, k, "original")


def activation(x: torch.Tensor, k: int) -> torch.Tensor:
    """quantize_k(clip(x, 0, 1)), the fixed clip of the network's bounded activation (no learned clip, unlike
    PACT), gradient 1 strictly inside (0, 1) and 0 outside; k = 32 only clips."""
    _check(k, "activation")
    xc = clip(x, x.new_zeros(()), x.new_ones(()))
    return xc if k == FP_BITS else quantize_k(xc, k)
