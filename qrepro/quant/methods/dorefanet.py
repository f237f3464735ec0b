"""``quantizer=dorefanet``: DoReFa-Net as published (Zhou et al., 2016).

Maths: ``qrepro.quant.dorefanet``; docs/dorefanet.md.

Distinct from ``quantizer=dorefa`` (SAT's ablation: DoReFa weights with PACT activations): here the activations
are clipped to the fixed range [0, 1] and rounded to k bits, with nothing learned.

Policy: every conv/linear weight tanh-normalised k-bit (1 bit: sign(w)·E|w|), every layer input clipped to [0, 1]
and k-bit; the first conv and the last FC full precision, weights and input (``first_last: fp``: the DoReFa-Net
paper keeps them full precision, and the tables that quote DoReFa-Net take its numbers from the PACT paper, which
does the same), or at the network's bit-widths (``same``; the first conv's input, the image, is never quantized).
"""

from __future__ import annotations

import torch
from torch import nn

from qrepro.quant import dorefanet as F
from qrepro.quant.methods import FP_BITS, METHODS, BitsQuantizer, LayerInfo, Method, check_bits, check_choice

SUPPORTED_BITS = (1, 2, 3, 4, 5, 6, 7, 8, FP_BITS)
FIRST_LAST = ("fp", "same")


class DoReFaWeight(BitsQuantizer):
    """w -> the k-bit DoReFa-Net weight."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return F.weight(w, self.bits)


class DoReFaActivation(BitsQuantizer):
    """x -> quantize_k(clip(x, 0, 1)) (no parameters)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.float16, torch.bfloat16):  # fake-quant arithmetic in float32 (exact rounding)
            return F.activation(x.float(), self.bits).to(x.dtype)
        return F.activation(x, self.bits)


@METHODS.register("dorefanet")
def build_dorefanet(w_bits: int, a_bits: int, *, first_last: str = "fp") -> Method:
    """DoReFa-Net weights and activations (32-bit gradients); first/last layers full precision by default."""
    check_bits("dorefanet", w_bits, a_bits, SUPPORTED_BITS)
    check_choice("first_last", first_last, FIRST_LAST, "dorefanet")

    def quantize_layer(info: LayerInfo) -> tuple[nn.Module | None, nn.Module | None] | None:
        if info.role in ("first", "last") and first_last == "fp":
            return None
        wq = DoReFaWeight(info.w_bits) if info.w_bits != FP_BITS else None
        aq = DoReFaActivation(info.a_bits) if info.a_bits != FP_BITS and info.role != "first" else None
        return wq, aq

    return Method(name="dorefanet", quantize_layer=quantize_layer, options=dict(first_last=first_last))
