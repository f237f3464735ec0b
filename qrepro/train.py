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

def train(
    cfg: DictConfig, run_dir: Path | None = None, experiment: str | None = None, overrides: list[str] | None = None
):
    """Train one run described by ``cfg``; returns the FitResult (record and its path)."""
    from qrepro.engine import dist as qdist
    from qrepro.engine.fast import compile_forward_loss, compile_mode, make_forward_loss, setup_device
    from qrepro.engine.record import is_complete, read_record
    from qrepro.engine.trainer import Fit, fit
    from qrepro.logging import build_logger

    h_dir, h_exp, h_over = hydra_context()
    run_dir = Path(run_dir or h_dir or Path(cfg.out_root) / cfg.name / "default")
    experiment = experiment or h_exp or cfg.get("experiment")
    overrides = semantic_overrides(overrides if overrides is not None else h_over)
    record_path = run_dir / "record.json"
    if is_complete(record_path) and not cfg.force:
        print(f"skip: {run_dir} already has a complete record (force=true to re-run)", flush=True)
        from qrepro.engine.trainer import FitResult

        return FitResult(read_record(record_path), record_path)

    if cfg.trainer.num_threads:
        torch.set_num_threads(int(cfg.trainer.num_threads))
    denv = qdist.setup(cfg.trainer.device)  # torchrun / submitit tasks -> process group; else one process
    device, world = denv.device, denv.world_size
    seed_everything(int(cfg.seed))  # the same on every rank: identical initial model and data order
    if cfg.trainer.get("deterministic"):
        torch.use_deterministic_algorithms(True, warn_only=True)
    setup_device(device, deterministic=bool(cfg.trainer.get("deterministic")))
    data = build_data_from_cfg(cfg, device, denv.rank, world)
    resuming = bool(cfg.resume and (run_dir / "checkpoints" / "last.pt").exists())
    comp = build_components(
        cfg,
        device,
        data=data,
        init=not resuming,
        sync_bn=qdist.use_sync_bn(bool(cfg.trainer.get("sync_bn", False)), denv),
    )
    model, method, optimizer, scheduler = comp.model, comp.method, comp.optimizer, comp.scheduler
    loss_fn, ema = comp.loss_fn, comp.ema
    # under DDP: rank 0's state broadcast after the method's hooks initialise from each rank's own first batch
    sync = [qdist.DistributedSync()] if world > 1 else []
    hooks = list(method.hooks) + sync + list(getattr(optimizer, "hooks", []))
    train_model = qdist.wrap_ddp(model, denv, bool(cfg.trainer.get("find_unused_parameters", False)))
    mode = compile_mode(cfg.trainer.compile, device)
    forward_loss = None
    if mode is not None:  # the fast path: forward + loss + regularizer compiled (CUDA graphs on GPU)
        forward_loss = compile_forward_loss(make_forward_loss(train_model, loss_fn, method.regularizer), mode)
    if world > 1:
        seed_everything(int(cfg.seed) + denv.rank)  # per-rank streams (dropout, stochastic quantizers)
    record_base = {
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
        "world_size": world,
    }
    logger = make_logger(cfg, run_dir, record_base["config"]) if denv.is_main else build_logger("none")
    if denv.is_main:
        print(
            f"run: {run_dir}  model={cfg.model.name} quantizer={cfg.quantizer.name} precision={cfg.precision.name} "
            f"device={device} epochs={cfg.trainer.epochs} compile={mode or 'off'}"
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
        resume=bool(cfg.resume),
        device=device,
        forward_loss=forward_loss,
        eval_compile=mode,
        train_model=train_model,
        is_main=denv.is_main,
    )
    try:
        result = fit(f)
    finally:
        logger.finish()
    m = result.record["metrics"]
    if denv.is_main:
        print(f"best top1 {m['best_top1']:.2f}% (epoch {m['best_epoch']}), last top1 {m['last_top1']:.2f}%", flush=True)
    return result


def _task(cfg: DictConfig) -> None:
    result = train(cfg)
    if os.environ.get("RANK", "0") == "0":
        print(f"record: {result.record_path}", flush=True)


def main() -> None:
    import sys

    from qrepro.run_table import from_train_argv

    # `python -m qrepro.train +table=<name> [overrides]` runs every cell of a paper table (qrepro.run_table)
    if (code := from_train_argv(sys.argv[1:])) is not None:
        sys.exit(code)
    hydra_entry(_task, "train")


if __name__ == "__main__":
    main()
