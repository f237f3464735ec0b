"""Transition-rate (TR) scheduling: the T-optimizers SGDT, AdamT, ... (Algorithm 1 of the TR paper).

One wrapper, :func:`tr_variant`, turns a torch optimizer class into its TR-scheduled variant. The latent
weights of quantized layers are put in their own parameter groups (marked ``talr: True``) whose learning
rate is the transition-adaptive LR (TALR) ``U^t``; the wrapped torch optimizer then computes its own
gradient term ``g^t`` (SGD momentum buffer, Adam's m̂/(√v̂+ε), ...) and applies ``w ← w − U^t·g^t``
(Eq. 12). Every other parameter uses the plain optimizer and the scheduled LR. Before each step:

1. ``k^t`` (Eq. 5): fraction of discrete weights ``w_d`` that changed since the previous step, recomputed
   from the latent weights and the (frozen) scale — counted in the optimizer, never in a forward pass, so
   extra training forwards (SAM's second pass, accumulation) cannot corrupt it. Variant S3: mean |Δw_q|.
2. ``K^t = m·K^{t−1} + (1−m)·k^t`` (Eq. 10).
3. TALR (Eq. 11, default) ``U^t = max(0, U^{t−1} + η(R^t − K^t))`` with η = U^0; or Eq. S1
   ``U^t = U^{t−1}·R^t/K^t``; or Eq. S2 ``U^t = m'U^{t−1} + (1−m')U^{t−1}·R^t/K^t`` (the authors' code).
4. Target TR ``R^t = R_f + (R^0 − R_f)·f(t)`` with ``R^0 = λ·sqrt(b_w)`` (paper; ``target_init: direct``
   takes ``R^0 = λ`` as the authors' script does) and ``f`` the LR scheduler's factor, so the target follows
   the same family (cosine to 0, step ÷5, linear) and the same stepping (per iteration, or per epoch).

Choices Algorithm 1 leaves open (documented, switchable): at the first step there is no previous ``w_d``,
so ``U^0`` (= the initial LR) is used unchanged; ``K`` starts at ``R^0`` (``running_init: target``; a
zero start makes the multiplicative rules divide by zero); one host sync per step reads ``k^t`` so that
``U^t`` is a plain float group LR.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn

from qrepro.errors import QreproError
from qrepro.hooks import Context, Hook
from qrepro.optim import OPTIMIZERS, TORCH_OPTIMIZERS, torch_kwargs
from qrepro.quant.transitions import TransitionCounter, TRMonitor, tr_layers  # noqa: F401  (TRMonitor: re-exported)

TALR_RULES = ("additive", "multiplicative", "momentum", "lr")
SCOPES = ("global", "layer")
MEASURES = ("transitions", "step_size")


@dataclass
class TRConfig:
    """Options of the T-optimizers (``optimizer.tr.*`` in the config)."""

    factor: float = 5e-3  # λ (target_init=sqrt_bits: R^0 = λ·sqrt(b_w)) or R^0 itself (target_init=direct)
    target_init: str = "sqrt_bits"  # sqrt_bits = paper (Sec. S4.1) | direct = authors' run.sh (--initial_tr)
    momentum: float = 0.99  # m of Eq. (10), also m' of Eq. (S2)
    rule: str = "additive"  # additive = Eq. 11 | multiplicative = S1 | momentum = S2 | lr: U^t = U^0·f(t)
    scope: str = "global"  # global = paper (one TR over all N weights) | layer = authors' code (per tensor)
    measure: str = "transitions"  # transitions = Eq. 5 | step_size = mean |Δw_q| (Eq. S3)
    final_target: float = 0.0  # R_f, the target TR at the end of the schedule (Table S6)
    eta: float | None = None  # η of Eq. (11); None = U^0 (paper)
    running_init: str = "target"  # K^0 = R^0 ("target") or 0 ("zero")
    target_schedule: str = "scheduler"  # follow the LR scheduler's factor(step) | constant
    freeze_weight_scale: bool = True  # weight scales are not trained under TR (Sec. S5.2)
    running_eps: float = 0.0  # S1/S2 divide by K^t + running_eps (authors' code: 1e-8); 0 floors K^t at 1e-12

    def __post_init__(self) -> None:
        for key, allowed in (
            ("rule", TALR_RULES),
            ("scope", SCOPES),
            ("measure", MEASURES),
            ("running_init", ("target", "zero")),
            ("target_schedule", ("scheduler", "constant")),
            ("target_init", ("sqrt_bits", "direct")),
        ):
            if getattr(self, key) not in allowed:
                val, choices = getattr(self, key), ", ".join(allowed)
                raise QreproError(f"optimizer.tr.{key}={val!r} is not valid; choose one of {choices}")
        if not 0.0 <= self.momentum < 1.0:
            raise QreproError(f"optimizer.tr.momentum must be in [0, 1), got {self.momentum}")
        if self.factor < 0 or self.final_target < 0 or self.running_eps < 0:
            raise QreproError("optimizer.tr.factor, .final_target and .running_eps must be >= 0")

    @classmethod
    def from_any(cls, tr: TRConfig | dict[str, Any] | None) -> TRConfig:
        if isinstance(tr, TRConfig):
            return tr
        tr = dict(tr or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(tr) - known)
        if unknown:
            raise QreproError(f"unknown optimizer.tr option(s) {unknown}; known: {', '.join(sorted(known))}")
        return cls(**tr)


# ----------------------------------------------------------------------------------------------------------
# TALR update rules (pure functions of Python floats; Eq. 11, S1, S2)


def talr_additive(u: float, big_k: float, r: float, eta: float) -> float:
    """Eq. (11): U^t = max(0, U^{t−1} + η(R^t − K^t))."""
    return max(0.0, u + eta * (r - big_k))


def talr_multiplicative(u: float, big_k: float, r: float, eps: float = 0.0) -> float:
    """Eq. (S1): U^t = U^{t−1}·R^t/K^t. ``eps`` = 0: K^t floored at 1e-12 and R^t = 0 gives 0; ``eps`` > 0:
    U^{t−1}·R^t/(K^t + eps), the authors' form (eps = 1e-8)."""
    if eps > 0:
        return u * r / (big_k + eps)
    return u * r / max(big_k, 1e-12) if r > 0 else 0.0


