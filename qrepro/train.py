"""Training entry point: ``python -m qrepro.train +experiment=<name> [overrides]``.

This module (with evaluate/ptq/tables) is the only place that sees Hydra's DictConfig; everything it calls
takes plain arguments.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from qrepro.cli import NON_SEMANTIC_KEYS, hydra_entry
from qrepro.errors import QreproError

VALID_BITS = set(range(1, 9)) | {32}


def _plain(cfg: Any) -> Any:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


def _without(d: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in keys}


def select_device(name: str) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise QreproError(f"trainer.device={name} but no CUDA GPU is available; use trainer.device=cpu")
    return dev


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def hydra_context() -> tuple[Path | None, str | None, list[str]]:
    """(run dir, experiment choice, task overrides) when running under Hydra."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None, None, []
    hc = HydraConfig.get()
    exp = hc.runtime.choices.get("experiment")
    return Path(hc.runtime.output_dir), exp, list(hc.overrides.task)


def semantic_overrides(overrides: list[str]) -> list[str]:
    """The overrides that change what a run computes (used to match records to table cells)."""
    out = []
    for o in overrides:
        key = o.split("=", 1)[0].lstrip("+~")
        if key not in NON_SEMANTIC_KEYS and not key.startswith("hydra."):
            out.append(o.lstrip("+") if key != "seed" else o)
    return sorted(out)


def check_precision(w_bits: int, a_bits: int) -> None:
    for what, b in (("precision.w_bits", w_bits), ("precision.a_bits", a_bits)):
        if b not in VALID_BITS:
            raise QreproError(f"{what}={b} is out of range; use 1..8 or 32 (full precision), e.g. precision=w4a4")


def build_model_and_method(cfg: DictConfig, num_classes: int) -> tuple[nn.Module, Any]:
    from qrepro.models import build_model
    from qrepro.quant import build_method, prepare

    check_precision(cfg.precision.w_bits, cfg.precision.a_bits)
    mcfg = _plain(cfg.model)
    model = build_model(mcfg["name"], num_classes=num_classes, **_without(mcfg, "name"))
    qcfg = _plain(cfg.quantizer)
    method = build_method(qcfg["name"], int(cfg.precision.w_bits), int(cfg.precision.a_bits), **_without(qcfg, "name"))
    prepare(model, method)
    return model, method


def build_data_from_cfg(cfg: DictConfig, device: torch.device, rank: int = 0, world_size: int = 1):
    """The dataset of ``cfg``; under DDP rank ``rank``'s shard with ``trainer.batch_size / world_size`` per step."""
    from qrepro.data import build_data
    from qrepro.engine.dist import per_rank_batch

    dcfg = _plain(cfg.dataset)
    return build_data(
        dcfg["name"],
        **_without(dcfg, "name", "num_classes"),
        batch_size=per_rank_batch(int(cfg.trainer.batch_size), world_size),
        device=device,
        seed=int(cfg.seed),
        rank=rank,
        world_size=world_size,
    )


def init_model(model: nn.Module, path: str, strict: bool = True) -> None:
    from qrepro.engine.checkpoint import extract_state_dict, load_model_state, read_checkpoint

    sd, fmt = extract_state_dict(read_checkpoint(path))
    kept = load_model_state(model, sd, strict=strict)
    note = f" ({len(kept)} quantizer tensors keep their initial values)" if kept else ""
    print(f"initialised from {path} [{fmt} format]{note}", flush=True)


def make_logger(cfg: DictConfig, run_dir: Path, config: dict[str, Any]):
    from qrepro.logging import build_logger

    lcfg = _plain(cfg.logger)
    name = lcfg.pop("name")
    if name != "wandb":
        return build_logger(name)
    tags = list(lcfg.pop("tags", None) or []) + [
        f"model:{cfg.model.name}",
        f"method:{cfg.quantizer.name}",
        f"bits:{cfg.precision.name}",
    ]
    return build_logger(
        "wandb", run_dir=str(run_dir), name=f"{cfg.name}/{run_dir.name}", config=config, tags=tags, **lcfg
    )


def train(
    cfg: DictConfig, run_dir: Path | None = None, experiment: str | None = None, overrides: list[str] | None = None
):
    """Train one run described by ``cfg``; returns the FitResult (record and its path)."""
    from qrepro.engine import dist as qdist
    from qrepro.engine.ema import EMA
    from qrepro.engine.fast import compile_forward_loss, compile_mode, make_forward_loss, setup_device
    from qrepro.engine.record import is_complete, read_record
    from qrepro.engine.trainer import Fit, fit
    from qrepro.logging import build_logger
    from qrepro.optim import build_optimizer, build_scheduler

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
    model, method = build_model_and_method(cfg, data.num_classes)
    if qdist.use_sync_bn(bool(cfg.trainer.get("sync_bn", False)), denv):
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # same Parameter objects, BN over the global batch
    model.to(device)
    if cfg.init_from and not (cfg.resume and (run_dir / "checkpoints" / "last.pt").exists()):
        init_model(model, cfg.init_from, strict=bool(cfg.init_strict))
    ocfg = _plain(cfg.optimizer)
    optimizer = build_optimizer(model, ocfg.pop("name"), ocfg.pop("groups", None), **ocfg)
    steps_per_epoch = len(data.train)
    scfg = _plain(cfg.scheduler)
    scheduler = build_scheduler(
        optimizer,
        scfg.pop("name"),
        total_steps=int(cfg.trainer.epochs) * steps_per_epoch,
        steps_per_epoch=steps_per_epoch,
        **scfg,
    )
    if hasattr(optimizer, "attach_scheduler"):  # e.g. TR optimizers whose target rate follows the LR schedule
        optimizer.attach_scheduler(scheduler)
    # under DDP: rank 0's state broadcast after the method's hooks initialise from each rank's own first batch
    sync = [qdist.DistributedSync()] if world > 1 else []
    hooks = list(method.hooks) + sync + list(getattr(optimizer, "hooks", []))
    ls = float(cfg.trainer.label_smoothing)

    def loss_fn(logits, y):
        return nn.functional.cross_entropy(logits, y, label_smoothing=ls)

    ema = EMA(model, float(cfg.trainer.ema)) if cfg.trainer.ema else None
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


def compose(overrides: list[str], config_name: str = "train") -> DictConfig:
    """Compose a config in-process (tests, scripts) exactly as the command line would."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from qrepro.cli import CONFIG_DIR, check_group_choices, register_resolvers

    register_resolvers()
    check_group_choices(overrides)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides)


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
