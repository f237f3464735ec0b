"""The in-process API: a run built exactly as ``python -m qrepro.train`` builds it, stepped one batch at a time.

```python
from qrepro.api import build
run = build(["+experiment=apot_resnet20_cifar10_w2a2_script", "init_from=...", "trainer.device=cpu"],
            dtype=torch.float64)
run.cfg, run.model, run.optimizer, run.scheduler   # exactly as the trainer builds them
loss = run.step(x, y)   # one training step exactly as the trainer takes it
```

``run.step`` is the trainer's own step (``qrepro.engine.loop.train_step``): forward, loss and the method's
regularizer, backward, the optimizer step (with the closure of two-pass optimizers such as ASAM), the
optimizer's and method's hooks (e.g. TR transition counting), the LR schedule and EMA, over
``trainer.accumulate`` micro-batches when the config sets it. The first call first
runs the hooks' ``on_train_start`` on that batch, as the trainer does on its first batch (data-dependent
initialisation such as TR's scale calibration). The parity harness (``python -m qrepro.parity``) and notebooks
use this; its shape is stable.

``build_members(overrides, K, dtype)`` builds the runs ``seed=S..S+K-1`` (each exactly as ``build``) as one batch of
members (``trainer.members``): ``members.step([(x0, y0), ...])`` steps all of them in one batched computation and
``members.runs[i]`` is member i's ``Run`` (the batching: qrepro/engine/members.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from qrepro.builders import Components, build_components, build_data_from_cfg, compose, seed_everything, select_device
from qrepro.config import key_of
from qrepro.engine.fast import make_forward_loss
from qrepro.engine.loop import evaluate, start_training, train_step
from qrepro.engine.members import BatchedStep, MemberSlot, RngState, check_python_state
from qrepro.hooks import Context

__all__ = ["Members", "Run", "build", "build_members"]


@dataclass
class Run(Components):
    """One run's components (``cfg``, ``model``, ``optimizer``, ``scheduler``, ...) and its training step."""

    dtype: torch.dtype | None = None
    ctx: Context | None = None
    _forward_loss: Any = field(default=None, repr=False)

    def _prepare(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.to(self.device)
        if self.dtype is not None and x.is_floating_point():
            x = x.to(self.dtype)
        return x, y.to(self.device)

    def start(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """The trainer's start of training on its first batch: hooks' ``on_train_start``, then EMA copies the
        (possibly just initialised) model. ``step`` calls this itself on its first call."""
        batch = self._prepare(x, y)
        self.ctx = Context(self.model, self.optimizer, self.scheduler, self.data, sample_batch=batch)
        start_training(self.ctx, self.hooks, self.ema)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One training step on the batch ``(x, y)``; returns the step's loss (detached)."""
        if self.ctx is None:
            self.start(x, y)
        x, y = self._prepare(x, y)
        self.model.train()
        if self._forward_loss is None:
            self._forward_loss = make_forward_loss(self.model, self.loss_fn, self.method.regularizer)
        self.ctx.epoch = self.ctx.step // max(1, self.steps_per_epoch)
        loss, _ = train_step(
            self.model,
            self._forward_loss,
            self.optimizer,
            self.scheduler,
            x,
            y,
            ctx=self.ctx,
            hooks=self.hooks,
            ema=self.ema,
            accumulate=int(self.cfg.trainer.get("accumulate") or 1),
        )
        return loss

    def end_epoch(self) -> dict[str, float]:
        """The hooks' end-of-epoch work (e.g. per-epoch schedules of TR optimizers), as the trainer runs it."""
        if self.ctx is None:
            return {}
        return {k: v for h in self.hooks for k, v in (h.on_epoch_end(self.ctx, self.ctx.epoch) or {}).items()}

    @torch.no_grad()
    def evaluate(self, loader: Any = None) -> dict[str, float]:
        """Top-1/top-5 on ``loader`` (default: the run's test set), with the EMA model when the run has one."""
        loader = loader if loader is not None else self.data.test
        model = self.ema.module if self.ema is not None else self.model
        return evaluate(model, (self._prepare(x, y) for x, y in loader))


def build(
    overrides: Sequence[str],
    dtype: torch.dtype | None = None,
    *,
    load_data: bool = True,
    num_classes: int | None = None,
    steps_per_epoch: int | None = None,
    seed: bool = True,
) -> Run:
    """Compose ``overrides`` as the command line would and build the run as the trainer does.

    ``dtype``: convert the model (float64 for parity checks); inputs given to ``step`` are converted too.
    ``load_data=False`` skips the dataset (then ``num_classes`` and ``steps_per_epoch``, which sizes the
    schedule, are required). ``seed``: seed the RNGs with ``cfg.seed`` first, as the trainer does.
    """
    cfg = compose(list(overrides))
    device = select_device(cfg.trainer.device)
    if seed:
        seed_everything(int(cfg.seed))
    data = build_data_from_cfg(cfg, device) if load_data else None
    comp = build_components(
        cfg, device, data=data, num_classes=num_classes, steps_per_epoch=steps_per_epoch, dtype=dtype
    )
    return Run(**{f.name: getattr(comp, f.name) for f in fields(comp)}, dtype=dtype)


# ------------------------------------------------------------------------------------------ batched members
@dataclass
class Members:
    """K runs (``qrepro.api.Run`` each, built exactly as ``qrepro.api.build`` with seed S+i) stepped as one batch.

    ``step([(x0, y0), ..., (xK-1, yK-1)])`` takes one training step of every member on its own batch (the first
    call first runs each member's ``on_train_start`` on its batch, as the trainer does). ``runs[i]`` is member i.
    """

    runs: list[Any]
    step_fn: BatchedStep | None = None
    rngs: list[RngState] = field(default_factory=list)

    def _start(self, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for r, rng, (x, y) in zip(self.runs, self.rngs, batches):
            with rng:
                r.start(x, y)
        slots = [
            MemberSlot(r.model, r.optimizer, r.scheduler, r.hooks, r.ema, r.ctx, rng)
            for r, rng in zip(self.runs, self.rngs)
        ]
        check_python_state([r.model for r in self.runs])
        r0 = self.runs[0]
        accumulate = int(r0.cfg.trainer.get("accumulate") or 1)
        self.step_fn = BatchedStep(slots, r0.loss_fn, r0.method.regularizer, accumulate=accumulate)

    def step(self, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        if len(batches) != len(self.runs):
            raise ValueError(f"step needs one batch per member ({len(self.runs)}), got {len(batches)}")
        if self.step_fn is None:
            self._start(batches)
        prepared = [r._prepare(x, y) for r, (x, y) in zip(self.runs, batches)]
        for r in self.runs:
            r.ctx.epoch = r.ctx.step // max(1, r.steps_per_epoch)
        return self.step_fn(torch.stack([x for x, _ in prepared]), torch.stack([y for _, y in prepared]))[0]

    def end_epoch(self) -> list[dict[str, float]]:
        out = []
        for r, rng in zip(self.runs, self.rngs):
            with rng:
                out.append(r.end_epoch())
        return out


def build_members(overrides: Sequence[str], members: int, dtype: torch.dtype | None = None, **kw: Any) -> Members:
    """``qrepro.api.build(overrides + [f"seed={S + i}"], dtype, **kw)`` for i < ``members`` (S: the composed seed), as
    one batch."""
    base = int(compose([o for o in overrides if not o.startswith("trainer.members=")]).seed)
    runs, rngs = [], []
    for i in range(members):
        ov = [o for o in overrides if key_of(o) not in ("seed", "trainer.members")] + [f"seed={base + i}"]
        r = build(ov, dtype, **kw)
        rng = RngState(r.device)
        rng.capture()
        runs.append(r)
        rngs.append(rng)
    return Members(runs, rngs=rngs)
