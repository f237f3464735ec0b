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
        ef, mf, eo, mo = [], [], [], []
        for e, m in zip(self.module.state_dict().values(), model.state_dict().values()):
            if e.dtype.is_floating_point:
                ef.append(e)
                mf.append(m.detach())
            else:
                eo.append(e)
                mo.append(m)
        if ef:
            torch._foreach_lerp_(ef, mf, 1.0 - self.decay)
        if eo:
            torch._foreach_copy_(eo, mo)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, sd: dict) -> None:
        self.module.load_state_dict(sd)
