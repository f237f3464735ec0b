"""The training loop: ``train_one_epoch`` and ``evaluate`` as plain functions.

Metrics are accumulated on the device and read once per ``log_every`` steps (no host synchronisation per step).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from qrepro.engine import dist as qdist
from qrepro.engine.fast import ForwardLoss, make_forward_loss
from qrepro.hooks import Context, Hook


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or inf."""


def _topk_correct(logits: torch.Tensor, y: torch.Tensor, ks: Sequence[int] = (1, 5)) -> list[torch.Tensor]:
    maxk = min(max(ks), logits.shape[1])
    pred = logits.topk(maxk, dim=1).indices
    hit = pred.eq(y.view(-1, 1))
    return [hit[:, : min(k, maxk)].any(dim=1).sum() for k in ks]


def start_training(ctx: Context, hooks: Sequence[Hook] = (), ema: Any = None, *, fresh: bool = True) -> None:
    """The start of training on its first batch (``ctx.sample_batch``), as the trainer takes it and the in-process
    API with it: the hooks' ``on_train_start`` (data-dependent initialisation such as quantizer calibration),
    then, when training starts from scratch, the EMA copies the (possibly just initialised) model."""
    for h in hooks:
        h.on_train_start(ctx)
    if ema is not None and fresh:
        ema.load_state_dict(ctx.model.state_dict())


