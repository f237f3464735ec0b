"""Transition counting of discrete weights and the transition-rate monitor (TR scheduling paper, Eq. 5 and 10).

``TransitionCounter`` counts changes of the discrete weights ``w_d`` between steps from the latent weights;
``TRMonitor`` is the hook that reports the transition rate for any optimizer. The T-optimizers
(``qrepro.optim.tr``) count with the same ``TransitionCounter``; the monitor reads their counts when the optimizer
exposes them (``tr_last``, ``tr_global()``, ``tr_layer_names``) and counts itself otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from qrepro.errors import QreproError
from qrepro.hooks import Context, Hook
from qrepro.quant.layers import quantized_layers

# ----------------------------------------------------------------------------------------------------------
# Discrete weights and transition counting


def tr_layers(model: nn.Module, strict: bool = True) -> list[tuple[str, nn.Parameter, nn.Module]]:
    """(name, latent weight, weight quantizer) of every quantized layer whose quantizer exposes discrete
    weights (``discrete(w)`` / ``from_discrete(w_d)``, e.g. ``quantizer=tr``)."""
    out, missing = [], []
    for name, layer in quantized_layers(model):
        wq = layer.wq
        if wq is None:
            continue
        if callable(getattr(wq, "discrete", None)) and callable(getattr(wq, "from_discrete", None)):
            out.append((name, layer.weight, wq))
        else:
            missing.append(name)
    if strict and (missing or not out):
        wq = type(model.get_submodule(missing[0]).wq).__name__ if missing else ""
        what = f"layers {missing[:3]} use {wq}" if missing else "the model has no quantized weights"
        raise QreproError(
            f"transition-rate scheduling needs weight quantizers exposing discrete weights, but {what}; "
            "use quantizer=tr (and a precision with quantized weights, e.g. precision=w2a2)"
        )
    return out


class TransitionCounter:
    """Counts changes of the discrete weights w_d between consecutive calls, from the latent weights.

    The previous w_d are kept as int8 (one byte per weight), so quantizers must return integers in
    [−128, 127] (TR weights of up to 8 bits do).
    """

    def __init__(self, layers: Sequence[tuple[str, nn.Parameter, nn.Module]]) -> None:
        self.names = [n for n, _, _ in layers]
        self.weights = [w for _, w, _ in layers]
        self.quantizers = [q for _, _, q in layers]
        self.numel = [w.numel() for w in self.weights]
        self.prev: list[torch.Tensor] | None = None

    @torch.no_grad()
    def discrete(self) -> list[torch.Tensor]:
        return [q.discrete(w).to(torch.int8) for w, q in zip(self.weights, self.quantizers)]

    @torch.no_grad()
    def update(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per layer (number of changed w_d, Σ|Δw_q|) since the previous call (float64, on the weights'
        device, no host sync); None on the first call, which only records w_d."""
        cur = self.discrete()
        prev, self.prev = self.prev, cur
        if prev is None:
            return None
        changed = torch.stack([(c != p).sum() for c, p in zip(cur, prev)]).double()
        steps = torch.stack(
            [
                (q.from_discrete(c) - q.from_discrete(p)).abs().sum(dtype=torch.float64)
                for q, c, p in zip(self.quantizers, cur, prev)
            ]
        )
        return changed, steps

    def state_dict(self) -> dict[str, Any]:
        return {"prev": None if self.prev is None else [p.cpu() for p in self.prev]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        prev = state.get("prev")
        self.prev = None if prev is None else [p.to(w.device) for p, w in zip(prev, self.weights)]


class TRMonitor(Hook):
    """Monitors the transition rate of the quantized weights for any optimizer (plain or T).

    Per epoch the global values go to the record curves (and the logger): ``tr`` (mean k^t over the epoch),
    ``tr_step_size`` (mean |Δw_q| per step: the average effective step size), ``tr_running`` (K at epoch
    end), ``talr`` (U^t; for a plain optimizer the LR that updates the latent weights, cf. Fig. S4b) and,
    for T-optimizers, ``tr_target`` (R^t). Every ``every`` steps the logger also gets the same global values
    (``tr``, ``tr_step_size`` averaged over the window) and per layer ``tr/<layer>``,
    ``tr_running/<layer>`` and, for a per-layer T-optimizer, ``talr/<layer>``.

    With a T-optimizer the monitor reads the optimizer's own counts. With a plain optimizer it counts here,
    after each step, from the latent weights (never in forward); its running TRs start at 0, as does the
    per-layer running TR of a global-scope T-optimizer. Only one monitor is active per run (a method and an
    optimizer may both contribute one).
    """

    def __init__(self, every: int = 100, momentum: float = 0.99) -> None:
        self.every = every
        self.momentum = momentum
        self.active = False
        self.opt: Any = None  # a T-optimizer (qrepro.optim.tr) whose counts the monitor reads
        self._resume: dict[str, Any] = {}

    def state_dict(self) -> dict[str, Any]:
        return {"K_layers": self.K_layers.tolist()} if self.active else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resume = dict(state)  # applied in on_train_start (the trainer resumes before it)

    def on_train_start(self, ctx: Context) -> None:
        owner = ctx.extra.setdefault("tr_monitor", self)
        self.active = owner is self
        if not self.active:
            return
        opt = ctx.optimizer
        self.opt = opt if callable(getattr(opt, "tr_global", None)) else None
        self.counter: TransitionCounter | None = None
        if self.opt is not None:
            self.names = self.opt.tr_layer_names
            numel, dev = self.opt._tr_counter.numel, torch.device("cpu")
        else:
            layers = tr_layers(ctx.model, strict=False)
            if not layers:
                self.active = False
                return
            self.counter = TransitionCounter(layers)
            self.counter.update()  # records w_d before the first step
            self.names, numel, dev = self.counter.names, self.counter.numel, layers[0][1].device
            ids = {id(w) for _, w, _ in layers}
            groups = getattr(opt, "param_groups", [])
            self.lr_group = next((g for g in groups if any(id(p) in ids for p in g["params"])), None)
        self.numel = torch.tensor(numel, dtype=torch.float64, device=dev)
        self.K_layers = torch.zeros(len(numel), dtype=torch.float64, device=dev)
        if len(self._resume.get("K_layers", [])) == len(numel):
            self.K_layers = torch.tensor(self._resume["K_layers"], dtype=torch.float64, device=dev)
        self.epoch_sums = self._zeros()
        self.window_sums = self._zeros()

    def _zeros(self) -> dict[str, Any]:
        return {"n": 0, "k": 0.0, "step": 0.0, "k_layers": 0.0}

    def on_step_end(self, ctx: Context, step: int) -> None:
        if not self.active:
            return
        if self.opt is not None:
            last = self.opt.tr_last
            if "k" not in last:  # first step: no previous discrete weights yet
                return
            k, s = last["k"], last["step_size"]
            k_layers = torch.tensor(last["k_layers"], dtype=torch.float64)
        else:  # device tensors, no host sync
            changed, steps = self.counter.update()
            k_layers = changed / self.numel
            k, s = changed.sum() / self.numel.sum(), steps.sum() / self.numel.sum()
        self.K_layers = self.momentum * self.K_layers + (1.0 - self.momentum) * k_layers
        for acc in (self.epoch_sums, self.window_sums):
            for key, v in (("n", 1), ("k", k), ("step", s), ("k_layers", k_layers)):
                acc[key] = acc[key] + v
        if self.every and step % self.every == 0:
            self._log(ctx, step)

    def _means(self, acc: dict[str, Any]) -> dict[str, float]:
        """The global values of a window or an epoch: its mean TR and step size, the running TR and the TALR."""
        out = {"tr": float(acc["k"]) / acc["n"], "tr_step_size": float(acc["step"]) / acc["n"]}
        if self.opt is not None:
            return {**out, **self.opt.tr_global()}
        out["tr_running"] = float((self.K_layers * self.numel).sum() / self.numel.sum())
        if self.lr_group is not None:
            out["talr"] = float(self.lr_group["lr"])
        return out

    def _log(self, ctx: Context, step: int) -> None:
        acc, self.window_sums = self.window_sums, self._zeros()
        log = getattr(ctx.logger, "log", None)
        if not callable(log) or not acc["n"]:
            return
        vals = self._means(acc)
        vals.update({f"tr/{a}": v / acc["n"] for a, v in zip(self.names, acc["k_layers"].tolist())})
        K = self.K_layers.tolist()
        if self.opt is not None and len(self.opt.tr_last["K"]) == len(self.names):  # per-layer scope
            K = self.opt.tr_last["K"]
            vals.update({f"talr/{a}": v for a, v in zip(self.names, self.opt.tr_last["U"])})
        vals.update({f"tr_running/{a}": v for a, v in zip(self.names, K)})
        log(vals, step=step)

    def on_epoch_end(self, ctx: Context, epoch: int) -> dict[str, float]:
        if not self.active or not self.epoch_sums["n"]:
            return {}
        acc, self.epoch_sums = self.epoch_sums, self._zeros()
        return self._means(acc)
