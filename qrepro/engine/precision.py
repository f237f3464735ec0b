"""Mixed precision and memory layout of the training step: ``trainer.amp=off|bf16|fp16``, ``trainer.channels_last``.

``amp``: the forward pass runs under ``torch.autocast`` (bfloat16 or float16; ``fp16`` adds dynamic loss scaling
with a checkpointed ``GradScaler``) while the fake-quantizers run outside it on float32 copies of their inputs
(``qrepro.quant.layers``). ``channels_last``: the model's 4-d tensors and the input batches in NHWC layout. Both
default to off, so the paper cells train in float32 as the papers did; what they keep in float32, what they change
and the measurements: docs/speed.md, section 7.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from qrepro.errors import QreproError

AMP_MODES = ("off", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_ALIASES = {"none": "off", "false": "off", "no": "off", "fp32": "off", "float32": "off"}
_ALIASES |= {"bfloat16": "bf16", "float16": "fp16", "half": "fp16"}


def amp_mode(setting: Any) -> str:
    """``trainer.amp`` as one of ``off | bf16 | fp16`` (YAML's ``off``/``false``/null read as off)."""
    s = str(setting).strip().lower()  # None and False read "none" and "false"
    s = _ALIASES.get(s, s)
    if s not in AMP_MODES:
        raise QreproError(f"trainer.amp={setting!r} is not valid; use one of: {', '.join(AMP_MODES)}")
    return s


def autocast_factory(mode: str, device: torch.device) -> Callable[[], AbstractContextManager] | None:
    """A zero-argument factory of the autocast context for ``mode`` on ``device`` (None for ``off``)."""
    dtype = _DTYPES.get(amp_mode(mode))
    if dtype is None:
        return None
    dev = torch.device(device).type
    if dev not in ("cuda", "cpu"):
        raise QreproError(f"trainer.amp={mode} is supported on cuda and cpu, not {dev}; use trainer.amp=off")

    def factory() -> AbstractContextManager:
        return torch.autocast(device_type=dev, dtype=dtype)

    return factory


def make_scaler(mode: str, device: torch.device) -> Any:
    """``torch.amp.GradScaler`` for ``fp16`` (dynamic loss scaling), None otherwise."""
    if amp_mode(mode) != "fp16":
        return None
    return torch.amp.GradScaler(torch.device(device).type)


def check_amp(mode: str, optimizer: Any) -> None:
    """Refuse combinations that cannot work (one line)."""
    if amp_mode(mode) == "fp16" and getattr(optimizer, "needs_closure", False):
        raise QreproError(
            f"trainer.amp=fp16 needs loss scaling, which optimizer {type(optimizer).__name__} (a closure in step(), "
            "e.g. ASAM) does not support; use trainer.amp=bf16 or off"
        )


def channels_last(model: nn.Module) -> nn.Module:
    """The model's 4-d parameters and buffers in channels-last layout (in place; same Parameter objects)."""
    return model.to(memory_format=torch.channels_last)


def input_transform(channels_last_on: bool) -> Callable[[torch.Tensor], torch.Tensor] | None:
    if not channels_last_on:
        return None

    def to_cl(x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x

    return to_cl
