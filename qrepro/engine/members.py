"""Batched members: K runs of one experiment, seeds S..S+K-1, trained in one process as one batched computation.

``python -m qrepro.train +experiment=<x> seed=S trainer.members=K`` trains member i exactly as the separate run
``seed=S+i`` and writes that run's directory, checkpoints and record (with a ``members`` field naming the batch).
Member i's parameters and buffers are the views ``stack[name][i]`` of stacked ``[K, ...]`` tensors
(:class:`MemberStack`), so one ``torch.func.vmap`` of ``functional_call`` computes all K losses and one backward pass
all K gradients; everything else a member owns (optimizer, schedule, hooks, EMA, gradient scaler, evaluation,
callbacks, RNG state) stays its own object, stepped in member order. What cannot be batched (random numbers in the
forward pass, closure optimizers such as ASAM, DDP, DataLoader-streamed datasets, operations without a ``vmap``
rule) is refused in one line (``QreproError``). Design and measured exactness: docs/speed.md, section 6.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, vmap

from qrepro.engine.callbacks import Console, progress_bar
from qrepro.engine.fast import compile_forward_loss, forward_loss_unit
from qrepro.engine.loop import NonFiniteLoss, accumulate_grads, epoch_metrics, finish_step, micro_batches
from qrepro.errors import QreproError


# ----------------------------------------------------------------------------------------------- RNG state
class RngState:
    """The global random-number state of one member (torch CPU and CUDA, numpy, python ``random``).

    A separate run owns the process's global generators; K members interleaved in one process would share them.
    ``with state:`` swaps this member's state in and saves it back on exit, so each member draws exactly the
    numbers its separate run draws (hooks, optimizers, data-independent initialisation)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.saved: tuple | None = None
        self._outer: tuple | None = None

    def _get(self) -> tuple:
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return torch.get_rng_state(), cuda, np.random.get_state(), random.getstate()

    def _set(self, s: tuple) -> None:
        torch.set_rng_state(s[0])
        if s[1] is not None:
            torch.cuda.set_rng_state(s[1], self.device)
        np.random.set_state(s[2])
        random.setstate(s[3])

    def capture(self) -> None:
        """Take the current global state as this member's."""
        self.saved = self._get()

    def __enter__(self) -> RngState:
        self._outer = self._get()
        if self.saved is not None:
            self._set(self.saved)
        return self

    def __exit__(self, *exc: object) -> None:
        self.saved = self._get()
        self._set(self._outer)
        self._outer = None


# --------------------------------------------------------------------------------------------- the stack
_VMAP_HINT = "run the seeds separately (trainer.members=1)"


