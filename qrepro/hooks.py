"""Hooks: the contract through which methods and optimizers extend the training loop.

Core layer: imports nothing of qrepro.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class Context:
    """What hooks can see. Filled in by the trainer."""

    model: nn.Module
    optimizer: Any = None
    scheduler: Any = None
    data: Any = None
    sample_batch: tuple[torch.Tensor, torch.Tensor] | None = None
    loss: torch.Tensor | None = None
    epoch: int = 0
    step: int = 0  # global optimizer step
    logger: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


class Hook:
    """Base class; override what you need. ``on_epoch_end`` returns values for the record curves."""

    def on_train_start(self, ctx: Context) -> None:
        pass

    def on_step_end(self, ctx: Context, step: int) -> None:
        pass

    def on_epoch_end(self, ctx: Context, epoch: int) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
