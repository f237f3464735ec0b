"""The launch of a training run from its config: the run directory (lock, resume / skip decision), the run's
components and ``Fit``, and the engine's loop; ``trainer.members=K``: K seeds' runs as one batched job.

``qrepro.train`` (the command line) and ``qrepro.api`` callers reach it through ``train``; everything it calls
below takes plain arguments.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from qrepro.builders import (
    build_components,
    build_data_from_cfg,
    hydra_context,
    make_logger,
    seed_everything,
    semantic_overrides,
    setup_process,
    setup_run,
)
from qrepro.cli import save_hydra_files
from qrepro.config import NON_SEMANTIC_KEYS, SAME_CELL_DEFAULTS, key_of, member_run_dir, plain, trains_from_scratch
from qrepro.engine import dist as qdist
from qrepro.engine import fast
from qrepro.engine import trainer as engine_trainer  # engine_trainer.fit: tests wrap it
from qrepro.engine.callbacks import Console, default_callbacks
from qrepro.engine.console_log import tee_console
from qrepro.engine.fast import compile_mode, make_forward_loss
from qrepro.engine.fsio import atomic_write
from qrepro.engine.members import (
    BatchedEpoch,
    MemberConsole,
    MemberSlot,
    RngState,
    batch_id,
    member_data,
    member_overrides,
    member_seeds,
)
from qrepro.engine.precision import amp_mode, autocast_factory, channels_last, check_amp, input_transform, make_scaler
from qrepro.engine.rundir import WANDB_ID_FILE, RunLock, identity, init_source, prepare_run_dir
from qrepro.engine.trainer import Fit, FitResult, Trainer, train_trainers
from qrepro.errors import QreproError
from qrepro.logging import build_logger
from qrepro.validation import check_init_path, check_launch


def _epochs(cfg: DictConfig) -> int:
    return 0 if cfg.get("evaluate_only") else int(cfg.trainer.epochs)


def _accumulate(cfg: DictConfig) -> int:
    return int(cfg.trainer.get("accumulate") or 1)


def _prepare_run_dir(cfg: DictConfig, run_dir: Path, init: dict | None) -> tuple[str, dict | None]:
    return prepare_run_dir(
        run_dir, init, force=bool(cfg.force), retry=bool(cfg.get("retry")), resume=bool(cfg.resume), epochs=_epochs(cfg)
    )


def _decide(cfg: DictConfig, run_dir: Path, init: dict | None, denv, lock) -> tuple[str, dict | None]:
    """Rank 0 takes the lock and decides; under DDP the other ranks follow its decision (or its error)."""
    out: list = [None, None, None]
    if denv.is_main:
        try:
            lock.acquire()
            out[:2] = _prepare_run_dir(cfg, run_dir, init)
        except QreproError as e:
            out[2] = str(e)
    if denv.world_size > 1:
        torch.distributed.broadcast_object_list(out, src=0)
    if out[2]:
        raise QreproError(out[2] if denv.is_main else f"rank 0 stopped: {out[2]}")
    return out[0], out[1]


def _where(cfg: DictConfig, run_dir: Path | None, experiment: str | None, overrides: list[str] | None):
    """(run dir, experiment, overrides): those given, else the running Hydra job's, else the config's."""
    h_dir, h_exp, h_over = hydra_context()
    run_dir = Path(run_dir or h_dir or Path(cfg.out_root) / cfg.name / "default")
    return run_dir, experiment or h_exp or cfg.get("experiment"), list(overrides if overrides is not None else h_over)


def _init(init_from: Any) -> dict | None:
    """The ``init_from`` file (path, sha256); a corrupt checkpoint is one line before a run directory is touched."""
    init = init_source(init_from)
    if init:
        check_init_path(init["path"])
    return init


def _skipped(run_dir: Path, rec: dict, note: str | None = None, say: bool = True) -> FitResult:
    if say:
        what = "a complete record" if rec.get("complete") else f"a {rec.get('status')} record"
        hint = "force=true to re-run" if rec.get("complete") else "retry=true or force=true to run it again"
        print(f"skip: {run_dir} already has {what} ({note or hint})", flush=True)
    return FitResult(rec, run_dir / "record.json", diverged=rec.get("status") == "diverged", skipped=True)


def _best_line(result: FitResult) -> str:
    m = result.record["metrics"]
    return f"best top1 {m['best_top1']:.2f}% (epoch {m['best_epoch']}), last top1 {m['last_top1']:.2f}%"


def train(
    cfg: DictConfig,
    run_dir: Path | None = None,
    experiment: str | None = None,
    overrides: list[str] | None = None,
    *,
    validate: bool = True,
    member_inits: list[str | None] | None = None,
):
    """Train the run described by ``cfg`` (``trainer.members=K``: K seeds as one batched job); returns the
    FitResult (record and its path), a list of them for members. ``validate=False``: ``cfg`` was validated.
    ``member_inits``: with members, each member's ``init_from`` (a chained cell: each seed's source run)."""
    if validate:
        check_launch(cfg, "train")
    if int(cfg.trainer.get("members") or 1) > 1:  # K seeds as one batched job (qrepro/engine/members.py)
        return train_members(cfg, run_dir, experiment, overrides, member_inits)
    run_dir, experiment, overrides = _where(cfg, run_dir, experiment, overrides)
    overrides = semantic_overrides(overrides, scratch=trains_from_scratch(cfg))
    init = _init(cfg.init_from)
    denv = qdist.setup(cfg.trainer.device)  # torchrun / submitit tasks -> process group; else one process
    # process settings, seed and the dataset: a missing dataset.root is one line before the run directory is touched
    data = setup_run(cfg, denv.device, denv.rank, denv.world_size)
    lock = RunLock(run_dir)
    try:
        action, rec = _decide(cfg, run_dir, init, denv, lock)
        if action == "skip":
            return _skipped(run_dir, rec, say=denv.is_main)
        if denv.is_main:
            save_hydra_files(run_dir, cfg)
        # the console output, kept beside the record
        with tee_console(run_dir / "train.log") if denv.is_main else contextlib.nullcontext():
            return _train(cfg, run_dir, experiment, overrides, init, denv, data, resuming=action == "resume")
    finally:
        lock.release()


def make_record_base(cfg: DictConfig, experiment: str | None, overrides: list[str], init: dict | None, world: int):
    """The record fields that describe the run (everything but its results and provenance)."""
    return {
        "name": cfg.name,
        "experiment": experiment,
        "overrides": overrides,
        "config": plain(cfg),
        "model": cfg.model.name,
        "method": cfg.quantizer.name,
        "dataset": cfg.dataset.name,
        "precision": cfg.precision.name,
        "w_bits": int(cfg.precision.w_bits),
        "a_bits": int(cfg.precision.a_bits),
        "optimizer": cfg.optimizer.name,
        "seed": int(cfg.seed),
        "init_from": cfg.init_from,
        "init_from_sha256": init["sha256"] if init else None,
        "world_size": world,
    }


def open_logger(cfg: DictConfig, run_dir: Path, config: dict, resuming: bool, **kw):
    """The run's logger; a resumed run continues its W&B run (id kept in ``<run dir>/wandb_id``)."""
    id_file = run_dir / WANDB_ID_FILE
    resume_id = id_file.read_text().strip() if resuming and id_file.is_file() else None
    logger = make_logger(cfg, run_dir, config, resume_id=resume_id, **kw)
    if getattr(logger, "id", None) and logger.id != resume_id:
        atomic_write(id_file, lambda tmp: tmp.write_text(f"{logger.id}\n"))
    return logger