class MemberStack:
    """K structurally identical models whose parameters and buffers are views into stacked ``[K, ...]`` tensors.

    ``params[name]`` are leaves of shape ``[K, *shape]`` (``requires_grad`` as the members' parameters) that
    receive the gradients of the batched backward pass; ``buffers[name]`` are plain stacked tensors. ``forward``
    runs ``fn(module, *args)`` for all members at once (``vmap`` over the stack, random numbers refused)."""

    def __init__(self, models: Sequence[nn.Module]) -> None:
        if len(models) < 1:
            raise ValueError("MemberStack needs at least one model")
        self.models, self.k = list(models), len(models)
        for i, m in enumerate(models[1:], 1):
            _check_same_structure(models[0], m, i)
        self.template = copy.deepcopy(models[0])  # functional_call swaps tensors into this copy, never a member's
        for p in self.template.parameters():
            p.requires_grad_(False)
        self.params: dict[str, torch.Tensor] = {}
        self.buffers: dict[str, torch.Tensor] = {}
        # (member, its owner's _parameters or _buffers dict, attribute, param?, name)
        self._slots: list[tuple[int, dict, str, bool, str]] = []
        self._ptr: dict[tuple[int, str], int] = {}
        owners = [_owners(m) for m in self.models]
        for j, store in enumerate((self.params, self.buffers)):
            for name in owners[0][j]:
                slots = [o[j][name] for o in owners]
                ts = [tensors[attr] for tensors, attr in slots]
                st = torch.stack([t.detach() for t in ts]).requires_grad_(j == 0 and ts[0].requires_grad)
                store[name] = st
                for i, (t, (tensors, attr)) in enumerate(zip(ts, slots)):
                    self._slots.append((i, tensors, attr, j == 0, name))
                    self._tie(i, name, t, st)
        self._hooks = [m._register_state_dict_hook(_compact_state_dict) for m in self.models]

    def _tie(self, i: int, name: str, t: torch.Tensor, st: torch.Tensor) -> None:
        view = st.detach()[i]
        t.data = view
        self._ptr[(i, name)] = view.data_ptr()

    def check_tied(self) -> int:
        """Re-tie every member tensor that was replaced since the last check (its value copied into the stack);
        returns how many. A replacement with another shape or dtype cannot be batched (one-line error)."""
        n = 0
        for i, tensors, attr, is_param, name in self._slots:
            t = tensors.get(attr)
            if t is None or not t.numel() or t.data_ptr() == self._ptr[(i, name)]:
                continue
            st = self.params[name] if is_param else self.buffers[name]
            if tuple(t.shape) != tuple(st.shape[1:]) or t.dtype != st.dtype or t.device != st.device:
                raise QreproError(
                    f"member {i}: {name} changed to shape {tuple(t.shape)} {t.dtype} during training, which batched "
                    f"members cannot follow; {_VMAP_HINT}"
                )
            with torch.no_grad():
                st.detach()[i].copy_(t.detach())
            self._tie(i, name, t, st)
            n += 1
        return n

    def release(self) -> None:
        """Give every member its own compact tensors again (the stack is no longer used)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for _i, tensors, attr, _is_param, _name in self._slots:
            t = tensors.get(attr)
            if t is not None and t.numel():
                t.data = t.detach().clone()
        self._slots = []

    # -- gradients -----------------------------------------------------------------------------------------
    def zero_grad(self) -> None:
        for st in self.params.values():
            st.grad = None
        for _i, tensors, attr, is_param, _name in self._slots:
            if is_param and tensors.get(attr) is not None:
                tensors[attr].grad = None

    def scatter_grads(self) -> None:
        """Member i's ``p.grad`` = the view ``params[name].grad[i]`` (None where the stack got no gradient)."""
        for i, tensors, attr, is_param, name in self._slots:
            p = tensors.get(attr)
            if is_param and p is not None and p.requires_grad:
                g = self.params[name].grad
                p.grad = None if g is None else g[i]

    # -- batched call --------------------------------------------------------------------------------------
    def vmapped(self, fn: Callable[..., Any], in_dims: tuple = ()) -> Callable[..., Any]:
        """``(*args) -> fn(template, *args)`` for every member at once: ``args`` batched along dim 0 as given by
        ``in_dims`` (0 = one slice per member, None = shared)."""
        template = self.template

        class _Call(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.m = template

            def forward(self, *args: Any) -> Any:
                return fn(self.m, *args)

        call = _Call()

        def one(p: dict, b: dict, *args: Any) -> Any:
            tensors = {"m." + k: v for d in (p, b) for k, v in d.items()}
            return functional_call(call, tensors, args, tie_weights=True, strict=False)

        batched = vmap(one, in_dims=(0, 0, *in_dims), randomness="error")

        def run(*args: Any) -> Any:
            try:
                return batched(self.params, self.buffers, *args)
            except RuntimeError as e:
                msg = str(e).splitlines()[0] if str(e) else type(e).__name__
                if "randomness" in msg or "random" in msg.lower():
                    raise QreproError(
                        f"batched members: the forward pass draws random numbers (dropout or a stochastic "
                        f"quantizer), which cannot be batched exactly; {_VMAP_HINT}"
                    ) from None
                if "vmap" in msg or "functorch" in msg or "autograd.Function" in msg or "Batching rule" in msg:
                    raise QreproError(f"batched members: an operation cannot be batched ({msg}); {_VMAP_HINT}") from e
                raise

        return run


def _owners(model: nn.Module) -> tuple[dict[str, tuple[dict, str]], ...]:
    """(param name -> (owner's ``_parameters``, attribute), buffer name -> (owner's ``_buffers``, attribute)),
    in the order and deduplicated as ``named_parameters``/``named_buffers`` are."""
    found: tuple[dict[str, tuple[dict, str]], ...] = ({}, {})
    seen: tuple[set[int], ...] = (set(), set())
    for mname, mod in model.named_modules():
        for j, tensors in enumerate((mod._parameters, mod._buffers)):
            for attr, t in tensors.items():
                if t is None or id(t) in seen[j]:
                    continue
                seen[j].add(id(t))
                found[j][f"{mname}.{attr}" if mname else attr] = (tensors, attr)
    return found


def _check_same_structure(a: nn.Module, b: nn.Module, i: int) -> None:
    def sig(m: nn.Module) -> dict[str, tuple]:
        out = {n: (tuple(t.shape), t.dtype, t.requires_grad) for n, t in m.named_parameters()}
        return out | {n: (tuple(t.shape), t.dtype, False) for n, t in m.named_buffers()}

    ta, tb = sig(a), sig(b)
    if ta != tb:
        diff = sorted(set(ta.items()) ^ set(tb.items()), key=str)[:2]
        raise QreproError(f"batched members: member {i}'s model differs from member 0's ({diff}); {_VMAP_HINT}")


def _compact_state_dict(module: nn.Module, state: dict, prefix: str, local_metadata: Any) -> dict:
    """State-dict hook of a member model: compact copies instead of views into the stack (a saved view would
    carry every member's tensors)."""
    state.update({k: v.detach().clone() for k, v in state.items() if isinstance(v, torch.Tensor)})
    return state


def check_python_state(models: Sequence[nn.Module]) -> None:
    """Plain Python attributes (flags, modes) that a forward pass may read must agree across members, since the
    batched forward runs one module structure; hooks that set them differently per member cannot be batched."""
    kinds = (bool, int, float, str, type(None))

    def attrs(m: nn.Module) -> dict[str, Any]:
        return {
            f"{mname}.{k}": v
            for mname, mod in m.named_modules()
            for k, v in vars(mod).items()
            if not k.startswith("_") and isinstance(v, kinds)
        }

    ref = attrs(models[0])
    for i, m in enumerate(models[1:], 1):
        other = attrs(m)
        bad = [k for k in ref if ref[k] != other.get(k) and not (_isnan(ref[k]) and _isnan(other.get(k)))]
        if bad:
            k = bad[0]
            raise QreproError(
                f"batched members: member {i} sets {k}={other.get(k)!r} where member 0 has {ref[k]!r}; the members "
                f"must share one module structure; {_VMAP_HINT}"
            )


def _isnan(v: Any) -> bool:
    return isinstance(v, float) and math.isnan(v)


# ---------------------------------------------------------------------------------------------- one step
@dataclass
class MemberSlot:
    """What one member owns besides its tensors (built exactly as its separate run builds them)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    hooks: list[Any]
    ema: Any
    ctx: Any
    rng: RngState
    scaler: Any = None


class BatchedStep:
    """One optimizer step of every member, exactly as ``qrepro.engine.loop.train_step`` takes it for one run:
    forward + loss (+ the method's regularizer) and backward batched over the stack (``accumulate`` > 1: over
    each of that many micro-batches of every member's batch, losses weighted by their share, gradients summed),
    then per member (in member order, with its own RNG state): the optimizer step (through its gradient scaler
    under fp16), the LR schedule, the EMA and the hooks' ``on_step_end``."""

    def __init__(
        self,
        slots: Sequence[MemberSlot],
        loss_fn: Callable,
        regularizer: Callable | None,
        autocast: Any = None,
        compile_mode: str | None = None,
        accumulate: int = 1,
    ) -> None:
        self.slots = list(slots)
        self.accumulate = accumulate
        for s in self.slots:
            if getattr(s.optimizer, "needs_closure", False):
                raise QreproError(
                    f"batched members: optimizer {type(s.optimizer).__name__} re-evaluates the loss inside step() "
                    f"(a closure, e.g. ASAM), which cannot be batched; {_VMAP_HINT}"
                )
        self.stack = MemberStack([s.model for s in self.slots])
        self.fn = self.stack.vmapped(forward_loss_unit(loss_fn, regularizer, autocast), in_dims=(0, 0))
        if compile_mode is not None:  # one graph for all members (CUDA graphs in reduce-overhead)
            self.fn = compile_forward_loss(self.fn, compile_mode)

    def __call__(self, xs: torch.Tensor, ys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.stack.template.train(True)
        for s in self.slots:
            s.model.train()
        self.stack.zero_grad()
        # trainer.accumulate: micro-batches of every member's batch, gradients summed
        parts = micro_batches(xs, ys, self.accumulate, dim=1) if self.accumulate > 1 else [(xs, ys, 1.0)]
        step_losses, correct = accumulate_grads(self.fn, parts, self._summed_losses)
        self.stack.scatter_grads()
        for i, s in enumerate(self.slots):
            with s.rng:
                finish_step(s.model, s.optimizer, s.scheduler, s.scaler, s.ema, s.hooks, s.ctx, step_losses[i])
        self.stack.check_tied()
        return step_losses, correct

    def _summed_losses(self, losses: torch.Tensor) -> torch.Tensor:
        """The members' (weighted) losses summed for one backward pass; fp16: each times its own scale."""
        if all(s.scaler is None for s in self.slots):
            return losses.sum()
        scaled = [s.scaler.scale(loss) if s.scaler is not None else loss for s, loss in zip(self.slots, losses)]
        return torch.stack(scaled).sum()

    def release(self) -> None:
        self.stack.release()


class BatchedEpoch:
    """The step strategy of K members (qrepro.engine.trainer.Cohort): one epoch is, per step, one batch from
    each member's own loader, stacked and stepped as one :class:`BatchedStep`. The loss is read on the host every
    ``log_every`` steps, as ``train_one_epoch`` reads it: a member whose loss is non-finite leaves the batch there
    (its outcome is that ``NonFiniteLoss``) and the others go on, batched among themselves."""

    def __init__(
        self,
        slots: Sequence[MemberSlot],
        loaders: Sequence[Any],
        loss_fn: Callable,
        regularizer: Callable | None,
        *,
        autocast: Any = None,
        compile_mode: str | None = None,
        log_every: int = 50,
        progress: bool = False,
        epochs: int = 0,
        accumulate: int = 1,
    ) -> None:
        self.slots, self.loaders = list(slots), list(loaders)
        self.args = (loss_fn, regularizer, autocast, compile_mode, accumulate)
        self.log_every, self.progress, self.epochs = log_every, progress, epochs
        self.step: BatchedStep | None = None
        self._build(self.slots)

    def _build(self, slots: list[MemberSlot]) -> None:
        self.release()
        check_python_state([s.model for s in slots])
        self.step = BatchedStep(slots, *self.args)

    def release(self) -> None:
        if self.step is not None:
            self.step.release()
            self.step = None

    def epoch(self, epoch: int) -> list[dict[str, float] | NonFiniteLoss]:
        """One epoch of every member; per member its ``train_one_epoch`` metrics or its ``NonFiniteLoss``."""
        outs: list[Any] = [None] * len(self.slots)
        live = list(range(len(self.slots)))  # members still in the batch (positions in self.slots)
        iters = [iter(ld) for ld in self.loaders]
        n_steps = len(self.loaders[0])
        bar = progress_bar(n_steps, f"epoch {epoch + 1}/{self.epochs} x{len(live)}") if self.progress else None
        dev_loss = dev_correct = n_seen = 0
        data_s = 0.0
        t0 = time.perf_counter()
        try:
            for s in range(n_steps):
                td = time.perf_counter()
                batches = [next(it) for it in iters]
                data_s += time.perf_counter() - td
                xs, ys = (torch.stack(t) for t in zip(*batches))
                losses, correct = self.step(xs, ys)
                with torch.no_grad():
                    dev_loss, dev_correct = dev_loss + losses * ys.shape[1], dev_correct + correct
                n_seen += ys.shape[1]
                if (s + 1) % self.log_every == 0:  # as train_one_epoch: one host read, each member stops on its NaN
                    vals = losses.tolist()
                    bad = [j for j, v in enumerate(vals) if not math.isfinite(v)]
                    if bad:
                        self.release()
                        for j in bad:
                            sl = self.slots[live[j]]
                            outs[live[j]] = NonFiniteLoss(
                                f"loss is {vals[j]} at step {sl.ctx.step} (epoch {epoch + 1})"
                            )
                        keep = [j for j in range(len(live)) if j not in bad]
                        live = [live[j] for j in keep]
                        if not live:
                            return outs
                        self._build([self.slots[i] for i in live])
                        iters = [iters[j] for j in keep]
                        dev_loss, dev_correct = dev_loss[keep], dev_correct[keep]
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        dt = time.perf_counter() - t0
        loss_v = (dev_loss.double() / n_seen).tolist()
        acc_v = (dev_correct.double() * (100.0 / n_seen)).tolist()
        for j, i in enumerate(live):
            if math.isfinite(loss_v[j]):
                outs[i] = epoch_metrics(loss_v[j], acc_v[j], n_seen, dt, data_s)
            else:
                outs[i] = NonFiniteLoss(f"mean loss of epoch {epoch + 1} is {loss_v[j]}")
        return outs


class MemberConsole(Console):
    """The console line of one member, prefixed with its label (``[seed=3]``)."""

    def __init__(self, label: str) -> None:
        super().__init__(progress=False)
        self.label = label

    def on_epoch_end(self, t: Any, epoch: int, row: dict[str, Any]) -> None:
        print(f"[{self.label}] ", end="")
        super().on_epoch_end(t, epoch, row)


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


# -------------------------------------------------------------------------------- run directories, seeds
def member_seeds(seed: int, members: int) -> list[int]:
    return [int(seed) + i for i in range(int(members))]


def member_overrides(overrides: Sequence[str], seed: int, index: int, seed_given: bool) -> list[str]:
    """Member ``index``'s command-line overrides: the launch's, without ``trainer.members``, with ``seed=S+index``
    (member 0 keeps the launch's own form: no seed override when none was given)."""
    out = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in ("seed", "trainer.members")]
    if index > 0 or seed_given:
        out.append(f"seed={seed + index}")
    return out


def batch_id(name: str, seeds: Sequence[int], overrides: Sequence[str]) -> str:
    """A name for one batched job: experiment name, seed range and a hash of the shared overrides."""
    h = hashlib.sha256(json.dumps([name, list(seeds), sorted(overrides)], default=str).encode()).hexdigest()[:12]
    return f"{name}:seeds={seeds[0]}-{seeds[-1]}:{h}"
