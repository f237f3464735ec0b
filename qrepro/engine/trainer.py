"""``fit``: the epoch loop of train / evaluate; everything else a run does is a callback
(qrepro/engine/callbacks.py: NaN guard, checkpoints, console, logger, record).

One loop trains K >= 1 trainers (``train_trainers``): K = 1 is a single run, whose epoch is
``train_one_epoch`` (:class:`SingleStep`); K > 1 are batched members (``trainer.members=K``), whose epoch is one
batched step over all of them (qrepro.engine.members.BatchedEpoch). The step strategy is the only difference:
each trainer keeps its own ``setup``, ``begin_epoch``, ``end_epoch`` and ``finish`` (hooks, EMA, NaN guard,
checkpoints, console, logger, record). Trainers that do not share an epoch (a batch killed between two members'
checkpoint writes, or one member already complete) are trained in cohorts: the trainers at the lowest epoch run
until they reach the next one, then the cohort grows. A trainer whose loss or weights become non-finite stops
(a diverged record) and the others go on without it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qrepro.engine import dist as qdist
from qrepro.engine.callbacks import Callback, Checkpointer, default_callbacks
from qrepro.engine.fast import compile_eval_forward
from qrepro.engine.loop import NonFiniteLoss, evaluate, start_training, train_one_epoch
from qrepro.errors import QreproError
from qrepro.hooks import Context, Hook


@dataclass
class FitResult:
    record: dict[str, Any]
    record_path: Path
    diverged: bool = False
    skipped: bool = False  # an earlier launch's record (complete or diverged) returned as is


@dataclass
class Fit:
    """Everything ``fit`` needs, as plain objects (the Hydra entry point builds it)."""

    model: nn.Module
    data: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loss_fn: Any
    epochs: int  # 0: evaluate the initialised model only (no training step, no checkpoint)
    run_dir: Path
    hooks: list[Hook] = field(default_factory=list)
    regularizer: Any = None
    ema: Any = None
    logger: Any = None
    record_base: dict[str, Any] = field(default_factory=dict)
    log_every: int = 50
    progress: bool = True
    resume: bool = False
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    train_model: nn.Module | None = None  # e.g. a DDP-wrapped view of ``model``
    forward_loss: Any = None  # compiled (x, y) -> (loss, correct), see qrepro.engine.fast
    eval_compile: str | None = None  # torch.compile mode for evaluation (None: eager)
    is_main: bool = True
    identity: dict[str, Any] | None = None  # qrepro.engine.rundir.identity: checked on resume, stored everywhere
    callbacks: list[Callback] | None = None  # None: default_callbacks(fit)
    scaler: Any = None  # torch.amp.GradScaler under trainer.amp=fp16 (checkpointed)
    accumulate: int = 1  # trainer.accumulate: micro-batches per optimizer step (qrepro.engine.loop.train_step)


@dataclass
class FitState:
    """What the loop and the callbacks share; restored from ``last.pt`` on resume."""

    epoch: int = 0  # epochs finished
    best: dict[str, Any] = field(default_factory=lambda: {"top1": -1.0, "top5": 0.0, "epoch": -1})
    is_best: bool = False  # the epoch just finished is a new best
    curves: dict[str, list] = field(default_factory=dict)
    wall_time_s: float = 0.0  # earlier segments of a resumed run
    train_images: int = 0  # over the whole run
    train_seconds: float = 0.0
    started: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S"))
    segments: int = 1
    status: str = "running"  # running | complete | diverged
    error: str | None = None
    segment_t0: float = field(default_factory=time.perf_counter)

    def total_wall(self) -> float:
        return self.wall_time_s + (time.perf_counter() - self.segment_t0)

    def metrics(self) -> dict[str, Any]:
        b, c = self.best, self.curves
        ok = b["epoch"] >= 0  # epoch 0: an evaluate-only run (the initial model)
        return {
            "best_top1": b["top1"] if ok else None,
            "best_top5": b["top5"] if ok else None,
            "best_epoch": b["epoch"] if ok else None,
            "last_top1": c["test_top1"][-1] if c.get("test_top1") else None,
            "last_top5": c["test_top5"][-1] if c.get("test_top5") else None,
            "epochs_done": len(c.get("epoch", [])),
        }


def _main_lr(optimizer: torch.optim.Optimizer) -> float:
    """The LR of the default parameter group (the one no tag rule matched), else of the largest group."""
    groups = optimizer.param_groups
    plain = [g for g in groups if not g.get("tags") and not g.get("fixed_lr")]
    g = plain[0] if plain else max(groups, key=lambda g: len(g["params"]))
    return float(g["lr"])


class Trainer:
    def __init__(self, f: Fit, *, label: str = "", rng: Any = None) -> None:
        self.f = f
        self.label = label  # a member's name in the batch's console lines ("seed=3")
        self.rng = rng if rng is not None else contextlib.nullcontext()  # a member's own RNG state (entered)
        self.state = FitState()
        self.callbacks = default_callbacks(f) if f.callbacks is None else list(f.callbacks)
        self.ctx: Context | None = None
        self.bar: Any = None
        self.record: dict[str, Any] = {}
        self.eval_model: nn.Module | None = None
        self.eval_forward: Any = None

    def _call(self, name: str, *args: Any) -> None:
        for cb in self.callbacks:
            getattr(cb, name)(self, *args)

    def setup(self) -> None:
        """Before the first epoch of this launch: callbacks' ``on_fit_start`` (a resumed run's state), the hooks'
        ``on_train_start`` on the first training batch, the EMA copy and the compiled evaluation forward."""
        f, st = self.f, self.state
        self._call("on_fit_start")  # restores a resumed run (Checkpointer)
        self.ctx = ctx = Context(
            model=f.model,
            optimizer=f.optimizer,
            scheduler=f.scheduler,
            data=f.data,
            sample_batch=next(iter(f.data.train)),
            logger=f.logger,
            epoch=st.epoch,
            step=st.epoch * len(f.data.train),
        )
        start_training(ctx, f.hooks, f.ema, fresh=st.epoch == 0)
        self.eval_model = f.ema.module if f.ema is not None else f.model
        self.eval_forward = None if f.eval_compile is None else compile_eval_forward(self.eval_model, f.eval_compile)

    def begin_epoch(self, epoch: int) -> float:
        """Start ``epoch`` (0-based): the loader's epoch, callbacks' ``on_epoch_start``; returns its start time."""
        t0 = time.perf_counter()
        self.ctx.epoch = epoch
        if hasattr(self.f.data.train, "set_epoch"):
            self.f.data.train.set_epoch(epoch)
        self._call("on_epoch_start", epoch)
        return t0

    def train_epoch(self, epoch: int) -> dict[str, float]:
        f = self.f
        return train_one_epoch(
            f.train_model or f.model,
            f.data.train,
            f.optimizer,
            f.scheduler,
            f.loss_fn,
            ctx=self.ctx,
            hooks=f.hooks,
            regularizer=f.regularizer,
            ema=f.ema,
            log_every=f.log_every,
            progress=self.bar,
            forward_loss=f.forward_loss,
            scaler=f.scaler,
            accumulate=f.accumulate,
        )

    def end_epoch(self, epoch: int, tr: dict[str, float], t0: float) -> None:
        """After ``epoch``'s training (``tr``: train_one_epoch's metrics): NaN guard, evaluation, the hooks'
        epoch-end values, the curves and the best epoch, then checkpoints, console and logger (callbacks)."""
        f, st, ctx = self.f, self.state, self.ctx
        qdist.sync_buffers(self.eval_model)  # DDP: rank 0's BN/quantizer statistics, i.e. the checkpointed ones
        self._call("on_train_epoch_end", epoch, tr)  # the NaN guard stops here
        lr = _main_lr(f.optimizer)
        ev = evaluate(self.eval_model, f.data.test, all_reduce=True, forward=self.eval_forward)
        extra = {k: v for h in f.hooks for k, v in (h.on_epoch_end(ctx, epoch) or {}).items()}
        row = {
            "epoch": epoch + 1,
            "train_loss": tr["train_loss"],
            "train_top1": tr["train_top1"],
            **ev,
            "lr": lr,
            "images_per_s": tr["images_per_s"],
            "epoch_s": time.perf_counter() - t0,  # training + evaluation + hooks (not the checkpoint write)
            "data_s": tr.get("data_seconds", 0.0),
            **extra,
        }
        for k, v in row.items():
            st.curves.setdefault(k, []).append(v)
        st.train_images += tr["images"]
        st.train_seconds += tr["seconds"]
        st.is_best = ev["test_top1"] > st.best["top1"]
        if st.is_best:
            st.best = {"top1": ev["test_top1"], "top5": ev["test_top5"], "epoch": epoch + 1}
        st.epoch = epoch + 1
        self._call("on_epoch_end", epoch, row)  # checkpoints, console line, logger

    def diverge(self, e: NonFiniteLoss) -> None:
        ck = next((cb for cb in self.callbacks if isinstance(cb, Checkpointer)), None)
        where = ck.last_good() if ck is not None else "no checkpoint callback"
        self.state.status = "diverged"
        self.state.error = f"{e}; stopped in epoch {self.state.epoch + 1}/{self.f.epochs}; {where}"

    def finish(self) -> FitResult:
        """Callbacks' ``on_fit_end`` (logger summary, record); a diverged run raises the one-line error."""
        self._call("on_fit_end")  # progress bar, logger summary, record
        if self.state.status == "diverged":
            raise QreproError(f"training diverged: {self.state.error}")
        return FitResult(self.record, Path(self.f.run_dir) / "record.json")

    def evaluate_only(self) -> None:
        """``epochs == 0``: the initialised model evaluated as it is (a pretrained FP row); best = last, epoch 0."""
        ev = evaluate(self.eval_model, self.f.data.test, all_reduce=True, forward=self.eval_forward)
        self.state.curves = {"epoch": [], "test_top1": [ev["test_top1"]], "test_top5": [ev["test_top5"]]}
        self.state.best = {"top1": ev["test_top1"], "top5": ev["test_top5"], "epoch": 0}

    def run(self) -> FitResult:
        """A single run: ``setup``, the epoch loop (``train_trainers`` with K = 1), ``finish``."""
        self.setup()
        try:
            if self.f.epochs == 0:
                self.evaluate_only()
            train_trainers([self], SingleStep, self.f.epochs)
        finally:
            if self.bar is not None:
                self.bar.close()
        return self.finish()