def _fit(cfg, run_dir, comp, data, config, init, *, hooks, logger, record_base, resuming, device, scaler, **kw) -> Fit:
    """The Fit of one run (a separate run or one member): its components, callbacks' inputs and identity."""
    return Fit(
        model=comp.model,
        data=data,
        optimizer=comp.optimizer,
        scheduler=comp.scheduler,
        loss_fn=comp.loss_fn,
        epochs=_epochs(cfg),
        run_dir=run_dir,
        hooks=hooks,
        regularizer=comp.method.regularizer,
        ema=comp.ema,
        logger=logger,
        record_base=record_base,
        log_every=int(cfg.trainer.log_every),
        resume=resuming,
        device=device,
        identity=identity(config, init, NON_SEMANTIC_KEYS, SAME_CELL_DEFAULTS),
        scaler=scaler,
        accumulate=_accumulate(cfg),
        **kw,
    )


def _run_line(cfg, run_dir, device, mode, amp) -> str:
    return (
        f"run: {run_dir}  model={cfg.model.name} quantizer={cfg.quantizer.name} precision={cfg.precision.name} "
        f"device={device} epochs={cfg.trainer.epochs} compile={mode or 'off'}"
        + (f" amp={amp}" if amp != "off" else "")
        + (f" accumulate={n}" if (n := _accumulate(cfg)) > 1 else "")
    )


