"""Optimizers and learning-rate schedules.

* ``OPTIMIZERS``: factories ``factory(param_groups, *, model, **cfg) -> torch.optim.Optimizer``. Wrappers such as the
  transition-rate-scheduled optimizers (optim/tr.py) or ASAM (optim/asam.py) register here too; every module of
  this package is imported automatically.
* ``param_groups(model, defaults, rules)``: parameter groups from tag rules (``norm``, ``bias``, ``depthwise``,
  ``weight``, ``quant`` and the quantizers' own ``param_tags``); the first matching rule wins.
* ``SCHEDULERS``: schedules exposing ``factor(step)``; they scale every group's ``initial_lr``. They step per
  iteration; ``per_epoch: true`` holds the factor of an epoch's first step for the whole epoch (a torch
  ``lr_scheduler`` stepped once per epoch, as e.g. the TR authors' code does).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from qrepro.errors import QreproError
from qrepro.registry import Registry, import_submodules

OPTIMIZERS = Registry("optimizer")
SCHEDULERS = Registry("scheduler")

_NORM = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


def param_tags(model: nn.Module) -> dict[str, set[str]]:
    """Tag every trainable parameter of ``model`` (qualified name -> set of tags)."""
    tags: dict[str, set[str]] = {}
    for mname, mod in model.named_modules():
        own_tags = getattr(mod, "param_tags", None)
        in_quantizer = own_tags is not None or any(part in ("wq", "aq") for part in mname.split("."))
        own_tags = own_tags or {}
        for pname, p in mod.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            if in_quantizer:
                t = {"quant", own_tags[pname]} if pname in own_tags else {"quant"}
            elif isinstance(mod, _NORM):
                t = {"norm"}
            elif pname == "bias":
                t = {"bias"}
            elif isinstance(mod, nn.Conv2d) and mod.groups > 1 and mod.groups == mod.in_channels:
                t = {"depthwise"}
            else:
                t = {"weight"}
            tags[f"{mname}.{pname}" if mname else pname] = t
    return tags


def param_groups(
    model: nn.Module, defaults: dict[str, Any], rules: Sequence[dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """One group per rule (plus the default group) with the parameters that match it first."""
    rules = list(rules or [])
    for r in rules:
        if "tags" not in r:
            raise QreproError(
                f"optimizer.groups entry {dict(r)} needs 'tags: [...]'; e.g. {{tags: [norm, bias], weight_decay: 0}}"
            )
    members: list[list[tuple[str, nn.Parameter]]] = [[] for _ in range(len(rules) + 1)]
    params = dict(model.named_parameters())
    for name, t in param_tags(model).items():
        k = next((i for i, r in enumerate(rules) if t & set(r["tags"])), len(rules))
        members[k].append((name, params[name]))
    groups = []
    for i, named in enumerate(members):
        if named:
            g = dict(defaults)
            if i < len(rules):
                g.update(rules[i], tags=list(rules[i]["tags"]))
            groups.append({**g, "params": [p for _, p in named], "param_names": [n for n, _ in named]})
    return groups


# torch optimizers by config name, with the config keys each takes
TORCH_OPTIMIZERS: dict[str, tuple[type[torch.optim.Optimizer], set[str]]] = {
    "sgd": (torch.optim.SGD, {"lr", "weight_decay", "momentum", "nesterov", "dampening"}),
    "adam": (torch.optim.Adam, {"lr", "weight_decay", "betas", "eps", "amsgrad"}),
    "adamw": (torch.optim.AdamW, {"lr", "weight_decay", "betas", "eps", "amsgrad"}),
    "nadam": (torch.optim.NAdam, {"lr", "weight_decay", "betas", "eps", "momentum_decay", "decoupled_weight_decay"}),
    "adamax": (torch.optim.Adamax, {"lr", "weight_decay", "betas", "eps"}),
    "rmsprop": (torch.optim.RMSprop, {"lr", "weight_decay", "alpha", "eps", "momentum", "centered"}),
    "adagrad": (torch.optim.Adagrad, {"lr", "weight_decay", "lr_decay", "eps", "initial_accumulator_value"}),
}


def torch_kwargs(name: str, cfg: dict[str, Any], base: str | None = None, also: Sequence[str] = ()) -> dict[str, Any]:
    """``cfg`` of optimizer ``name`` checked against the keys its torch optimizer ``base`` (default ``name``) takes
    (``also``: a wrapper's own keys, listed in the error), with ``betas`` as a tuple."""
    keys = TORCH_OPTIMIZERS[base or name][1]
    bad = sorted(set(cfg) - keys)
    if bad:
        raise QreproError(f"optimizer={name} does not take {bad}; allowed: {sorted(keys | set(also))}")
    return {k: tuple(v) if k == "betas" else v for k, v in cfg.items()}


def _strip(groups: list[dict[str, Any]], allowed: set[str]) -> list[dict[str, Any]]:
    """Remove bookkeeping keys a torch optimizer does not take (keeps them available to wrappers)."""
    return [{k: v for k, v in g.items() if k in allowed or k == "params"} for g in groups]


def keep_names(opt: torch.optim.Optimizer, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """``opt`` with the ``param_names`` and ``tags`` of the ``groups`` it was built from (torch drops them)."""
    for g, src in zip(opt.param_groups, groups):
        g["param_names"], g["tags"] = src.get("param_names", []), src.get("tags", [])
    return opt


def _torch_factory(name: str):
    cls, keys = TORCH_OPTIMIZERS[name]

    def factory(groups: list[dict[str, Any]], *, model: nn.Module | None = None, **cfg: Any) -> torch.optim.Optimizer:
        return keep_names(cls(_strip(groups, keys), **torch_kwargs(name, cfg)), groups)

    factory.__doc__ = f"optimizer={name}: plain torch.optim.{cls.__name__}."
    return factory


for _name in TORCH_OPTIMIZERS:
    OPTIMIZERS.register(_name)(_torch_factory(_name))


def _load_all() -> None:
    import_submodules(__name__, __path__)


def build_optimizer(model: nn.Module, name: str, groups: Sequence[dict[str, Any]] | None = None, **cfg: Any):
    """Optimizer ``name`` over ``model``'s parameters grouped by the tag ``groups`` rules."""
    _load_all()
    factory = OPTIMIZERS.get(name)
    defaults = {k: v for k, v in cfg.items() if k in ("lr", "weight_decay")}
    pg = param_groups(model, defaults, groups)
    if cfg.get("nesterov") and not cfg.get("momentum"):
        raise QreproError("optimizer.nesterov=true needs optimizer.momentum > 0")
    return factory(pg, model=model, **cfg)


# ----------------------------------------------------------------------------------------------- schedules
class Schedule:
    """Per-iteration multiplicative LR factor after a linear warm-up; ``step()`` sets ``lr = initial_lr * factor``
    in every group (groups flagged ``fixed_lr: True`` — e.g. transition-rate-scheduled weights — are left alone).
    ``main(step, t)`` gives the factor after the warm-up (``t``: the fraction of those steps done, in [0, 1])."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer | None,
        total_steps: int,
        steps_per_epoch: int,
        main: Callable[[int, float], float],
        warmup_epochs: float = 0.0,
        warmup_start_factor: float = 0.0,
        per_epoch: bool = False,
    ) -> None:
        if not isinstance(per_epoch, bool):
            raise QreproError(f"scheduler.per_epoch must be true or false, got {per_epoch!r}")
        self.optimizer = optimizer
        self.total_steps = max(1, total_steps)
        self.steps_per_epoch = max(1, steps_per_epoch)
        self.warmup_steps = int(round(warmup_epochs * steps_per_epoch))
        self.warmup_start_factor = warmup_start_factor
        self.per_epoch = per_epoch
        self.main = main
        self.last_step = 0
        if optimizer is not None:
            for g in optimizer.param_groups:
                g.setdefault("initial_lr", g["lr"])
            self._apply()

    def factor(self, step: int) -> float:
        if self.per_epoch:  # the factor of the epoch's first step (epoch e: factor(e·steps_per_epoch))
            step = step // self.steps_per_epoch * self.steps_per_epoch
        if step < self.warmup_steps:
            a = step / self.warmup_steps
            return self.warmup_start_factor + (1.0 - self.warmup_start_factor) * a
        return self.main(step, min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)))

    def _apply(self) -> None:
        f = self.factor(self.last_step)
        for g in self.optimizer.param_groups:
            if not g.get("fixed_lr", False):
                g["lr"] = g["initial_lr"] * f

    def step(self) -> None:
        self.last_step += 1
        if self.optimizer is not None:
            self._apply()

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_step = int(state["last_step"])
        if self.optimizer is not None:
            self._apply()


@SCHEDULERS.register("cosine")
def cosine(optimizer, total_steps, steps_per_epoch, min_factor: float = 0.0, **kw) -> Schedule:
    """Cosine decay per iteration (after a linear warm-up) to ``min_factor``."""

    def main(step: int, t: float) -> float:
        return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * t))

    return Schedule(optimizer, total_steps, steps_per_epoch, main, **kw)


@SCHEDULERS.register("multistep")
def multistep(
    optimizer, total_steps, steps_per_epoch, milestones: Sequence[float] = (), gamma: float = 0.1, **kw
) -> Schedule:
    """×gamma at each milestone (given in epochs)."""
    at = [int(round(m * steps_per_epoch)) for m in milestones]
    return Schedule(optimizer, total_steps, steps_per_epoch, lambda step, t: gamma ** sum(step >= m for m in at), **kw)


@SCHEDULERS.register("linear")
def linear(optimizer, total_steps, steps_per_epoch, end_factor: float = 0.0, **kw) -> Schedule:
    """Linear decay per iteration to ``end_factor``."""
    return Schedule(optimizer, total_steps, steps_per_epoch, lambda step, t: 1.0 + (end_factor - 1.0) * t, **kw)


@SCHEDULERS.register("constant")
def constant(optimizer, total_steps, steps_per_epoch, **kw) -> Schedule:
    return Schedule(optimizer, total_steps, steps_per_epoch, lambda step, t: 1.0, **kw)


def build_scheduler(optimizer, name: str, *, total_steps: int, steps_per_epoch: int, **cfg: Any) -> Schedule:
    cls = SCHEDULERS.get(name)
    try:
        return cls(optimizer, total_steps, steps_per_epoch, **cfg)
    except TypeError as e:
        raise QreproError(f"bad options for scheduler={name}: {e}") from None