def talr_momentum(u: float, big_k: float, r: float, m: float, eps: float = 0.0) -> float:
    """Eq. (S2): U^t = m'·U^{t−1} + (1 − m')·U^{t−1}·R^t/K^t (authors' code: lr_scale update, eps = 1e-8)."""
    return m * u + (1.0 - m) * talr_multiplicative(u, big_k, r, eps)


# ----------------------------------------------------------------------------------------------------------
# The wrapper


class TransitionRateMixin:
    """Turns a torch optimizer class into its TR-scheduled variant (see the module docstring).

    Constructed as ``Cls(param_groups, model=model, tr={...}, **torch_kwargs)``. Attributes for monitoring:
    ``tr_last`` (values of the last step), ``hooks`` (target binding to the scheduler + the TR monitor).
    """

    param_groups: list[dict[str, Any]]

    def __init__(
        self, params: Iterable[Any], *, model: nn.Module, tr: TRConfig | dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        self.tr_cfg = cfg = TRConfig.from_any(tr)
        layers = tr_layers(model)
        self._tr_counter = TransitionCounter(layers)
        base_lr = float(kwargs.get("lr", 1e-3))
        groups = self._tr_split_groups(params, layers, cfg, base_lr)
        # torch treats `param_names` specially; keep our bookkeeping keys out of its constructor
        book = [{k: g.pop(k) for k in ("param_names", "tags") if k in g} for g in groups]
        super().__init__(groups, **kwargs)  # type: ignore[call-arg]
        for g, b in zip(self.param_groups, book):
            g.update(b)

        bits = [int(getattr(q, "bits", 0)) for _, _, q in layers]
        if min(bits) < 1:
            raise QreproError("transition-rate scheduling needs weight quantizers with a `bits` attribute")
        numel = self._tr_counter.numel
        r0_layers = [cfg.factor * (math.sqrt(b) if cfg.target_init == "sqrt_bits" else 1.0) for b in bits]
        self._tr_units = [[i] for i in range(len(layers))] if cfg.scope == "layer" else [list(range(len(layers)))]
        # R^0 of a unit: numel-weighted mean of λ·sqrt(b_l) (= λ·sqrt(b_w) when all layers share b_w); λ (direct)
        self._tr_r0 = [
            r0_layers[u[0]]  # one bit-width: exactly λ·sqrt(b_w) (or λ), not a rounded weighted mean
            if len({r0_layers[i] for i in u}) == 1
            else sum(r0_layers[i] * numel[i] for i in u) / sum(numel[i] for i in u)
            for u in self._tr_units
        ]
        self._tr_u0 = base_lr  # initial TALR = initial LR (Sec. S4.1)
        self._tr_eta = base_lr if cfg.eta is None else cfg.eta
        self._tr_U = [base_lr] * len(self._tr_units)
        self._tr_K = list(self._tr_r0) if cfg.running_init == "target" else [0.0] * len(self._tr_units)
        self._tr_t = 0
        self._tr_factor_fn: Callable[[int], float] | None = (
            (lambda t: 1.0) if cfg.target_schedule == "constant" else None
        )
        self.tr_last: dict[str, Any] = {}
        self.hooks: list[Hook] = [_TargetFromScheduler(self), TRMonitor()]
        self.register_step_pre_hook(lambda opt, args, kwargs: opt._tr_before_step())  # type: ignore[attr-defined]

    # -- construction ------------------------------------------------------------------------------------
    @staticmethod
    def _tr_split_groups(
        params: Iterable[Any], layers: list[tuple[str, nn.Parameter, nn.Module]], cfg: TRConfig, base_lr: float
    ) -> list[dict[str, Any]]:
        params = list(params)
        if params and not isinstance(params[0], dict):
            params = [{"params": params}]
        unit_of = {id(w): i for i, (_, w, _) in enumerate(layers)}
        frozen: set[int] = set()
        if cfg.freeze_weight_scale:
            for _, _, q in layers:
                for p in q.parameters():
                    p.requires_grad_(False)
                    frozen.add(id(p))
        out: list[dict[str, Any]] = []
        for g in params:
            opts = {k: v for k, v in g.items() if k not in ("params", "param_names")}
            names = g.get("param_names") or [""] * len(g["params"])
            ps = [(n, p) for n, p in zip(names, g["params"]) if id(p) not in frozen]
            plain = [(n, p) for n, p in ps if id(p) not in unit_of]
            latent = [(n, p) for n, p in ps if id(p) in unit_of]
            if plain:
                out.append({**opts, "params": [p for _, p in plain], "param_names": [n for n, _ in plain]})
            if not latent:
                continue
            # TALR groups: lr = U^t set before every step; `fixed_lr` keeps the LR scheduler off them
            talr = {**opts, "lr": base_lr, "talr": True, "fixed_lr": True}
            units = [[(n, p)] for n, p in latent] if cfg.scope == "layer" else [latent]
            for u in units:
                unit = unit_of[id(u[0][1])] if cfg.scope == "layer" else 0
                out.append({**talr, "params": [p for _, p in u], "param_names": [n for n, _ in u], "tr_unit": unit})
        if not any(g.get("param_names") for g in params):  # plain parameter lists: no names to carry
            for g in out:
                g.pop("param_names")
        found = {id(p) for g in out if g.get("talr") for p in g["params"]}
        missing = [n for n, w, _ in layers if id(w) not in found]
        if missing:
            raise QreproError(f"quantized weights {missing[:3]} are not in the optimizer's parameter groups")
        return out

    # -- Algorithm 1 -------------------------------------------------------------------------------------
    def set_target_schedule(self, factor: Callable[[int], float]) -> None:
        """Make the target TR follow ``factor(step)`` (the LR scheduler's factor)."""
        self._tr_factor_fn = factor

    def attach_scheduler(self, scheduler: Any) -> None:
        """Called by the trainer: the target TR follows the LR scheduler's family (``scheduler.factor``)."""
        if self.tr_cfg.target_schedule == "scheduler":
            factor = getattr(scheduler, "factor", None)
            if not callable(factor):
                raise QreproError("T-optimizers need a scheduler with factor(step), e.g. scheduler=cosine")
            self.set_target_schedule(factor)

    def _tr_before_step(self) -> None:
        cfg = self.tr_cfg
        if self._tr_factor_fn is None:
            raise QreproError(
                "a T-optimizer needs the LR scheduler's factor(step) for its target TR: train with "
                "qrepro.train (its hooks bind it), call set_target_schedule(), or set "
                "optimizer.tr.target_schedule=constant"
            )
        t = self._tr_t
        f = float(self._tr_factor_fn(t))
        rf = cfg.final_target
        R = [rf + (r0 - rf) * f for r0 in self._tr_r0]
        res = self._tr_counter.update()
        last: dict[str, Any] = {"step": t, "R": R}
        if res is not None:
            numel = self._tr_counter.numel
            vals = torch.cat(res).tolist()  # the one host sync per step
            n = len(numel)
            changed, steps = vals[:n], vals[n:]
            k_layers = [c / m for c, m in zip(changed, numel)]
            s_layers = [s / m for s, m in zip(steps, numel)]
            meas = changed if cfg.measure == "transitions" else steps
            k_units = [sum(meas[i] for i in u) / sum(numel[i] for i in u) for u in self._tr_units]
            m = cfg.momentum
            self._tr_K = [m * K + (1.0 - m) * k for K, k in zip(self._tr_K, k_units)]
            self._tr_U = [self._talr(i, R[i], f) for i in range(len(self._tr_units))]
            last.update(
                k_layers=k_layers, step_layers=s_layers, k=sum(changed) / sum(numel), step_size=sum(steps) / sum(numel)
            )
        elif cfg.rule == "lr":
            self._tr_U = [self._tr_u0 * f] * len(self._tr_units)
        for g in self.param_groups:
            if g.get("talr"):
                g["lr"] = self._tr_U[g["tr_unit"]]
        last.update(K=list(self._tr_K), U=list(self._tr_U))
        self.tr_last = last
        self._tr_t = t + 1

    def _talr(self, i: int, r: float, f: float) -> float:
        u, big_k, rule = self._tr_U[i], self._tr_K[i], self.tr_cfg.rule
        if rule == "additive":
            return talr_additive(u, big_k, r, self._tr_eta)
        if rule == "multiplicative":
            return talr_multiplicative(u, big_k, r, self.tr_cfg.running_eps)
        if rule == "momentum":
            return talr_momentum(u, big_k, r, self.tr_cfg.momentum, self.tr_cfg.running_eps)
        return self._tr_u0 * f  # "lr": the scheduled LR (plain optimizer with TR bookkeeping)

    # -- summaries for monitoring --------------------------------------------------------------------------
    def tr_global(self) -> dict[str, float]:
        """Global running TR, target TR and TALR of the last step (numel-weighted over units)."""
        numel = self._tr_counter.numel
        w = [sum(numel[i] for i in u) for u in self._tr_units]
        avg = {key: sum(a * b for a, b in zip(self.tr_last[key], w)) / sum(w) for key in ("K", "R", "U")}
        return {"tr_running": avg["K"], "tr_target": avg["R"], "talr": avg["U"]}

    @property
    def tr_layer_names(self) -> list[str]:
        return self._tr_counter.names

    # -- checkpoints ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()  # type: ignore[misc]
        sd["tr"] = {
            "t": self._tr_t,
            "K": list(self._tr_K),
            "U": list(self._tr_U),
            "counter": self._tr_counter.state_dict(),
            "config": asdict(self.tr_cfg),
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        tr = state_dict.pop("tr", None)
        super().load_state_dict(state_dict)  # type: ignore[misc]
        if tr is not None:
            if len(tr["K"]) != len(self._tr_K):
                raise QreproError("checkpoint TR state does not match optimizer.tr.scope; resume with the same")
            self._tr_t, self._tr_K, self._tr_U = int(tr["t"]), list(tr["K"]), list(tr["U"])
            self._tr_counter.load_state_dict(tr["counter"])


def tr_variant(base: type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
    """The TR-scheduled variant of a torch optimizer class (e.g. SGD -> SGDT)."""
    doc = f"{base.__name__} with transition-rate scheduling of the quantized latent weights."
    return type(f"{base.__name__}T", (TransitionRateMixin, base), {"__doc__": doc})


class _TargetFromScheduler(Hook):
    """Binds the T-optimizer's target TR to the trainer's LR scheduler (its ``factor(step)``)."""

    def __init__(self, optimizer: TransitionRateMixin) -> None:
        self.optimizer = optimizer

    def on_train_start(self, ctx: Context) -> None:
        if self.optimizer._tr_factor_fn is None and ctx.scheduler is not None:
            self.optimizer.attach_scheduler(ctx.scheduler)


# ----------------------------------------------------------------------------------------------------------
# Registration: the T variants of seven torch optimizers (Table S5)


def _register_t(name: str) -> type[torch.optim.Optimizer]:
    cls = tr_variant(TORCH_OPTIMIZERS[name][0])

    def factory(param_groups: Any, *, model: nn.Module, tr: Any = None, **cfg: Any) -> torch.optim.Optimizer:
        return cls(param_groups, model=model, tr=tr, **torch_kwargs(f"{name}t", cfg, name, also=("tr",)))

    factory.__doc__ = f"optimizer={name}t: {cls.__doc__}"
    OPTIMIZERS.register(f"{name}t")(factory)
    return cls


SGDT = _register_t("sgd")
AdamT = _register_t("adam")
AdamWT = _register_t("adamw")
NAdamT = _register_t("nadam")
AdamaxT = _register_t("adamax")
RMSpropT = _register_t("rmsprop")
AdagradT = _register_t("adagrad")
