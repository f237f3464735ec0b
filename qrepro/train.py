"""Training entry point: ``python -m qrepro.train +experiment=<name> [overrides]``.

This module (with evaluate/ptq/tables) is the only place that sees Hydra's DictConfig; everything it calls
takes plain arguments.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from omegaconf import DictConfig

from qrepro.builders import (  # noqa: F401  (re-exported: scripts and tests import them from here)
    VALID_BITS,
    _plain,
    _without,
    build_components,
    build_data_from_cfg,
    build_model_and_method,
    check_precision,
    compose,
    hydra_context,
    init_model,
    make_logger,
    seed_everything,
    select_device,
    semantic_overrides,
)
from qrepro.cli import hydra_entry
from qrepro.errors import QreproError

RESUME_HINT = "add resume=true to continue it, or force=true to start over"


def _init_mismatch(record: dict, init: dict | None) -> str | None:
    """How ``record``'s initialisation differs from this launch's ``init`` (None: the same)."""
    ident = record.get("identity")
    now_sha = init["sha256"] if init else None
    if isinstance(ident, dict) and "init_from_sha256" in ident:
        old = ident["init_from_sha256"]
        if old == now_sha:
            return None
        return (
            f"init_from {'sha256 ' + old[:12] if old else 'none'} -> {'sha256 ' + now_sha[:12] if now_sha else 'none'}"
        )
    old_path, now_path = record.get("init_from") or None, init["path"] if init else None  # a record without hashes
    return None if old_path == now_path else f"init_from {old_path} -> {now_path}"


def prepare_run_dir(cfg: DictConfig, run_dir: Path, init: dict | None) -> tuple[str, dict | None]:
    """What this launch does with ``run_dir`` (its lock held): ("fresh" | "resume" | "skip", record).

    * ``force=true`` (or ``retry=true`` on a diverged run): the old record is marked superseded, then the old
      checkpoints are removed, then the run starts from scratch;
    * a complete record: skipped, but only when it was initialised from the same ``init_from`` content;
    * a diverged record: skipped (``retry=true`` or ``force=true`` runs it again);
    * a checkpoint without a complete record (a killed run): resumed with ``resume=true``, else refused in one line.
    """
    from qrepro.engine.checkpoint import read_checkpoint
    from qrepro.engine.record import read_record
    from qrepro.engine.rundir import mark_superseded, remove_checkpoints

    record_path = run_dir / "record.json"
    rec = read_record(record_path)
    status = (rec or {}).get("status") or ("complete" if (rec or {}).get("complete") else None)
    last = run_dir / "checkpoints" / "last.pt"
    if cfg.force or (cfg.get("retry") and status == "diverged"):
        why = "force=true" if cfg.force else "retry=true"
        if rec is not None:
            mark_superseded(record_path, rec, why)
        gone = remove_checkpoints(run_dir)
        (run_dir / WANDB_ID_FILE).unlink(missing_ok=True)
        if rec is not None or gone:
            print(f"{why}: {run_dir} starts over (old record marked superseded, removed {gone or 'no checkpoints'})")
        return "fresh", None
    if rec is not None and rec.get("complete") is True:
        diff = _init_mismatch(rec, init)
        if diff:
            raise QreproError(
                f"{run_dir} holds a complete run initialised differently ({diff}); a different initialisation is a "
                "different run: pass another out_root=..., or force=true to replace it"
            )
        return "skip", rec
    if status == "diverged":
        return "skip", rec
    if last.exists():
        if not cfg.resume:
            try:
                ck = read_checkpoint(last)
                where = f"checkpoint after epoch {int(ck['epoch']) + 1}/{cfg.trainer.epochs}"
            except (QreproError, KeyError, TypeError, ValueError):
                where = f"checkpoint {last}"
            raise QreproError(f"{run_dir} holds an unfinished run ({where}, no complete record); {RESUME_HINT}")
        return "resume", rec
    return "fresh", rec


WANDB_ID_FILE = "wandb_id"


def _decide(cfg: DictConfig, run_dir: Path, init: dict | None, denv, lock) -> tuple[str, dict | None]:
    """Rank 0 takes the lock and decides; under DDP the other ranks follow its decision (or its error)."""

    out: list = [None, None, None]
    if denv.is_main:
        try:
            lock.acquire()
            out[:2] = prepare_run_dir(cfg, run_dir, init)
        except QreproError as e:
            out[2] = str(e)
    if denv.world_size > 1:
        import torch.distributed as tdist

        tdist.broadcast_object_list(out, src=0)
    if out[2]:
        raise QreproError(out[2] if denv.is_main else f"rank 0 stopped: {out[2]}")
    return out[0], out[1]


def train(
    cfg: DictConfig, run_dir: Path | None = None, experiment: str | None = None, overrides: list[str] | None = None
):
    """Train one run described by ``cfg``; returns the FitResult (record and its path)."""
    from qrepro.engine import dist as qdist
    from qrepro.engine.rundir import RunLock, init_source
    from qrepro.engine.trainer import FitResult
    from qrepro.validation import validate_config

    validate_config(cfg)
    if int(cfg.trainer.get("members") or 1) > 1:  # K seeds as one batched job (qrepro/engine/members.py)
        from qrepro.engine.members_train import run_members

        return run_members(cfg, run_dir, experiment, overrides)
    h_dir, h_exp, h_over = hydra_context()
    run_dir = Path(run_dir or h_dir or Path(cfg.out_root) / cfg.name / "default")
    experiment = experiment or h_exp or cfg.get("experiment")
    overrides = semantic_overrides(overrides if overrides is not None else h_over)
    record_path = run_dir / "record.json"
    init = init_source(cfg.init_from)
    denv = qdist.setup(cfg.trainer.device)  # torchrun / submitit tasks -> process group; else one process
    lock = RunLock(run_dir)
    try:
        action, rec = _decide(cfg, run_dir, init, denv, lock)
        if action == "skip":
            if denv.is_main:
                what = "a complete record" if rec.get("complete") else f"a {rec.get('status')} record"
                hint = "force=true to re-run" if rec.get("complete") else "retry=true or force=true to run it again"
                print(f"skip: {run_dir} already has {what} ({hint})", flush=True)
            return FitResult(rec, record_path, diverged=rec.get("status") == "diverged", skipped=True)
        return _train(cfg, run_dir, experiment, overrides, init, denv, resuming=action == "resume")
    finally:
        lock.release()


def make_record_base(cfg: DictConfig, experiment: str | None, overrides: list[str], init: dict | None, world: int):
    """The record fields that describe the run (everything but its results and provenance)."""
    return {
        "name": cfg.name,
        "experiment": experiment,
        "overrides": overrides,
        "config": _plain(cfg),
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
    from qrepro.engine.fsio import atomic_write

    id_file = run_dir / WANDB_ID_FILE
    resume_id = id_file.read_text().strip() if resuming and id_file.is_file() else None
    logger = make_logger(cfg, run_dir, config, resume_id=resume_id, **kw)
    if getattr(logger, "id", None) and logger.id != resume_id:
        atomic_write(id_file, lambda tmp: tmp.write_text(f"{logger.id}\n"))
    return logger


def _train(cfg, run_dir, experiment, overrides, init, denv, *, resuming: bool):
    from qrepro.engine import dist as qdist
    from qrepro.engine.fast import compile_forward_loss, compile_mode, make_forward_loss, setup_device
    from qrepro.engine.precision import (
        amp_mode,
        autocast_factory,
        channels_last,
        check_amp,
        input_transform,
        make_scaler,
    )
    from qrepro.engine.rundir import identity
    from qrepro.engine.trainer import Fit, fit
    from qrepro.logging import build_logger

    if cfg.trainer.num_threads:
        torch.set_num_threads(int(cfg.trainer.num_threads))
    device, world = denv.device, denv.world_size
    seed_everything(int(cfg.seed))  # the same on every rank: identical initial model and data order
    if cfg.trainer.get("deterministic"):
        torch.use_deterministic_algorithms(True, warn_only=True)
    setup_device(device, deterministic=bool(cfg.trainer.get("deterministic")))
    data = build_data_from_cfg(cfg, device, denv.rank, world)
    comp = build_components(
        cfg,
        device,
        data=data,
        init=not resuming,
        sync_bn=qdist.use_sync_bn(bool(cfg.trainer.get("sync_bn", False)), denv),
    )
    model, method, optimizer, scheduler = comp.model, comp.method, comp.optimizer, comp.scheduler
    loss_fn, ema = comp.loss_fn, comp.ema
    amp, cl = amp_mode(cfg.trainer.get("amp")), bool(cfg.trainer.get("channels_last", False))
    check_amp(amp, optimizer)
    if cl:
        channels_last(model)
    autocast, scaler = autocast_factory(amp, device), make_scaler(amp, device)
    # under DDP: rank 0's state broadcast after the method's hooks initialise from each rank's own first batch
    sync = [qdist.DistributedSync()] if world > 1 else []
    hooks = list(method.hooks) + sync + list(getattr(optimizer, "hooks", []))
    train_model = qdist.wrap_ddp(model, denv, bool(cfg.trainer.get("find_unused_parameters", False)))
    mode = compile_mode(cfg.trainer.compile, device)
    forward_loss = None
    if mode is not None or autocast is not None or cl:
        forward_loss = make_forward_loss(
            train_model, loss_fn, method.regularizer, autocast=autocast, input_transform=input_transform(cl)
        )
    if mode is not None:  # the fast path: forward + loss + regularizer compiled (CUDA graphs on GPU)
        forward_loss = compile_forward_loss(forward_loss, mode)
    if world > 1:
        seed_everything(int(cfg.seed) + denv.rank)  # per-rank streams (dropout, stochastic quantizers)
    config = _plain(cfg)
    ident = identity(config, init)
    record_base = make_record_base(cfg, experiment, overrides, init, world)
    logger = build_logger("none")
    if denv.is_main:
        logger = open_logger(cfg, run_dir, config, resuming)
        print(
            f"run: {run_dir}  model={cfg.model.name} quantizer={cfg.quantizer.name} precision={cfg.precision.name} "
            f"device={device} epochs={cfg.trainer.epochs} compile={mode or 'off'}"
            + (f" amp={amp}" if amp != "off" else "")
            + (f" ranks={world} ({denv.backend})" if world > 1 else ""),
            flush=True,
        )
    f = Fit(
        model=model,
        data=data,
        optimizer=optimizer,
        scheduler=scheduler,
        loss_fn=loss_fn,
        epochs=int(cfg.trainer.epochs),
        run_dir=run_dir,
        hooks=hooks,
        regularizer=method.regularizer,
        ema=ema,
        logger=logger,
        record_base=record_base,
        log_every=int(cfg.trainer.log_every),
        progress=bool(cfg.trainer.progress),
        resume=resuming,
        device=device,
        forward_loss=forward_loss,
        eval_compile=mode,
        train_model=train_model,
        is_main=denv.is_main,
        identity=ident,
        scaler=scaler,
    )
    try:
        result = fit(f)
    finally:
        logger.finish()  # no-op when the run finished (the logger callback closed it with its summary)
    m = result.record["metrics"]
    if denv.is_main:
        print(f"best top1 {m['best_top1']:.2f}% (epoch {m['best_epoch']}), last top1 {m['last_top1']:.2f}%", flush=True)
    return result


def _task(cfg: DictConfig) -> str:
    result = train(cfg)
    results = result if isinstance(result, list) else [result]  # batched members: one result per member
    if os.environ.get("RANK", "0") == "0":
        for r in results:
            print(f"record: {r.record_path}", flush=True)
    return "skipped" if all(r.skipped for r in results) else "finished"


def main() -> None:
    import sys

    from qrepro.run_table import from_train_argv

    # `python -m qrepro.train +table=<name> [overrides]` runs every cell of a paper table (qrepro.run_table)
    if (code := from_train_argv(sys.argv[1:])) is not None:
        sys.exit(code)
    from qrepro.chain import prepare
    from qrepro.cli import one_line_errors
    from qrepro.validation import precheck

    args = sys.argv[1:]
    if not {"-sc", "--shell-completion"} & set(args):  # bad values and misspelt keys: one line before anything runs
        one_line_errors(precheck)([a for a in args if a.lstrip("+~").split("=", 1)[0] != "plan"], "train")
    # a cell that starts from another cell: use (or train first) that cell's run, or preview it with +plan=true
    argv = one_line_errors(prepare)(sys.argv[1:])
    if argv is None:
        return
    sys.argv[1:] = argv
    hydra_entry(_task, "train")


if __name__ == "__main__":
    main()