class SingleStep:
    """The step strategy of one trainer: its epoch is ``train_one_epoch`` (``train_step`` per batch)."""

    def __init__(self, trainers: Sequence[Trainer]) -> None:
        (self.trainer,) = trainers

    def epoch(self, epoch: int) -> list[dict[str, float] | NonFiniteLoss]:
        try:
            return [self.trainer.train_epoch(epoch)]
        except NonFiniteLoss as e:
            return [e]

    def release(self) -> None:
        return None


class Cohort:
    """Trainers at the same epoch and the step strategy that trains them (rebuilt when one leaves).

    ``make_step(trainers)`` builds the strategy: an object whose ``epoch(epoch)`` trains one epoch of every
    trainer and returns, per trainer, ``train_one_epoch``'s metrics or the ``NonFiniteLoss`` that stopped it, and
    whose ``release()`` gives the trainers their tensors back. ``done(trainer)`` is called as soon as a trainer
    stops (diverged here, or complete when the loop ends)."""

    def __init__(self, trainers: Sequence[Trainer], make_step: Callable, done: Callable[[Trainer], None]) -> None:
        self.trainers = list(trainers)
        self.make_step, self.done = make_step, done
        self.step: Any = None
        self._build()

    def _build(self) -> None:
        self.release()
        if self.trainers:
            self.step = self.make_step(self.trainers)

    def release(self) -> None:
        if self.step is not None:
            self.step.release()
            self.step = None

    def epoch(self, epoch: int) -> None:
        """Train every trainer of the cohort (all at ``epoch``) for one epoch, then each one's epoch end."""
        t0s = []
        for t in self.trainers:
            with t.rng:
                t0s.append(t.begin_epoch(epoch))
        gone = []
        for t, out, t0 in zip(self.trainers, self.step.epoch(epoch), t0s):
            if not isinstance(out, NonFiniteLoss):
                try:
                    with t.rng:
                        t.end_epoch(epoch, out, t0)
                    continue
                except NonFiniteLoss as e:
                    out = e
            t.diverge(out)
            self.done(t)
            gone.append(t)
        if gone:
            self.trainers = [t for t in self.trainers if t not in gone]
            self._build()


