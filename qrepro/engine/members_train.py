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

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from qrepro.engine.callbacks import Console
from qrepro.engine.loop import NonFiniteLoss
from qrepro.engine.members import (
    BatchedStep,
    MemberSlot,
    RngState,
    _key,
    batch_id,
    check_python_state,
    member_overrides,
    member_seeds,
    override_dirname,
)
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
    cfg: DictConfig
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
    import copy

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


def _member_cfg(cfg: DictConfig, seed: int) -> DictConfig:
    c = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    with open_dict(c):
        c.seed = int(seed)
        c.trainer.members = 1
    return c


def run_members(cfg: DictConfig, run_dir: Path | None, experiment: str | None, overrides: list[str] | None):
    """Train the K members of ``cfg``; returns their FitResults (member order). A diverged member gets a
    diverged record and, after the others finished, the launch fails in one line naming it."""
    from qrepro.builders import hydra_context, semantic_overrides
    from qrepro.engine import dist as qdist
    from qrepro.engine.rundir import RunLock, init_source
    from qrepro.engine.trainer import FitResult
    from qrepro.train import prepare_run_dir
    from qrepro.validation import validate_config

    validate_config(cfg)
    k = int(cfg.trainer.members)
    h_dir, h_exp, h_over = hydra_context()
    raw = [o for o in (overrides if overrides is not None else h_over)]
    experiment = experiment or h_exp or cfg.get("experiment")
    s0 = int(cfg.seed)
    seed_given = any(_key(o) == "seed" for o in raw)
    seeds = member_seeds(s0, k)
    raws = [member_overrides(raw, s0, i, seed_given) for i in range(k)]
    base = Path(run_dir or h_dir or Path(cfg.out_root) / cfg.name / "default").parent
    members = [
        _Member(i, seeds[i], f"seed={seeds[i]}", _member_cfg(cfg, seeds[i]), base / override_dirname(raws[i]))
        for i in range(k)
    ]
    if bool(cfg.trainer.get("channels_last", False)):
        raise QreproError(
            "trainer.channels_last with trainer.members: the batched forward runs on stacked [K, ...] tensors "
            "(no channels-last layout); drop one of the two"
        )
    denv = qdist.setup(cfg.trainer.device)
    if denv.world_size > 1:
        raise QreproError("trainer.members cannot be combined with several processes (torchrun/DDP); use one")
    init = init_source(cfg.init_from)
    results: list[Any] = [None] * k
    batch = {
        "id": batch_id(str(cfg.name), seeds, [o for o in raw if _key(o) not in ("seed", "trainer.members")]),
        "size": k,
        "seeds": seeds,
        "run_dirs": [str(m.run_dir) for m in members],
    }
    todo: list[tuple[_Member, bool]] = []
    try:
        for m in members:
            m.lock = RunLock(m.run_dir)
            m.lock.acquire()
            try:
                action, rec = prepare_run_dir(m.cfg, m.run_dir, init)
            except QreproError as e:
                raise QreproError(f"member {m.label}: {e}") from None
            if action == "skip":
                what = "a complete record" if rec.get("complete") else f"a {rec.get('status')} record"
                print(f"skip: {m.run_dir} already has {what} (member {m.label})", flush=True)
                results[m.index] = FitResult(
                    rec, m.run_dir / "record.json", diverged=rec.get("status") == "diverged", skipped=True
                )
            else:
                todo.append((m, action == "resume"))
        if todo:
            _train(cfg, todo, experiment, [semantic_overrides(raws[m.index]) for m, _ in todo], init, denv, batch)
            for m, _ in todo:
                results[m.index] = m.result
    finally:
        for m in members:
            if m.lock is not None:
                m.lock.release()
    bad = [m for m, _ in todo if m.error]
    if bad:
        raise QreproError("training diverged: " + "; ".join(f"member {m.label}: {m.error}" for m in bad))
    return results


