"""Builders shared by the entry points (train, evaluate, ptq, bench, the in-process API): seeding, data, model +
method, initialisation, optimizer + schedule, logger, and the record fields that describe a run.

The entry modules call these; nothing here imports an entry module. Functions that take a ``DictConfig`` are the
bridge from Hydra's config to the plain-argument library code below (engine, quant, models, data, optim).
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn

from qrepro import logging as qlogging
from qrepro.config import compose, hydra_context, plain, semantic_overrides, without  # noqa: F401  (re-exported)
from qrepro.data import build_data
from qrepro.engine.checkpoint import check_finite, extract_state_dict, load_model_state, read_checkpoint
from qrepro.engine.dist import per_rank_batch, select_device  # noqa: F401  (re-exported)
from qrepro.engine.ema import EMA
from qrepro.engine.fast import setup_device
from qrepro.errors import QreproError
from qrepro.models import build_model
from qrepro.optim import build_optimizer, build_scheduler
from qrepro.quant import build_method, prepare
from qrepro.validation import check_precision

_plain = plain  # the older name, still imported by tests


def setup_process(cfg: DictConfig, device: torch.device) -> None:
    """This process's settings for a training run: thread count, deterministic algorithms, device flags."""
    if cfg.trainer.num_threads:
        torch.set_num_threads(int(cfg.trainer.num_threads))
    deterministic = bool(cfg.trainer.get("deterministic"))
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    setup_device(device, deterministic=deterministic)


def setup_run(cfg: DictConfig, device: torch.device, rank: int = 0, world_size: int = 1):
    """A run's start before it takes its run directory: process settings, seed, the dataset (a missing
    ``dataset.root`` is one line before anything is written). The seed is the same on every rank."""
    setup_process(cfg, device)
    seed_everything(int(cfg.seed))
    return build_data_from_cfg(cfg, device, rank, world_size)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_model_from_cfg(cfg: DictConfig, num_classes: int) -> nn.Module:
    """The full-precision network of ``cfg.model`` (before the method swaps its layers)."""
    mcfg = plain(cfg.model)
    return build_model(mcfg["name"], num_classes=num_classes, **without(mcfg, "name"))


def build_method_from_cfg(cfg: DictConfig, w_bits: int, a_bits: int) -> Any:
    """The method of ``cfg.quantizer`` at ``w_bits``/``a_bits``."""
    qcfg = plain(cfg.quantizer)
    return build_method(qcfg["name"], int(w_bits), int(a_bits), **without(qcfg, "name"))


def build_model_and_method(cfg: DictConfig, num_classes: int) -> tuple[nn.Module, Any]:
    """The model of ``cfg`` with its layers swapped by the method at ``cfg.precision``."""
    check_precision(plain(cfg.precision))
    model = build_model_from_cfg(cfg, num_classes)
    method = build_method_from_cfg(cfg, cfg.precision.w_bits, cfg.precision.a_bits)
    bind = getattr(method.loss, "bind_models", None)
    if callable(bind):  # a method's loss that builds a model by name (a distillation teacher) gets the factory
        bind(build_model)
    prepare(model, method)
    return model, method


def build_data_from_cfg(cfg: DictConfig, device: torch.device, rank: int = 0, world_size: int = 1):
    """The dataset of ``cfg``; under DDP rank ``rank``'s shard with ``trainer.batch_size / world_size`` per step."""
    dcfg = plain(cfg.dataset)
    data = build_data(
        dcfg["name"],
        **without(dcfg, "name", "num_classes"),
        batch_size=per_rank_batch(int(cfg.trainer.batch_size), world_size, int(cfg.trainer.get("accumulate") or 1)),
        device=device,
        seed=int(cfg.seed),
        rank=rank,
        world_size=world_size,
    )
    want = dcfg.get("num_classes")
    if want is not None and int(want) != data.num_classes:
        raise QreproError(
            f"dataset={dcfg['name']} at {dcfg.get('root')} has {data.num_classes} classes but dataset.num_classes="
            f"{want}; point dataset.root at the right data or pick the matching dataset"
        )
    return data


def init_model(model: nn.Module, path: str, strict: bool = True) -> None:
    sd, fmt = extract_state_dict(read_checkpoint(path))
    check_finite(sd, f"checkpoint {path}")
    kept = load_model_state(model, sd, strict=strict)
    note = f" ({len(kept)} quantizer tensors keep their initial values)" if kept else ""
    print(f"initialised from {path} [{fmt} format]{note}", flush=True)