def _train(cfg, run_dir, experiment, overrides, init, denv, data, *, resuming: bool):
    device, world = denv.device, denv.world_size
    sync_bn = qdist.use_sync_bn(bool(cfg.trainer.get("sync_bn", False)), denv)
    comp = build_components(cfg, device, data=data, init=not resuming, sync_bn=sync_bn)
    model, method, optimizer = comp.model, comp.method, comp.optimizer
    amp, cl = amp_mode(cfg.trainer.get("amp")), bool(cfg.trainer.get("channels_last", False))
    check_amp(amp, optimizer)
    if cl:
        channels_last(model)
    autocast = autocast_factory(amp, device)
    # under DDP: rank 0's state broadcast after the method's hooks initialise from each rank's own first batch
    sync = [qdist.DistributedSync()] if world > 1 else []
    hooks = list(method.hooks) + sync + list(getattr(optimizer, "hooks", []))
    train_model = qdist.wrap_ddp(model, denv, bool(cfg.trainer.get("find_unused_parameters", False)))
    mode = compile_mode(cfg.trainer.compile, device)
    forward_loss = None
    if mode is not None or autocast is not None or cl:
        forward_loss = make_forward_loss(
            train_model, comp.loss_fn, method.regularizer, autocast=autocast, input_transform=input_transform(cl)
        )
    if mode is not None:  # the fast path: forward + loss + regularizer compiled (CUDA graphs on GPU)
        forward_loss = fast.compile_forward_loss(forward_loss, mode)
    if world > 1:
        seed_everything(int(cfg.seed) + denv.rank)  # per-rank streams (dropout, stochastic quantizers)
    config = plain(cfg)
    record_base = make_record_base(cfg, experiment, overrides, init, world)
    logger = build_logger("none")
    if denv.is_main:
        logger = open_logger(cfg, run_dir, config, resuming)
        ranks = f" ranks={world} ({denv.backend})" if world > 1 else ""
        print(_run_line(cfg, run_dir, device, mode, amp) + ranks, flush=True)
    f = _fit(
        cfg, run_dir, comp, data, config, init, hooks=hooks, logger=logger, record_base=record_base,
        resuming=resuming, device=device, scaler=make_scaler(amp, device), progress=bool(cfg.trainer.progress),
        forward_loss=forward_loss, eval_compile=mode, train_model=train_model, is_main=denv.is_main,
    )  # fmt: skip
    try:
        result = engine_trainer.fit(f)
    finally:
        logger.finish()  # no-op when the run finished (the logger callback closed it with its summary)
    if denv.is_main:
        print(_best_line(result), flush=True)
    return result


@dataclass
class _Member:
    """One member of a batched launch: its seed, config, run directory and, once trained, its result."""

    index: int
    seed: int
    cfg: Any
    run_dir: Path
    init: dict | None = None  # its init_from file (path, sha256)
    resuming: bool = False
    lock: Any = None
    trainer: Any = None
    result: Any = None
    error: str | None = None

    @property
    def label(self) -> str:
        return f"seed={self.seed}"


def _finish_member(m: _Member) -> None:
    """The member's record (a diverged member's too: its error is kept, the launch fails after the others)."""
    try:
        m.result = m.trainer.finish()
    except QreproError as e:  # diverged
        m.error = str(e).removeprefix("training diverged: ")
        m.result = FitResult(m.trainer.record, Path(m.trainer.f.run_dir) / "record.json", diverged=True)
    finally:
        m.trainer.f.logger.finish()
    if m.error is None:
        print(f"[{m.label}] {_best_line(m.result)}", flush=True)


def _member_cfg(cfg: DictConfig, seed: int, init_from: Any = None) -> DictConfig:
    c = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    with open_dict(c):
        c.seed = int(seed)
        c.trainer.members = 1
        if init_from is not None:
            c.init_from = init_from
    return c


