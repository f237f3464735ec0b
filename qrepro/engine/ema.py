"""Exponential moving average of parameters and buffers (evaluated instead of the raw weights when enabled)."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float = 0.9999) -> None:
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        # multi-tensor kernels: a handful of launches per step instead of one per tensor
        pairs = list(zip(self.module.state_dict().values(), model.state_dict().values()))
        floats = [(e, m) for e, m in pairs if e.dtype.is_floating_point]
        others = [(e, m) for e, m in pairs if not e.dtype.is_floating_point]
        if floats:
            torch._foreach_lerp_([e for e, _ in floats], [m.detach() for _, m in floats], 1.0 - self.decay)
        if others:
            torch._foreach_copy_([e for e, _ in others], [m for _, m in others])

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, sd: dict) -> None:
        self.module.load_state_dict(sd)