def make_logger(
    cfg: DictConfig, run_dir: Path, config: dict[str, Any], resume_id: str | None = None, concurrent: bool = False
):
    """The run's logger; ``resume_id``: the W&B run id of the run being resumed (the same W&B run continues);
    ``concurrent``: several runs log from this process at once (batched members)."""
    lcfg = plain(cfg.logger)
    name = lcfg.pop("name")
    if name != "wandb":
        return qlogging.build_logger(name)
    own = [f"model:{cfg.model.name}", f"method:{cfg.quantizer.name}", f"bits:{cfg.precision.name}"]
    tags = list(lcfg.pop("tags", None) or []) + own
    return qlogging.build_logger(
        "wandb",
        run_dir=str(run_dir),
        name=f"{cfg.name}/{run_dir.name}",
        config=config,
        tags=tags,
        resume_id=resume_id,
        **({"concurrent": True} if concurrent else {}),
        **lcfg,
    )


def build_optimization(cfg: DictConfig, model: nn.Module, steps_per_epoch: int):
    """(optimizer, scheduler) of ``cfg`` over ``model``, the schedule spanning ``trainer.epochs`` epochs."""
    ocfg = plain(cfg.optimizer)
    optimizer = build_optimizer(model, ocfg.pop("name"), ocfg.pop("groups", None), **ocfg)
    scfg = plain(cfg.scheduler)
    scheduler = build_scheduler(
        optimizer,
        scfg.pop("name"),
        total_steps=int(cfg.trainer.epochs) * steps_per_epoch,
        steps_per_epoch=steps_per_epoch,
        **scfg,
    )
    if hasattr(optimizer, "attach_scheduler"):  # e.g. TR optimizers whose target rate follows the LR schedule
        optimizer.attach_scheduler(scheduler)
    return optimizer, scheduler


def make_loss_fn(cfg: DictConfig):
    return functools.partial(nn.functional.cross_entropy, label_smoothing=float(cfg.trainer.label_smoothing))


@dataclass
class Components:
    """What one training run is made of, built from a config exactly as the trainer builds it."""

    cfg: DictConfig
    model: nn.Module
    method: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loss_fn: Any
    ema: Any
    device: torch.device
    steps_per_epoch: int
    data: Any = None
    hooks: list[Any] = field(default_factory=list)  # the method's and the optimizer's (the trainer adds DDP sync)


def build_components(
    cfg: DictConfig,
    device: torch.device,
    *,
    data: Any = None,
    num_classes: int | None = None,
    steps_per_epoch: int | None = None,
    dtype: torch.dtype | None = None,
    init: bool = True,
    sync_bn: bool = False,
) -> Components:
    """Model + method, initialisation (``init_from``), optimizer, schedule, loss and EMA for ``cfg``.

    ``data`` (a DataBundle) gives the class count and steps per epoch; without it both must be passed.
    ``dtype`` converts the model (float64 for parity checks) before ``init_from`` is loaded into it.
    """
    if data is not None:
        num_classes = data.num_classes if num_classes is None else num_classes
        steps_per_epoch = len(data.train) if steps_per_epoch is None else steps_per_epoch
    if num_classes is None or steps_per_epoch is None:
        raise ValueError("build_components needs data or both num_classes and steps_per_epoch")
    model, method = build_model_and_method(cfg, num_classes)
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # same Parameter objects, BN over the global batch
    model.to(device)
    if dtype is not None:
        model.to(dtype)
    if init and cfg.init_from:
        init_model(model, cfg.init_from, strict=bool(cfg.init_strict))
    optimizer, scheduler = build_optimization(cfg, model, steps_per_epoch)
    return Components(
        cfg=cfg,
        model=model,
        method=method,
        optimizer=optimizer,
        scheduler=scheduler,
        loss_fn=method.loss if method.loss is not None else make_loss_fn(cfg),  # a method may bring its own
        ema=EMA(model, float(cfg.trainer.ema)) if cfg.trainer.ema else None,
        device=device,
        steps_per_epoch=steps_per_epoch,
        data=data,
        hooks=list(method.hooks) + list(getattr(optimizer, "hooks", [])),
    )