def train_trainers(
    trainers: Sequence[Trainer], make_step: Callable, epochs: int, done: Callable[[Trainer], None] | None = None
) -> None:
    """Train every trainer (each already ``setup``) to ``epochs``, in cohorts of trainers at the same epoch;
    each ends ``complete`` or ``diverged``, and ``done(trainer)`` is called when it does."""
    stop = done or (lambda t: None)

    def complete(ts: Sequence[Trainer]) -> None:
        for t in ts:
            t.state.status = "complete"
            stop(t)

    complete([t for t in trainers if t.state.epoch >= epochs])  # resumed after its last epoch: no record yet
    active = [t for t in trainers if t.state.epoch < epochs]
    while active:
        low = min(t.state.epoch for t in active)
        members = [t for t in active if t.state.epoch == low]
        nxt = min([t.state.epoch for t in active if t.state.epoch > low] + [epochs])
        if len(members) < len(active):
            print(
                f"members: {', '.join(t.label for t in members)} catch up from epoch {low} to {nxt} "
                f"before the batch of {len(active)} continues",
                flush=True,
            )
        cohort = Cohort(members, make_step, stop)
        try:
            for epoch in range(low, nxt):
                cohort.epoch(epoch)
                if not cohort.trainers:
                    break
        finally:
            cohort.release()
        if nxt >= epochs:
            complete(cohort.trainers)
        active = [t for t in active if t.state.status == "running"]


def fit(f: Fit) -> FitResult:
    return Trainer(f).run()