def train_members(
    cfg: DictConfig,
    run_dir: Path | None,
    experiment: str | None,
    overrides: list[str] | None,
    inits: list[str | None] | None = None,
):
    """Train the K members of ``cfg``; returns their FitResults (member order). A diverged member gets a
    diverged record and, after the others finished, the launch fails in one line naming it. ``inits``: each
    member's ``init_from`` (default: ``cfg.init_from`` for all)."""
    k = int(cfg.trainer.members)
    if inits is not None and len(inits) != k:
        raise ValueError(f"{len(inits)} member inits for {k} members")
    run_dir, experiment, raw = _where(cfg, run_dir, experiment, overrides)
    s0, seed_given = int(cfg.seed), any(key_of(o) == "seed" for o in raw)
    seeds = member_seeds(s0, k)
    raws = [member_overrides(raw, s0, i, seed_given) for i in range(k)]
    members = [
        _Member(i, seeds[i], _member_cfg(cfg, seeds[i], inits and inits[i]), member_run_dir(run_dir, raw, raws[i]))
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
    for m in members:
        m.init = _init(m.cfg.init_from)
    batch = {
        "id": batch_id(str(cfg.name), seeds, [o for o in raw if key_of(o) not in ("seed", "trainer.members")]),
        "size": k,
        "seeds": seeds,
        "run_dirs": [str(m.run_dir) for m in members],
    }
    todo: list[_Member] = []
    try:
        for m in members:
            m.lock = RunLock(m.run_dir)
            m.lock.acquire()
            try:
                action, rec = _prepare_run_dir(m.cfg, m.run_dir, m.init)
            except QreproError as e:
                raise QreproError(f"member {m.label}: {e}") from None
            if action == "skip":
                m.result = _skipped(m.run_dir, rec, f"member {m.label}")
            else:
                m.resuming = action == "resume"
                todo.append(m)
        if todo:
            with contextlib.ExitStack() as logs:  # each member's train.log holds the batch's (labelled) output
                for m in todo:
                    save_hydra_files(m.run_dir, m.cfg)
                    logs.enter_context(tee_console(m.run_dir / "train.log"))
                ovs = [semantic_overrides(raws[m.index], scratch=trains_from_scratch(m.cfg)) for m in todo]
                _train_members(cfg, todo, experiment, ovs, denv, batch)
    finally:
        for m in members:
            if m.lock is not None:
                m.lock.release()
    if bad := [m for m in todo if m.error]:
        raise QreproError("training diverged: " + "; ".join(f"member {m.label}: {m.error}" for m in bad))
    return [m.result for m in members]


def _train_members(cfg, members: list[_Member], experiment, member_overrides_, denv, batch) -> None:
    device = denv.device
    setup_process(cfg, device)
    amp = amp_mode(cfg.trainer.get("amp"))
    # trainer.compile=auto stays eager with members (the batched step is compiled only when asked for)
    mode = None if str(cfg.trainer.compile).lower() == "auto" else compile_mode(cfg.trainer.compile, device)
    autocast = autocast_factory(amp, device)
    seed_everything(members[0].seed)
    data = build_data_from_cfg(cfg, device)
    for m, ovr in zip(members, member_overrides_):
        c = m.cfg
        seed_everything(m.seed)  # as the separate run: the model initialised from its own seed
        data_m = member_data(data, m.seed)
        comp = build_components(c, device, data=data_m, init=not m.resuming)
        check_amp(amp, comp.optimizer)
        config = plain(c)
        record_base = {**make_record_base(c, experiment, ovr, m.init, 1), "members": {**batch, "index": m.index}}
        logger = open_logger(c, m.run_dir, config, m.resuming, concurrent=True)
        f = _fit(
            c, m.run_dir, comp, data_m, config, m.init, hooks=comp.hooks, logger=logger, record_base=record_base,
            resuming=m.resuming, device=device, scaler=make_scaler(amp, device), progress=False,
        )  # fmt: skip
        f.callbacks = [MemberConsole(m.label) if isinstance(cb, Console) else cb for cb in default_callbacks(f)]
        rng = RngState(device)
        rng.capture()
        m.trainer = Trainer(f, label=m.label, rng=rng)
        line = _run_line(c, m.run_dir, device, mode, amp)
        print(f"{line} member {m.index + 1}/{batch['size']} of batch {batch['id']}", flush=True)
    by_trainer = {id(m.trainer): m for m in members}
    slots: dict[int, MemberSlot] = {}

    def batched(trainers: list[Trainer]) -> BatchedEpoch:  # the step strategy of a cohort of members
        t0 = trainers[0]
        return BatchedEpoch(
            [slots[id(t)] for t in trainers],
            [t.f.data.train for t in trainers],
            t0.f.loss_fn,
            t0.f.regularizer,
            autocast=autocast,
            compile_mode=mode,
            log_every=int(cfg.trainer.log_every),
            progress=bool(cfg.trainer.progress),
            epochs=int(cfg.trainer.epochs),
            accumulate=_accumulate(cfg),
        )

    try:
        for m in members:
            t, f = m.trainer, m.trainer.f
            with t.rng:
                t.setup()
            slots[id(t)] = MemberSlot(f.model, f.optimizer, f.scheduler, f.hooks, f.ema, t.ctx, t.rng, f.scaler)
        train_trainers(
            [m.trainer for m in members], batched, int(cfg.trainer.epochs), lambda t: _finish_member(by_trainer[id(t)])
        )
    finally:
        for m in members:
            if m.result is None and m.trainer is not None:  # an exception: close what is open
                with contextlib.suppress(Exception):
                    m.trainer.f.logger.finish()
