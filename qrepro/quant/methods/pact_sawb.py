"""``quantizer=pact_sawb`` / ``pact_sawb_fpsc``: PACT with SAWB weights (Choi et al., "Bridging the accuracy gap for
2-bit quantized neural networks (QNN)", 2018). Maths: ``qrepro.quant.sawb``; docs/pact.md.

Composition: the ``pact`` method (``qrepro.quant.methods.sat``: PACT activations with the original gradient, first
conv and last FC as ``first_last`` says, full precision by default as PACT trains) with each quantized layer's weight
quantizer replaced by :class:`SAWBWeight`. ``pact_sawb_fpsc`` also keeps the shortcut convolutions (1x1 downsampling
convs of residual blocks, named ``*shortcut*`` / ``*downsample*``) full precision, weights and input ("FPSC").
"""

from __future__ import annotations

import fnmatch
from typing import Any

import torch
from torch import nn

from qrepro.errors import QreproError
from qrepro.quant import sawb as F
from qrepro.quant.methods import FP_BITS, METHODS, BitsQuantizer, LayerInfo, Method, check_bits
from qrepro.quant.methods.sat import build_pact

SHORTCUT_PATTERNS = ("*shortcut*", "*downsample*")


class SAWBWeight(BitsQuantizer):
    """w -> SAWB-quantized w (alpha from the current weights' statistics at every step)."""

    def __init__(self, bits: int) -> None:
        F._coeffs(bits)  # validates
        super().__init__(bits)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return F.sawb_quantize(w, self.bits)


def _build(
    name: str, w_bits: int, a_bits: int, first_last: str, alpha_init: float, signed_act: Any, fpsc: bool, shortcut: Any
) -> Method:
    check_bits(name, w_bits, a_bits, tuple(sorted(F.COEFFS)) + (FP_BITS,))
    if first_last == "8bit":
        raise QreproError(
            f"quantizer.first_last=8bit is not available for {name} (SAWB fits 1..5 bits); use fp or same"
        )
    pact = dict(scheme="original", rescale="none", cg=False, first_last=first_last, signed_act=signed_act)
    base = build_pact(w_bits, a_bits, alpha_init=alpha_init, alpha_init_last=alpha_init, **pact)
    pact_layer = base.quantize_layer
    patterns = [str(p) for p in shortcut]

    def quantize_layer(info: LayerInfo) -> tuple[nn.Module | None, nn.Module | None] | None:
        if fpsc and any(fnmatch.fnmatchcase(info.name, p) for p in patterns):
            return None
        got = pact_layer(info)
        if got is None:
            return None
        wq, aq = got
        return (SAWBWeight(wq.bits) if wq.bits != FP_BITS else None), aq

    base.name = name
    base.quantize_layer = quantize_layer
    base.options.update(fpsc=fpsc, shortcut_patterns=patterns)
    return base


@METHODS.register("pact_sawb")
def build_pact_sawb(
    w_bits: int, a_bits: int, *, first_last: str = "fp", alpha_init: float = 10.0, signed_act: Any = False
) -> Method:
    """PACT activations + SAWB weights; first/last layers full precision."""
    return _build("pact_sawb", w_bits, a_bits, first_last, alpha_init, signed_act, False, SHORTCUT_PATTERNS)


@METHODS.register("pact_sawb_fpsc")
def build_pact_sawb_fpsc(
    w_bits: int,
    a_bits: int,
    *,
    first_last: str = "fp",
    alpha_init: float = 10.0,
    signed_act: Any = False,
    shortcut_patterns: Any = SHORTCUT_PATTERNS,
) -> Method:
    """PACT-SAWB with full-precision shortcut convolutions (FPSC)."""
    return _build("pact_sawb_fpsc", w_bits, a_bits, first_last, alpha_init, signed_act, True, shortcut_patterns)
