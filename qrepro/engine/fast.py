"""The fast training path: ``torch.compile`` of the per-step forward (model + loss + regularizer + accuracy
count), CUDA graphs on GPU, cuDNN autotuning. Used by the trainer (``trainer.compile``) and by the benchmark
(``python -m qrepro.bench``), so the benchmark times exactly what a training run executes.

What is compiled is ``make_forward_loss(...)``: AOTAutograd derives the backward graph, so forward and
backward of every fake-quantizer are fused with the convolutions' neighbours. The optimizer step, the LR
schedule and the hooks stay eager (the schedule sets Python-float LRs every step, which would recompile a
compiled ``optimizer.step``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from qrepro.errors import QreproError

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
COMPILE_SETTINGS = ("auto", "true", "false", *COMPILE_MODES)
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
_ALIASES = {"none": "false", "null": "false", "0": "false", "off": "false", "no": "false"}
_ALIASES |= {"1": "true", "on": "true", "yes": "true"}

ForwardLoss = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def with_input(loss_fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """The training loss as ``(logits, y, x) -> loss``: a loss marked ``takes_input = True`` (``Method.loss``, e.g.
    distillation from a teacher on the same batch) as it is, a plain ``(logits, y)`` criterion ignoring ``x``."""
    if getattr(loss_fn, "takes_input", False):
        return loss_fn
    return lambda logits, y, x: loss_fn(logits, y)


def make_forward_loss(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    regularizer: Callable[[nn.Module], torch.Tensor | None] | None = None,
    *,
    autocast: Callable[[], Any] | None = None,
    input_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> ForwardLoss:
    """``(x, y) -> (loss, correct)``: forward, loss (+ the method's regularizer) and the number of correct
    top-1 predictions (a 0-d tensor, so accuracy needs no host read). The unit that ``torch.compile`` captures.
    ``autocast``: a factory of the mixed-precision context (``qrepro.engine.precision``, ``trainer.amp``);
    ``input_transform``: applied to ``x`` first (channels-last layout). ``loss_fn(logits, y)``, or
    ``loss_fn(logits, y, x)`` when it is marked ``takes_input`` (:func:`with_input`)."""
    unit = forward_loss_unit(loss_fn, regularizer, autocast)

    def forward_loss(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return unit(model, input_transform(x) if input_transform is not None else x, y)

    return forward_loss


def forward_loss_unit(loss_fn: Callable, regularizer: Callable | None, autocast: Any = None) -> Callable:
    """``(model, x, y) -> (loss, correct)``: :func:`make_forward_loss`'s unit with the model as an argument
    (batched members vmap it over their stacked parameters)."""
    criterion = with_input(loss_fn)

    def fl(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast() if autocast is not None else contextlib.nullcontext():
            logits = model(x)
            loss = criterion(logits, y, x)
            if regularizer is not None:
                r = regularizer(model)
                if r is not None:
                    loss = loss + r
        correct = logits.detach().argmax(1).eq(y).sum()
        return loss, correct

    return fl


def compile_mode(setting: Any, device: torch.device) -> str | None:
    """The ``torch.compile`` mode for ``trainer.compile`` on ``device``, or None for eager.

    ``auto``: compile only on CUDA; ``true``: compile on any device; ``false``: eager; a mode name: that mode.
    The automatic mode is ``reduce-overhead`` (CUDA graphs) on CUDA and ``default`` elsewhere.
    """
    s = str(setting).lower()  # None reads "none"
    s = _ALIASES.get(s, s)
    if s not in COMPILE_SETTINGS:
        raise QreproError(f"trainer.compile={setting!r} is not valid; use one of: {', '.join(COMPILE_SETTINGS)}")
    if s == "false" or (s == "auto" and device.type != "cuda"):
        return None
    if s in ("auto", "true"):
        return "reduce-overhead" if device.type == "cuda" else "default"
    return s


def compile_eval_forward(model: nn.Module, mode: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> model(x)`` compiled for evaluation (static shapes), so the fake-quantizers are fused at test time
    too. CUDA-graph modes are replaced by ``default`` here: evaluation runs once per epoch over large batches,
    where CUDA graphs gain little, and their output buffers would be overwritten by the next batch."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        return model(x)

    return torch.compile(forward, mode="default" if mode in CUDA_GRAPH_MODES else mode, dynamic=False)


def compile_forward_loss(fn: ForwardLoss, mode: str, backend: str = "inductor") -> ForwardLoss:
    """``torch.compile`` ``fn`` with static shapes (the last, smaller batch of an epoch gets its own graph
    instead of turning every graph dynamic).

    Modes with CUDA graphs mark a new step before each call: the tensors returned by the previous call live
    in the graph's memory pool and are overwritten, so callers must consume or copy them before the next call
    (``train_one_epoch`` does)."""
    if backend != "inductor":
        return torch.compile(fn, backend=backend, dynamic=False)
    compiled = torch.compile(fn, mode=mode, dynamic=False)
    if mode not in CUDA_GRAPH_MODES:
        return compiled

    def step(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(x, y)

    return step


def setup_device(device: torch.device, deterministic: bool = False) -> None:
    """cuDNN autotuning for the fixed training shapes (off under ``trainer.deterministic``)."""
    if device.type == "cuda" and not deterministic:
        torch.backends.cudnn.benchmark = True
