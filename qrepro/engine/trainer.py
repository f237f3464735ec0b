"""``fit``: epochs of train/evaluate with atomic checkpoints, resume, NaN guard, hooks and the run record."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qrepro.engine import dist as qdist
from qrepro.engine.checkpoint import atomic_save, read_checkpoint
from qrepro.engine.hooks import Context, Hook
from qrepro.engine.loop import NonFiniteLoss, evaluate, train_one_epoch
from qrepro.engine.record import device_name, git_info, versions, write_json_atomic
from qrepro.errors import QreproError


@dataclass
class FitResult:
    record: dict[str, Any]
    record_path: Path
    diverged: bool = False


@dataclass
class Fit:
    """Everything ``fit`` needs, as plain objects (the Hydra entry point builds it)."""

    model: nn.Module
    data: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loss_fn: Any
    epochs: int
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


def _ckpt_state(f: Fit, epoch: int, best: dict, curves: dict, hooks_state: list) -> dict[str, Any]:
    st = {
        "model": f.model.state_dict(),
        "optimizer": f.optimizer.state_dict(),
        "epoch": epoch,
        "best": best,
        "curves": curves,
        "hooks": hooks_state,
    }
    if f.scheduler is not None:
        st["scheduler"] = f.scheduler.state_dict()
    if f.ema is not None:
        st["ema"] = f.ema.state_dict()
    return st


def _main_lr(optimizer: torch.optim.Optimizer) -> float:
    """The LR of the default parameter group (the one no tag rule matched), else of the largest group."""
    groups = optimizer.param_groups
    plain = [g for g in groups if not g.get("tags") and not g.get("fixed_lr")]
    g = plain[0] if plain else max(groups, key=lambda g: len(g["params"]))
    return float(g["lr"])


def fit(f: Fit) -> FitResult:
    ckpt_path = f.run_dir / "checkpoints" / "last.pt"
    best_path = f.run_dir / "checkpoints" / "best.pt"
    record_path = f.run_dir / "record.json"
    curves: dict[str, list] = {}
    best = {"top1": -1.0, "top5": 0.0, "epoch": -1}
    start_epoch = 0
    if f.resume and ckpt_path.exists():
        st = read_checkpoint(ckpt_path)
        f.model.load_state_dict(st["model"])
        f.optimizer.load_state_dict(st["optimizer"])
        if f.scheduler is not None and "scheduler" in st:
            f.scheduler.load_state_dict(st["scheduler"])
        if f.ema is not None and "ema" in st:
            f.ema.load_state_dict(st["ema"])
        for h, hs in zip(f.hooks, st.get("hooks", [])):
            h.load_state_dict(hs)
        start_epoch, best, curves = st["epoch"] + 1, st["best"], st["curves"]
        if f.is_main:
            print(f"resumed from {ckpt_path} after epoch {st['epoch'] + 1}/{f.epochs}", flush=True)
    elif f.resume and f.is_main:
        print(f"resume=true but no checkpoint at {ckpt_path}: starting from scratch", flush=True)

    train_model = f.train_model or f.model
    first = next(iter(f.data.train))
    ctx = Context(
        model=f.model,
        optimizer=f.optimizer,
        scheduler=f.scheduler,
        data=f.data,
        sample_batch=first,
        logger=f.logger,
        epoch=start_epoch,
        step=start_epoch * len(f.data.train),
    )
    for h in f.hooks:
        h.on_train_start(ctx)
    if f.ema is not None and start_epoch == 0:  # hooks may initialise state (e.g. quantizer calibration)
        f.ema.load_state_dict(f.model.state_dict())
    eval_model = f.ema.module if f.ema is not None else f.model
    eval_forward = None
    if f.eval_compile is not None:
        from qrepro.engine.fast import compile_eval_forward

        eval_forward = compile_eval_forward(eval_model, f.eval_compile)
    started = time.time()
    git = git_info()  # the code that runs is the code at the start (a long run may outlive several commits)
    wall0 = time.perf_counter()
    total_images = 0
    total_seconds = 0.0
    diverged = None
    for epoch in range(start_epoch, f.epochs):
        t_epoch = time.perf_counter()
        ctx.epoch = epoch
        if hasattr(f.data.train, "set_epoch"):
            f.data.train.set_epoch(epoch)
        bar = None
        if f.progress and f.is_main:
            from tqdm import tqdm

            bar = tqdm(
                total=len(f.data.train),
                desc=f"epoch {epoch + 1}/{f.epochs}",
                leave=False,
                file=sys.stderr,
                mininterval=1.0,
                dynamic_ncols=True,
            )
        try:
            tr = train_one_epoch(
                train_model,
                f.data.train,
                f.optimizer,
                f.scheduler,
                f.loss_fn,
                ctx=ctx,
                hooks=f.hooks,
                regularizer=f.regularizer,
                ema=f.ema,
                log_every=f.log_every,
                progress=bar,
                forward_loss=f.forward_loss,
            )
        except NonFiniteLoss as e:
            diverged = f"{e}; stopped, last good checkpoint kept at {ckpt_path}"
            break
        finally:
            if bar is not None:
                bar.close()
        lr = _main_lr(f.optimizer)
        qdist.sync_buffers(eval_model)  # DDP: rank 0's BN/quantizer statistics, i.e. the checkpointed ones
        ev = evaluate(eval_model, f.data.test, all_reduce=True, forward=eval_forward)
        extra: dict[str, float] = {}
        for h in f.hooks:
            extra.update(h.on_epoch_end(ctx, epoch) or {})
        row = {
            "epoch": epoch + 1,
            "train_loss": tr["train_loss"],
            "train_top1": tr["train_top1"],
            **ev,
            "lr": lr,
            "images_per_s": tr["images_per_s"],
            "epoch_s": time.perf_counter() - t_epoch,  # training + evaluation + hooks (not the checkpoint write)
            **extra,
        }
        for k, v in row.items():
            curves.setdefault(k, []).append(v)
        total_images += tr["images"]
        total_seconds += tr["seconds"]
        is_best = ev["test_top1"] > best["top1"]
        if is_best:
            best = {"top1": ev["test_top1"], "top5": ev["test_top5"], "epoch": epoch + 1}
        if f.is_main:
            print(
                f"epoch {epoch + 1}/{f.epochs}  loss {tr['train_loss']:.4f}  train {tr['train_top1']:.2f}%  "
                f"test {ev['test_top1']:.2f}% (best {best['top1']:.2f}%)  lr {lr:.3g}  "
                f"{tr['images_per_s']:.0f} img/s",
                flush=True,
            )
            if f.logger is not None:
                f.logger.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=ctx.step)
            state = _ckpt_state(f, epoch, best, curves, [h.state_dict() for h in f.hooks])
            atomic_save(state, ckpt_path)
            if is_best:
                atomic_save({"model": f.model.state_dict(), "epoch": epoch, "top1": ev["test_top1"]}, best_path)

    wall = time.perf_counter() - wall0
    done = diverged is None
    last = {k: (v[-1] if v else None) for k, v in curves.items()}
    record = {
        "complete": done,
        "status": "complete" if done else "diverged",
        **f.record_base,
        "run_dir": str(f.run_dir),
        "metrics": {
            "best_top1": best["top1"] if best["epoch"] > 0 else None,
            "best_top5": best["top5"] if best["epoch"] > 0 else None,
            "best_epoch": best["epoch"] if best["epoch"] > 0 else None,
            "last_top1": last.get("test_top1"),
            "last_top5": last.get("test_top5"),
            "epochs_done": len(curves.get("epoch", [])),
        },
        "curves": curves,
        "git": git,
        "versions": versions(),
        "device": device_name(f.device),
        "wall_time_s": wall,
        "images_per_s": total_images / total_seconds if total_seconds else None,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "checkpoint": str(ckpt_path),
    }
    if diverged:
        record["error"] = diverged
    if f.is_main:
        write_json_atomic(record, record_path)
    if diverged:
        raise QreproError(f"training diverged: {diverged}")
    return FitResult(record, record_path)
