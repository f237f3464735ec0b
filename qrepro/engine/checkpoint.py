"""Atomic checkpoints, strict loading with quantizer-aware exceptions, and converters for foreign formats."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from qrepro.engine.fsio import atomic_write
from qrepro.errors import QreproError
from qrepro.quant.layers import is_quantizer_param
from qrepro.registry import CONVERTERS


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` through :func:`qrepro.engine.fsio.atomic_write`: readers never see a partial file."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def _load_reason(p: Path) -> str:
    """Why ``torch.load`` failed, in words (torch's own messages are internal: '(101)', 'pop from empty list')."""
    try:
        with open(p, "rb") as f:
            head = f.read(4)
    except OSError as oe:
        return f"unreadable: {oe.strerror or oe}"
    if not head:
        return "an empty file"
    if head.startswith(b"PK"):
        return "a truncated or damaged torch zip archive"
    if head[:1] == b"\x80":
        return "a damaged or non-tensor legacy pickle"
    return "not a torch checkpoint (neither a torch zip archive nor a pickle)"


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint file; a missing, directory, unreadable or corrupt file is a one-line QreproError."""
    p = Path(path)
    if p.is_dir():
        hint = next((c for c in (p / "checkpoints" / "last.pt", p / "last.pt") if c.is_file()), None)
        fix = f"use {hint}" if hint else "pass the .pt/.pth file inside it"
        raise QreproError(f"checkpoint {path} is a directory, not a checkpoint file; {fix}")
    if not p.is_file():
        raise QreproError(f"checkpoint {path} does not exist; check init_from=<path to a .pt/.pth file>")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except PermissionError:
        raise QreproError(f"checkpoint {path} is not readable (permission denied); fix its permissions") from None
    except Exception as e:  # noqa: BLE001 - torch.load raises many types on a damaged file
        if str(e).startswith("Weights only load failed"):
            reason = "a pickle holding non-tensor objects (only tensors and plain containers are loaded)"
        else:
            reason = _load_reason(p)
        raise QreproError(f"checkpoint {path} is corrupt: {reason}; re-create it") from None
    if not isinstance(obj, dict):
        raise QreproError(f"checkpoint {path} holds a {type(obj).__name__}, expected a dict / state_dict")
    return obj


def nonfinite_tensors(sd: dict[str, Any]) -> list[str]:
    """Names of floating-point tensors in ``sd`` (nested dicts searched) holding NaN or inf."""
    bad = []
    for k, v in sd.items():
        if isinstance(v, dict):
            bad += [f"{k}.{n}" for n in nonfinite_tensors(v)]
        elif isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all()):
            bad.append(k)
    return bad


def check_finite(sd: dict[str, Any], what: str) -> None:
    """Refuse a state_dict holding NaN/inf weights or statistics (e.g. BatchNorm ``running_var``)."""
    bad = nonfinite_tensors(sd)
    if bad:
        raise QreproError(
            f"{what} holds non-finite values (NaN/inf) in {len(bad)} tensor(s), e.g. {', '.join(bad[:3])}; "
            "it comes from a diverged run: use an earlier checkpoint"
        )


def extract_state_dict(obj: dict[str, Any]) -> tuple[dict[str, torch.Tensor], str]:
    """Our checkpoints ({'model': ...}), {'state_dict': ...} files, or a bare state_dict; then converters."""
    sd = next((obj[k] for k in ("model", "state_dict") if isinstance(obj.get(k), dict)), obj)
    if not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise QreproError("checkpoint has no state_dict (expected keys 'model' or 'state_dict' or a bare state_dict)")
    for name, conv in CONVERTERS:
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
    parts = [
        f"{what} {len(ks)} keys (e.g. {ks[:3]})"
        for what, ks in (("missing", hard_missing), ("unexpected", unexpected))
        if ks
    ]
    if strict and parts:
        raise QreproError(
            f"checkpoint does not match the model: {'; '.join(parts)} — check model/quantizer, or init_strict=false"
        )
    for k, v in sd.items():
        if k in own and own[k].shape != v.shape:
            raise QreproError(f"checkpoint tensor {k} has shape {tuple(v.shape)}, model expects {tuple(own[k].shape)}")
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    return quant_missing