def train_step(
    model: nn.Module,
    forward_loss: ForwardLoss,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    ctx: Context,
    hooks: Sequence[Hook] = (),
    ema: Any = None,
    scaler: Any = None,
    accumulate: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step exactly as the trainer takes it: forward + loss (+ regularizer) and backward, then
    :func:`finish_step` (a two-pass optimizer such as ASAM gets a closure). Returns (the step's loss, number of
    correct top-1 predictions), detached copies (under CUDA graphs the next call overwrites the compiled outputs).

    ``accumulate`` = N > 1 (``trainer.accumulate``): N :func:`micro_batches`, each forward + backward on its own,
    gradients summed before the one optimizer step (a closure recomputes them over the same micro-batches). Only
    what a training forward updates (BatchNorm's batch statistics and running averages) sees micro-batches."""
    parts = micro_batches(x, y, accumulate) if accumulate > 1 else [(x, y, 1.0)]
    no_sync = getattr(model, "no_sync", None)  # DDP
    optimizer.zero_grad(set_to_none=True)
    step_loss, correct = accumulate_grads(forward_loss, parts, scaler.scale if scaler is not None else None, no_sync)
    closure = None
    if scaler is None and getattr(optimizer, "needs_closure", False):  # the closure recomputes loss and gradients

        def closure():
            optimizer.zero_grad(set_to_none=True)
            return accumulate_grads(forward_loss, parts, None, no_sync)[0]

    finish_step(model, optimizer, scheduler, scaler, ema, hooks, ctx, step_loss, closure)
    return step_loss, correct


def finish_step(model, optimizer, scheduler, scaler, ema, hooks, ctx: Context, step_loss, closure=None) -> None:
    """What follows the backward pass: the optimizer step (fp16: through ``scaler``, skipped and the scale lowered
    on overflow; ``closure``: a two-pass optimizer's), the LR schedule, the EMA, the step count and the hooks'
    ``on_step_end``."""
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    elif closure is not None:
        optimizer.step(closure)
    else:
        optimizer.step()
    if scheduler is not None:
        scheduler.step()
    if ema is not None:
        ema.update(model)
    ctx.step += 1
    ctx.loss = step_loss
    for h in hooks:
        h.on_step_end(ctx, ctx.step)


def micro_batches(
    x: torch.Tensor, y: torch.Tensor, n: int, dim: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    """``(x_i, y_i, w_i)``: the batch split along its batch dimension ``dim`` into ``n`` micro-batches of equal size
    (sizes differing by one when ``n`` does not divide it, e.g. an epoch's last, smaller batch; none empty),
    each with the weight ``w_i = |x_i| / |x|``. For a loss that is a mean over the batch (plus a term that does
    not depend on it, such as a weight regularizer), ``sum_i w_i loss(x_i)`` is the loss of the whole batch, so
    the summed gradients of the weighted micro-losses are the whole batch's gradient."""
    b = int(y.shape[dim])
    parts = zip(x.tensor_split(n, dim=dim), y.tensor_split(n, dim=dim))
    return [(xi, yi, yi.shape[dim] / b) for xi, yi in parts if yi.shape[dim]]


def accumulate_grads(
    forward_loss: ForwardLoss,
    parts: Sequence[tuple[torch.Tensor, torch.Tensor, float]],
    scale: Callable[[torch.Tensor], torch.Tensor] | None = None,
    no_sync: Callable[[], Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward + backward of each weighted micro-batch, gradients summed into ``.grad``; returns the whole batch's
    loss (``sum_i w_i loss_i``) and its number of correct top-1 predictions. ``scale``: the weighted loss -> what is
    backpropagated (fp16: the scaled loss; batched members: their summed losses), the loss itself when None.
    ``no_sync`` (DDP's): only the last backward all-reduces the gradients."""
    loss_sum = correct_sum = 0
    for i, (xi, yi, w) in enumerate(parts):
        with no_sync() if no_sync is not None and i < len(parts) - 1 else contextlib.nullcontext():
            loss, correct = forward_loss(xi, yi)
            loss = loss * w
            with torch.no_grad():  # before the next call (CUDA graphs overwrite the compiled outputs)
                lv, cv = loss.detach().clone(), correct.clone()
            (scale(loss) if scale is not None else loss).backward()
        loss_sum, correct_sum = loss_sum + lv, correct_sum + cv
    return loss_sum, correct_sum


def train_one_epoch(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    ctx: Context,
    hooks: Sequence[Hook] = (),
    regularizer: Callable[[nn.Module], torch.Tensor | None] | None = None,
    ema: Any = None,
    log_every: int = 50,
    progress: Any = None,
    forward_loss: ForwardLoss | None = None,
    scaler: Any = None,
    accumulate: int = 1,
) -> dict[str, float]:
    """One epoch. ``forward_loss`` (e.g. the compiled one of ``qrepro.engine.fast``) replaces
    ``make_forward_loss(model, loss_fn, regularizer)``; ``accumulate``: micro-batches per step (:func:`train_step`)."""
    model.train()
    forward_loss = forward_loss or make_forward_loss(model, loss_fn, regularizer)
    dev_loss = dev_correct = n_seen = steps = 0
    data_s = 0.0  # time spent waiting for the loader
    t0 = time.perf_counter()
    it = iter(loader)
    while True:
        td = time.perf_counter()
        if (batch := next(it, None)) is None:
            break
        x, y = batch
        data_s += time.perf_counter() - td
        step_loss, correct = train_step(
            model, forward_loss, optimizer, scheduler, x, y, ctx=ctx, hooks=hooks, ema=ema, scaler=scaler,
            accumulate=accumulate,
        )  # fmt: skip
        with torch.no_grad():
            dev_loss, dev_correct = dev_loss + step_loss * y.shape[0], dev_correct + correct
        n_seen += y.shape[0]
        steps += 1
        if steps % log_every == 0:
            loss_v = float(qdist.all_reduce_sum(step_loss))  # every rank stops together on a NaN
            if not math.isfinite(loss_v):
                raise NonFiniteLoss(f"loss is {loss_v} at step {ctx.step} (epoch {ctx.epoch + 1})")
            if progress is not None:
                dt = time.perf_counter() - t0
                progress.set_postfix(
                    loss=f"{float(dev_loss) / n_seen:.3f}",
                    acc=f"{100 * float(dev_correct) / n_seen:.1f}",
                    img_s=f"{n_seen * qdist.world_size() / max(dt, 1e-9):.0f}",  # all ranks (equal batches)
                    refresh=False,
                )
        if progress is not None:
            progress.update(1)
    if n_seen == 0:
        raise RuntimeError("the training loader yielded no batch (batch size larger than the dataset?)")
    if qdist.is_distributed():  # epoch metrics over the global batch (all ranks)
        sums = qdist.all_reduce_sum(
            torch.stack([dev_loss.double(), dev_correct.double(), dev_loss.new_tensor(n_seen).double()])
        )
        dev_loss, dev_correct, n_seen = sums[0], sums[1], int(sums[2])
    loss_v = float(dev_loss) / n_seen
    if not math.isfinite(loss_v):
        raise NonFiniteLoss(f"mean loss of epoch {ctx.epoch + 1} is {loss_v}")
    return epoch_metrics(loss_v, 100.0 * float(dev_correct) / n_seen, n_seen, time.perf_counter() - t0, data_s)


def epoch_metrics(loss: float, top1: float, images: int, seconds: float, data_s: float) -> dict[str, float]:
    """``train_one_epoch``'s result (``data_s``: seconds spent waiting for the loader)."""
    return {
        "train_loss": loss,
        "train_top1": top1,
        "images": images,
        "seconds": seconds,
        "data_seconds": data_s,
        "images_per_s": images / max(seconds, 1e-9),
    }


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    all_reduce: bool = False,
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, float]:
    """Top-1/top-5 accuracy (percent) and mean cross-entropy over ``loader``.

    ``forward``: ``x -> logits`` to use instead of ``model(x)``, e.g. its compiled form
    (``qrepro.engine.fast.compile_eval_forward``); ``model`` is still the one switched to eval mode.

    ``all_reduce``: every DDP rank calls this on its shard of the test set and the sums are all-reduced, so every
    rank gets the metrics of the whole set (exact: the eval shards do not overlap and are not padded).
    """
    was_training = model.training
    model.eval()
    tot = c1 = c5 = n = 0
    for x, y in loader:
        logits = forward(x) if forward is not None else model(x)
        a, b = _topk_correct(logits, y)
        tot, c1, c5, n = tot + nn.functional.cross_entropy(logits, y) * y.shape[0], c1 + a, c5 + b, n + y.shape[0]
    model.train(was_training)
    if all_reduce and qdist.is_distributed():
        dev = next(model.parameters()).device
        local = [torch.as_tensor(v, dtype=torch.float64, device=dev) for v in (tot, c1, c5, float(n))]
        sums = qdist.all_reduce_sum(torch.stack(local))
        tot, c1, c5, n = sums[0], sums[1], sums[2], int(sums[3])
    if n == 0:
        return {"test_loss": float("nan"), "test_top1": 0.0, "test_top5": 0.0}
    return {"test_loss": float(tot) / n, "test_top1": 100.0 * float(c1) / n, "test_top5": 100.0 * float(c5) / n}
