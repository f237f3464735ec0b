"""Atomic checkpoints, strict loading with quantizer-aware exceptions, and converters for foreign formats."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qrepro.errors import QreproError
from qrepro.quant.layers import is_quantizer_param

# fn(state_dict) -> converted state_dict, or None when it does not recognise the format
Converter = Callable[[dict[str, torch.Tensor]], "dict[str, torch.Tensor] | None"]
_CONVERTERS: list[tuple[str, Converter]] = []


def register_converter(name: str) -> Callable[[Converter], Converter]:
    """Register a converter for a foreign checkpoint format (e.g. the APoT authors' release)."""

    def deco(fn: Converter) -> Converter:
        _CONVERTERS.append((name, fn))
        return fn

    return deco


def atomic_save(obj: Any, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint file; a missing or corrupt file is a one-line QreproError."""
    p = Path(path)
    if not p.is_file():
        raise QreproError(f"checkpoint {path} does not exist; check init_from=<path to a .pt/.pth file>")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch.load raises many types on a damaged file
        msg = str(e).splitlines()[0][:100] if str(e) else type(e).__name__
        if msg.startswith("Weights only load failed"):
            msg = "not a zip/pickle torch file, or it holds non-tensor objects"
        raise QreproError(f"checkpoint {path} is corrupt or not a torch checkpoint ({msg}); re-create it") from None
    if not isinstance(obj, dict):
        raise QreproError(f"checkpoint {path} holds a {type(obj).__name__}, expected a dict / state_dict")
    return obj


def extract_state_dict(obj: dict[str, Any]) -> tuple[dict[str, torch.Tensor], str]:
    """Our checkpoints ({'model': ...}), {'state_dict': ...} files, or a bare state_dict; then converters."""
    sd = obj
    for key in ("model", "state_dict"):
        if key in obj and isinstance(obj[key], dict):
            sd = obj[key]
            break
    if not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise QreproError("checkpoint has no state_dict (expected keys 'model' or 'state_dict' or a bare state_dict)")
    for name, conv in _CONVERTERS:
        out = conv(sd)
        if out is not None:
            return out, name
    return sd, "qrepro"


def load_model_state(model: nn.Module, sd: dict[str, torch.Tensor], strict: bool = True) -> list[str]:
    """Load ``sd`` into ``model``. Strict, except that quantizer-owned entries absent from ``sd`` (an FP checkpoint
    loaded into a quantized model) keep their initial values; returns those names."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    quant_missing = [k for k in missing if is_quantizer_param(k)]
    hard_missing = [k for k in missing if not is_quantizer_param(k)]
    if strict and (hard_missing or unexpected):
        parts = []
        if hard_missing:
            parts.append(f"missing {len(hard_missing)} keys (e.g. {hard_missing[:3]})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys (e.g. {unexpected[:3]})")
        raise QreproError(
            "checkpoint does not match the model: "
            + "; ".join(parts)
            + " — check model/quantizer, or init_strict=false"
        )
    for k, v in sd.items():
        if k in own and own[k].shape != v.shape:
            raise QreproError(f"checkpoint tensor {k} has shape {tuple(v.shape)}, model expects {tuple(own[k].shape)}")
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    return quant_missing
