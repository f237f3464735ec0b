"""Full precision: no layer is quantized."""

from __future__ import annotations

from qrepro.quant.methods import METHODS, Method


@METHODS.register("fp")
def build_fp(w_bits: int = 32, a_bits: int = 32) -> Method:
    return Method(name="fp", quantize_layer=lambda info: None, uses_bits=False)
