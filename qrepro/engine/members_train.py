"""The trainer of batched members (``trainer.members=K``; see qrepro/engine/members.py for the batching).

Each member is a full ``qrepro.engine.trainer.Trainer`` over its own ``Fit`` (model, optimizer, schedule, hooks,
EMA, callbacks: NaN guard, checkpoints, console, logger, record), built exactly as ``qrepro.train`` builds the
separate run ``seed=S+i``, with its own run directory and lock. This module only replaces the loop over one
epoch's batches: K batches (one from each member's loader) are stacked and stepped as one batched computation
(``BatchedStep``); everything before and after an epoch's training is the member Trainer's own code
(``setup``, ``begin_epoch``, ``end_epoch``, ``finish``), so checkpoints, resume, skip and records are those of a
separate run. The record gains ``members`` (the batch: id, size, seeds, run directories, this member's index).

Members that do not share an epoch (a batch killed between two members' checkpoint writes, or one member already
complete) are trained in cohorts: the members at the lowest epoch run, batched among themselves, until they
reach the next one, then the cohort grows. A member whose loss or weights become non-finite stops as its
separate run stops (a diverged record) and the batch goes on without it.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from qrepro.engine.callbacks import Console
from qrepro.engine.loop import NonFiniteLoss
from qrepro.engine.members import (
    BatchedStep,
    MemberSlot,
    RngState,
    check_python_state,
)
from qrepro.engine.trainer import FitResult
from qrepro.errors import QreproError


class MemberConsole(Console):
    """The console line of one member, prefixed with its label (``[seed=3]``)."""

    def __init__(self, label: str) -> None:
        super().__init__(progress=False)
        self.label = label

    def on_epoch_end(self, t: Any, epoch: int, row: dict[str, Any]) -> None:
        print(f"[{self.label}] ", end="")
        super().on_epoch_end(t, epoch, row)


@dataclass
class _Member:
    index: int
    seed: int
    label: str
    cfg: Any  # the member's config (the launch reads it; the loop does not)
    run_dir: Path
    trainer: Any = None
    slot: MemberSlot | None = None
    rng: RngState | None = None
    result: Any = None
    error: str | None = None
    lock: Any = None
    method: Any = None


def member_data(data: Any, seed: int) -> Any:
    """``data`` with its training loader drawing the order and augmentation of ``seed`` (the images shared)."""
    train = data.train
    if not (hasattr(train, "seed") and hasattr(train, "set_epoch") and hasattr(train, "images")):
        raise QreproError(
            "trainer.members needs a dataset held on the device (digits, cifar10, cifar100); this one is streamed "
            "by a DataLoader; run the seeds separately (trainer.members=1)"
        )
    tr = copy.copy(train)
    tr.seed = int(seed)
    tr.epoch = 0
    out = copy.copy(data)
    out.train = tr
    return out


def _finish(m: _Member) -> None:
    try:
        m.result = m.trainer.finish()
    except QreproError as e:  # diverged
        m.error = str(e).removeprefix("training diverged: ")
        m.result = FitResult(m.trainer.record, Path(m.trainer.f.run_dir) / "record.json", diverged=True)
    finally:
        m.trainer.f.logger.finish()
    if m.error is None:
        mm = m.result.record["metrics"]
        print(
            f"[{m.label}] best top1 {mm['best_top1']:.2f}% (epoch {mm['best_epoch']}), "
            f"last top1 {mm['last_top1']:.2f}%",
            flush=True,
        )


def run_members(
    members: list[_Member], *, epochs: int, log_every: int, progress: bool, autocast: Any, mode: str | None
) -> None:
    """Train every member (each already ``setup``) to ``epochs``, in cohorts of members at the same epoch."""
    opts = {"epochs": epochs, "log_every": log_every, "progress": progress, "autocast": autocast, "mode": mode}
    for m in members:
        if m.trainer.state.epoch >= epochs:  # resumed after its last epoch: only the record was missing
            m.trainer.state.status = "complete"
            _finish(m)
    active = [m for m in members if m.result is None]
    while active:
        low = min(m.trainer.state.epoch for m in active)
        cohort = [m for m in active if m.trainer.state.epoch == low]
        nxt = min([m.trainer.state.epoch for m in active if m.trainer.state.epoch > low] + [epochs])
        if len(cohort) < len(active):
            print(
                f"members: {', '.join(m.label for m in cohort)} catch up from epoch {low} to {nxt} "
                f"before the batch of {len(active)} continues",
                flush=True,
            )
        batch = _Batch(cohort, **opts)
        try:
            for epoch in range(low, nxt):
                batch.epoch(epoch)
                if not batch.cohort:
                    break
        finally:
            batch.release()
        if nxt >= epochs:
            for m in batch.cohort:
                m.trainer.state.status = "complete"
                _finish(m)
        active = [m for m in active if m.result is None]


class _Batch:
    """A cohort of members at the same epoch and its batched step (rebuilt when a member leaves)."""

    def __init__(
        self, cohort: list[_Member], *, epochs: int, log_every: int, progress: bool, autocast: Any, mode: str | None
    ) -> None:
        self.cohort = list(cohort)
        self.epochs, self.log_every, self.progress = epochs, log_every, progress
        self.autocast, self.mode = autocast, mode
        self.step: BatchedStep | None = None
        self._build()

    def _build(self) -> None:
        self.release()
        check_python_state([m.trainer.f.model for m in self.cohort])
        m0 = self.cohort[0]
        self.step = BatchedStep(
            [m.slot for m in self.cohort], m0.trainer.f.loss_fn, m0.method.regularizer, self.autocast, self.mode
        )

    def release(self) -> None:
        if self.step is not None:
            self.step.release()
            self.step = None

    def _drop(self, gone: list[int]) -> list[int]:
        """Remove cohort positions ``gone`` (already finished); returns the kept positions."""
        keep = [i for i in range(len(self.cohort)) if i not in gone]
        self.cohort = [self.cohort[i] for i in keep]
        if self.cohort:
            self._build()
        else:
            self.release()
        return keep

    def epoch(self, epoch: int) -> None:
        """Train the cohort (all at ``epoch``) for one epoch as one batch, then each member's epoch end."""
        cohort, log_every = self.cohort, self.log_every
        t0s = {}
        for m in cohort:
            with m.rng:
                t0s[m.index] = m.trainer.begin_epoch(epoch)
        iters = [iter(m.trainer.f.data.train) for m in cohort]
        n_steps = len(cohort[0].trainer.f.data.train)
        bar = None
        if self.progress:
            bar = tqdm(total=n_steps, desc=f"epoch {epoch + 1}/{self.epochs} x{len(cohort)}", leave=False,
                       file=sys.stderr, mininterval=1.0, dynamic_ncols=True)  # fmt: skip
        dev_loss = dev_correct = None
        n_seen = 0
        data_s = 0.0
        t0 = time.perf_counter()
        try:
            for s in range(n_steps):
                td = time.perf_counter()
                batches = [next(it) for it in iters]
                data_s += time.perf_counter() - td
                xs = torch.stack([b[0] for b in batches])
                ys = torch.stack([b[1] for b in batches])
                losses, correct = self.step(xs, ys)
                with torch.no_grad():
                    bl = losses * ys.shape[1]
                    dev_loss = bl if dev_loss is None else dev_loss + bl
                    dev_correct = correct if dev_correct is None else dev_correct + correct
                n_seen += ys.shape[1]
                if (s + 1) % log_every == 0:  # as train_one_epoch: one host read, every member stops on its NaN
                    vals = losses.tolist()
                    bad = [i for i, v in enumerate(vals) if not math.isfinite(v)]
                    if bad:
                        self.release()
                        for i in bad:
                            m = self.cohort[i]
                            m.trainer.diverge(
                                NonFiniteLoss(f"loss is {vals[i]} at step {m.slot.ctx.step} (epoch {epoch + 1})")
                            )
                            _finish(m)
                        keep = self._drop(bad)
                        if not self.cohort:
                            return
                        iters = [iters[i] for i in keep]
                        dev_loss, dev_correct = dev_loss[keep], dev_correct[keep]
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        dt = time.perf_counter() - t0
        loss_v = (dev_loss.double() / n_seen).tolist()
        acc_v = (dev_correct.double() * (100.0 / n_seen)).tolist()
        gone = []
        for i, m in enumerate(self.cohort):
            if not math.isfinite(loss_v[i]):
                m.trainer.diverge(NonFiniteLoss(f"mean loss of epoch {epoch + 1} is {loss_v[i]}"))
                _finish(m)
                gone.append(i)
                continue
            tr = {
                "train_loss": loss_v[i],
                "train_top1": acc_v[i],
                "images": n_seen,
                "seconds": dt,
                "data_seconds": data_s,
                "images_per_s": n_seen / max(dt, 1e-9),
            }
            try:
                with m.rng:
                    m.trainer.end_epoch(epoch, tr, t0s[m.index])
            except NonFiniteLoss as e:
                m.trainer.diverge(e)
                _finish(m)
                gone.append(i)
        if gone:
            self._drop(gone)