def _train(cfg, todo, experiment, member_overrides_, init, denv, batch) -> None:
    from qrepro.builders import build_components, build_data_from_cfg, seed_everything
    from qrepro.engine.callbacks import default_callbacks
    from qrepro.engine.fast import compile_mode, setup_device
    from qrepro.engine.precision import amp_mode, autocast_factory, check_amp, make_scaler
    from qrepro.engine.rundir import identity
    from qrepro.engine.trainer import Fit, Trainer
    from qrepro.train import make_record_base, open_logger

    if cfg.trainer.num_threads:
        torch.set_num_threads(int(cfg.trainer.num_threads))
    device = denv.device
    deterministic = bool(cfg.trainer.get("deterministic"))
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    setup_device(device, deterministic=deterministic)
    amp = amp_mode(cfg.trainer.get("amp"))
    # trainer.compile=auto stays eager with members (the batched step is compiled only when asked for)
    mode = None if str(cfg.trainer.compile).lower() == "auto" else compile_mode(cfg.trainer.compile, device)
    autocast = autocast_factory(amp, device)
    seed_everything(int(todo[0][0].seed))
    data = build_data_from_cfg(cfg, device)
    k_all = batch["size"]
    for (m, resuming), ovr in zip(todo, member_overrides_):
        c = m.cfg
        seed_everything(int(m.seed))  # as the separate run: the model initialised from its own seed
        data_m = member_data(data, m.seed)
        comp = build_components(c, device, data=data_m, init=not resuming)
        check_amp(amp, comp.optimizer)
        hooks = list(comp.method.hooks) + list(getattr(comp.optimizer, "hooks", []))
        config = OmegaConf.to_container(c, resolve=True)
        record_base = make_record_base(c, experiment, ovr, init, 1)
        record_base["members"] = {**batch, "index": m.index}
        logger = open_logger(c, m.run_dir, config, resuming, concurrent=True)
        scaler = make_scaler(amp, device)
        f = Fit(
            model=comp.model,
            data=data_m,
            optimizer=comp.optimizer,
            scheduler=comp.scheduler,
            loss_fn=comp.loss_fn,
            epochs=int(c.trainer.epochs),
            run_dir=m.run_dir,
            hooks=hooks,
            regularizer=comp.method.regularizer,
            ema=comp.ema,
            logger=logger,
            record_base=record_base,
            log_every=int(c.trainer.log_every),
            progress=False,
            resume=resuming,
            device=device,
            identity=identity(config, init),
            scaler=scaler,
        )
        f.callbacks = [MemberConsole(m.label) if isinstance(cb, Console) else cb for cb in default_callbacks(f)]
        m.trainer = Trainer(f)
        m.rng = RngState(device)
        m.rng.capture()
        m.method = comp.method
        print(
            f"run: {m.run_dir}  model={c.model.name} quantizer={c.quantizer.name} precision={c.precision.name} "
            f"device={device} epochs={c.trainer.epochs} compile={mode or 'off'}"
            + (f" amp={amp}" if amp != "off" else "")
            + f" member {m.index + 1}/{k_all} of batch {batch['id']}",
            flush=True,
        )
    members = [m for m, _ in todo]
    try:
        for m in members:
            with m.rng:
                m.trainer.setup()
            t = m.trainer
            m.slot = MemberSlot(
                t.f.model, t.f.optimizer, t.f.scheduler, t.f.hooks, t.f.ema, t.ctx, m.rng, t.f.scaler, m.label
            )
        _loop(members, cfg, autocast, mode)
    finally:
        for m in members:
            if m.result is None and m.trainer is not None:  # an exception: close what is open
                try:
                    m.trainer.f.logger.finish()
                except Exception:  # noqa: BLE001
                    pass


def _finish(m: _Member) -> None:
    from qrepro.engine.trainer import FitResult

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


def _loop(members: list[_Member], cfg: DictConfig, autocast: Any, mode: str | None) -> None:
    epochs = int(cfg.trainer.epochs)
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
        batch = _Batch(cohort, cfg, autocast, mode)
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

    def __init__(self, cohort: list[_Member], cfg: DictConfig, autocast: Any, mode: str | None) -> None:
        self.cohort = list(cohort)
        self.cfg, self.autocast, self.mode = cfg, autocast, mode
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
        cfg, cohort = self.cfg, self.cohort
        log_every = int(cfg.trainer.log_every)
        t0s = {}
        for m in cohort:
            with m.rng:
                t0s[m.index] = m.trainer.begin_epoch(epoch)
        iters = [iter(m.trainer.f.data.train) for m in cohort]
        n_steps = len(cohort[0].trainer.f.data.train)
        bar = None
        if bool(cfg.trainer.progress):
            import sys

            from tqdm import tqdm

            bar = tqdm(total=n_steps, desc=f"epoch {epoch + 1}/{cfg.trainer.epochs} x{len(cohort)}", leave=False,
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
