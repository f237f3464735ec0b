"""Quantization methods: one module per method, each registering a builder into ``METHODS``.

A method is a weight fake-quantizer + an activation fake-quantizer + a per-layer policy (composition);
see docs/architecture.md. Every module in this package is imported on first use, so adding a method is
one new file plus one ``configs/quantizer/<name>.yaml``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from qrepro.errors import QreproError
from qrepro.quant.layers import calibration_forward, quantized_layers
from qrepro.registry import Registry, import_submodules

METHODS = Registry("quantizer")

FP_BITS = 32
VALID_BITS = frozenset(range(1, 9)) | {FP_BITS}  # the bit-widths a precision config may name


@dataclass
class LayerInfo:
    """What a method sees of a layer when deciding how to quantize it."""

    name: str
    module: nn.Module
    role: str  # "first" | "last" | "middle"
    index: int
    is_depthwise: bool
    next_module: nn.Module | None
    w_bits: int
    a_bits: int


@dataclass
class Method:
    name: str
    quantize_layer: Callable[[LayerInfo], tuple[nn.Module | None, nn.Module | None] | None]
    regularizer: Callable[[nn.Module], torch.Tensor | None] | None = None
    # training loss replacing the trainer's cross-entropy, called as loss(logits, y, x) with the step's input
    # batch (e.g. distillation against a teacher on the same images); mark it with ``takes_input = True``
    loss: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    hooks: list[Any] = field(default_factory=list)
    w_bits: int = FP_BITS
    a_bits: int = FP_BITS
    options: dict[str, Any] = field(default_factory=dict)
    uses_bits: bool = True  # False: the method trains the same model whatever the bit budget (full precision)


class BitsQuantizer(nn.Module):
    """Base of a fake-quantizer whose only setting is its bit-width ``bits``."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = bits

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


def _load_all() -> None:
    import_submodules(__name__, __path__)


def check_bits(method: str, w_bits: int, a_bits: int, supported: Sequence[int]) -> None:
    """Raise a one-line QreproError if a bit-width is not supported by ``method``."""
    for what, b in (("weight", w_bits), ("activation", a_bits)):
        if b not in supported:
            sup = ", ".join(str(s) for s in supported)
            raise QreproError(
                f"{what} bit-width {b} is not supported by quantizer={method} (supported: {sup}); "
                f"choose another precision, e.g. precision=w4a4"
            )


def check_choice(option: str, value: Any, allowed: Sequence[str], method: str) -> None:
    """Raise a one-line QreproError if ``quantizer.<option>`` is not one of ``allowed``."""
    if value not in allowed:
        raise QreproError(
            f"quantizer.{option}={value!r} is not valid for quantizer={method}; choose one of: {', '.join(allowed)}"
        )


def builder_options(scope: dict[str, Any]) -> dict[str, Any]:
    """A builder's keyword options from its ``locals()`` taken first thing (before it assigns anything)."""
    return {k: v for k, v in scope.items() if k not in ("name", "w_bits", "a_bits")}


@torch.no_grad()
def init_from_batch(
    model: nn.Module,
    x: torch.Tensor | None,
    kind: type | tuple[type, ...],
    missing: str,
    error: type[Exception] = QreproError,
    restore: Callable[[str], bool] = lambda k: not k.endswith("initialized"),
) -> int:
    """Initialise every ``kind`` quantizer whose ``initialized`` buffer is false with its ``init_from``: weight
    quantizers from their layer's weight; input quantizers from their input in one training-mode forward of ``x``,
    each just before its layer runs (so later layers see quantized earlier ones). The buffers whose names pass
    ``restore`` (BatchNorm statistics, not the quantizers' own state) are put back; with input quantizers to set
    and no ``x``, raises ``error(missing)``. Returns the number of quantizers set."""
    layers = [layer for _, layer in quantized_layers(model)]
    weights = [lay for lay in layers if isinstance(lay.wq, kind) and not bool(lay.wq.initialized)]
    for layer in weights:
        layer.wq.init_from(layer.weight)
    todo = [lay for lay in layers if isinstance(lay.aq, kind) and not bool(lay.aq.initialized)]
    if not todo:
        return len(weights)
    if x is None:
        raise error(missing)

    def pre_hook(layer: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        if not bool(layer.aq.initialized):
            layer.aq.init_from(args[0])

    calibration_forward(model, x, todo, pre_hook, restore=restore)
    return len(weights) + len(todo)


def build_method(name: str, w_bits: int, a_bits: int, **options: Any) -> Method:
    """Build the registered method ``name`` for a (w_bits, a_bits) budget."""
    _load_all()
    builder = METHODS.get(name)
    try:
        method = builder(w_bits, a_bits, **options)
    except TypeError as e:  # unknown option names from the config
        why = str(e).split(") ", 1)[-1]  # "_build() got an unexpected keyword argument 'x'" -> the reason
        raise QreproError(f"bad options for quantizer={name}: {why}; see configs/quantizer/{name}.yaml") from None
    method.w_bits, method.a_bits = w_bits, a_bits
    return method


def method_names() -> list[str]:
    _load_all()
    return METHODS.names()
