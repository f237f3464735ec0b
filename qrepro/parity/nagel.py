"""Nagel et al. parity: qrepro's ``nagel_damp`` / ``nagel_freeze`` against the authors' quantizer code
(qualcomm-ai-research/oscillations-qat).

``python -m qrepro.parity nagel --reference <checkout>``: qrepro's ``nagel_{damp,freeze}_mobilenet_v2_imagenet_w3a3``
recipe on a CIFAR-10 ResNet-20 against a deep copy of the same network whose quantizers are the authors' objects
(their quantizer, range estimator, oscillation tracker, dampening loss and schedules). What is compared, the
float32 tolerances and the two import shims
(their ``enum.Flag`` options rebuilt on ``enum.Enum``, timm's old activation module names): docs/nagel.md, section
"Parity with the authors' code".
"""

from __future__ import annotations

import copy
import enum
import importlib
import time
import types
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from qrepro.errors import QreproError
from qrepro.parity import Report, cell_suite, our_inputs, our_run, reference_import, same_names
from qrepro.quant.layers import quantized_layers
from qrepro.quant.methods.nagel import NagelQuantizer, NagelSchedule, tracked

CELLS = ("damp", "freeze")
DEFAULT_BATCH = 8
TOL = 1e-9
INIT_TOL = 1e-6  # their ranges pass through float32 (torch.tensor(x).float() in _tensorize_min_max)
EPOCHS, STEPS_PER_EPOCH = 4, 5
# the comparison's schedule settings, the same on both sides: a high frequency momentum and thresholds that a few
# oscillations reach within 20 steps, so that freezing happens in the compared window
PARITY_OVERRIDES = {
    "freeze": [
        "quantizer.freeze_momentum=0.3",
        "quantizer.freeze_threshold=0.2",
        "quantizer.freeze_threshold_final=0.1",
    ],
    "damp": [],
}
LR_W, LR_Q, MOMENTUM = 1e-2, 1e-5, 0.9


class _TheirQuantizer(nn.Module):
    """The authors' quantizer with their range estimator, initialised on its first input."""

    def __init__(self, uq: Any, re_: Any, bits: int) -> None:
        super().__init__()
        self.q = uq.SymmetricUniformQuantizer(n_bits=bits)
        self.est = re_.MSE_Estimator(quantizer=self.q, opt_method=re_.OptMethod.grid)
        self.ready = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.ready:
            xmin, xmax = self.est(x.detach())
            self.q.set_quant_range(xmin, xmax)
            self.q.make_range_trainable()
            self.ready = True
        return self.q(x)


def _timm_stubs() -> dict[str, types.ModuleType]:
    """Their hijacker imports activation classes from ``timm.models.layers.activations(_me)``, which newer timm
    releases keep at ``timm.layers.activations(_me)``: the same modules under the old names."""
    try:
        return {
            "timm.models.layers.activations": importlib.import_module("timm.layers.activations"),
            "timm.models.layers.activations_me": importlib.import_module("timm.layers.activations_me"),
        }
    except ImportError as e:
        raise QreproError(f"parity nagel needs timm (the authors' code imports it): {e}") from None


def _enum_shim(uu: Any) -> None:
    """Their option enums derive from ``enum.Flag`` with namedtuple values, which Python >= 3.11 rejects (Flag
    members must be integers); the same two base classes on ``enum.Enum`` (names, ``.cls``, calling) let their
    modules import. Nothing of the quantization maths goes through them."""

    class BaseEnumOptions(enum.Enum):
        def __str__(self) -> str:
            return self.name

        @classmethod
        def list_names(cls) -> list[str]:
            return [m.name for m in cls]

    class ClassEnumOptions(BaseEnumOptions):
        @property
        def cls(self) -> Any:
            return self.value.cls

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            return self.value.cls(*args, **kwargs)

    for mod in (uu, uu.utils):
        mod.BaseEnumOptions, mod.ClassEnumOptions = BaseEnumOptions, ClassEnumOptions


def _our_run(kind: str, overrides: list[str]) -> Any:
    return our_run(
        [
            f"+experiment=nagel_{kind}_mobilenet_v2_imagenet_w3a3",
            "dataset=cifar10",
            "model=resnet20",
            "model.shortcut=A",
            "trainer.device=cpu",
            f"trainer.epochs={EPOCHS}",
            f"optimizer.lr={LR_W}",
            "init_from=null",
            *PARITY_OVERRIDES[kind],
            *overrides,
        ],
        STEPS_PER_EPOCH,
    )


def compare_cell(
    reference: Path, kind: str, batches: list[tuple[torch.Tensor, torch.Tensor]], *, steps: int, overrides: list[str]
) -> Report:
    batch = len(batches[0][1])
    extra = f", qrepro overrides {' '.join(overrides)}" if overrides else ""
    rep = Report(
        f"Nagel et al. ({kind}) ResNet-20 CIFAR-10 W3A3 (8-bit first/last), float64, batch {batch}, {steps} steps "
        f"(cosine over {EPOCHS} epochs of {STEPS_PER_EPOCH} steps){extra}",
        TOL,
    )
    with reference_import(Path(reference), stubs=_timm_stubs()) as imp:
        uu = imp("utils")
        _enum_shim(uu)
        uq = imp("quantization.quantizers.uniform_quantizers")
        re_ = imp("quantization.range_estimators")
        ot = imp("utils.oscillation_tracking_utils")
        qu = imp("utils.qat_utils")

        run = _our_run(kind, overrides)
        ours = run.model
        theirs = copy.deepcopy(ours)  # the same (random) weights, before any initialisation
        layers_o = dict(quantized_layers(ours))
        layers_t = dict(quantized_layers(theirs))
        wq_t: dict[str, _TheirQuantizer] = {}
        aq_t: dict[str, _TheirQuantizer] = {}
        for name, layer in layers_t.items():
            if isinstance(layer.wq, NagelQuantizer):
                wq_t[name] = layer.wq = _TheirQuantizer(uq, re_, layer.wq.bits)
            if isinstance(layer.aq, NagelQuantizer):
                aq_t[name] = layer.aq = _TheirQuantizer(uq, re_, layer.aq.bits)
        sched = next(h for h in run.hooks if isinstance(h, NagelSchedule))
        # their side follows the experiment as configured, never the overrides under test (negative controls)
        cfg = (_our_run(kind, []) if overrides else run).cfg.quantizer
        total = EPOCHS * STEPS_PER_EPOCH

        x0, y0 = batches[0]
        xo0 = our_inputs(run, x0)
        theirs.train()
        with torch.no_grad():  # their range estimation pass (qrepro: the NagelInit hook in run.start)
            theirs(xo0)
        run.start(xo0, y0)
        theirs.double()
        their_q = {f"{n}.wq.scale": q.q for n, q in wq_t.items()} | {f"{n}.aq.scale": q.q for n, q in aq_t.items()}
        our_q = {k: ours.get_submodule(k.removesuffix(".scale")) for k in their_q}
        init_t = {k: q.scale for k, q in their_q.items()}
        init_o = {k: q.scale for k, q in our_q.items()}
        rep.add_many("initial scales (MSE grid; theirs rounded to float32)", init_o, init_t, tol=INIT_TOL)
        signed_o = {k: float(q.n < 0) for k, q in our_q.items()}
        signed_t = {k: float(q.signed) for k, q in their_q.items()}
        rep.add_many("grid signed (weights) / unsigned (post-ReLU inputs)", signed_o, signed_t)
        with torch.no_grad():  # start from the same scales
            for k, v in init_t.items():
                our_q[k].scale.copy_(v.reshape(()))
            for layer, wq in tracked(ours):  # tracking starts from the integers of these scales
                wq.reset_tracking(wq.integers(layer.weight.detach()))

        def decay(start: float, final: float, anneal_start: float) -> Any:
            return uu.CosineTempDecay(t_max=total, temp_range=(start, final), rel_decay_start=anneal_start)

        trackers = {}
        if kind == "freeze":
            for n, q in wq_t.items():
                if q.q.n_bits <= cfg.freeze_max_bits:
                    trackers[n] = q.q.to_integer_forward = ot.TrackOscillation(
                        int_fwd=q.q.to_integer_forward,
                        momentum=cfg.freeze_momentum,
                        freeze_threshold=cfg.freeze_threshold,
                        use_ema_x_int=cfg.freeze_use_ema,
                    )
            thresholds = decay(cfg.freeze_threshold, cfg.freeze_threshold_final, cfg.freeze_anneal_start)
            update = qu.UpdateFreezingThreshold(trackers, thresholds)
        else:
            damp_w = SimpleNamespace(weighting=cfg.damp_weight)
            weights = decay(cfg.damp_weight, cfg.damp_weight_final, cfg.damp_anneal_start)
            update = qu.UpdateDampeningLossWeighting(damp_w, weights)

        quant_params = [q.q._delta for q in (*wq_t.values(), *aq_t.values())]
        qids = {id(p) for p in quant_params}
        model_params = [p for p in theirs.parameters() if id(p) not in qids]
        wd = float(run.cfg.optimizer.weight_decay)
        opt_m = torch.optim.SGD(model_params, lr=LR_W, momentum=MOMENTUM, weight_decay=wd)
        opt_q = torch.optim.Adam(quant_params, lr=LR_Q, foreach=False)
        sch = torch.optim.lr_scheduler.CosineAnnealingLR(opt_m, T_max=EPOCHS, eta_min=0)

        losses_t, losses_o, sched_t, sched_o = [], [], [], []
        t0 = time.perf_counter()
        for i in range(steps):
            x8, y = batches[i % len(batches)]
            xo = our_inputs(run, x8)
            update(SimpleNamespace(state=SimpleNamespace(iteration=i + 1)))  # their engine's iteration count
            if kind == "freeze":
                sched_t.append(next(iter(trackers.values())).freeze_threshold)
                sched_o.append(sched.threshold)
            else:
                sched_t.append(damp_w.weighting)
                sched_o.append(float(run.method.regularizer.weight))
            opt_m.zero_grad()
            opt_q.zero_grad()
            loss = nn.CrossEntropyLoss()(theirs(xo), y)
            if kind == "damp":
                damp = sum(qu.dampening_loss(layers_t[n].weight, q.q, cfg.damp_aggregation) for n, q in wq_t.items())
                loss = loss + damp * damp_w.weighting
            loss.backward()
            opt_m.step()
            opt_q.step()
            if (i + 1) % STEPS_PER_EPOCH == 0:
                sch.step()
            losses_t.append(loss.detach())
            losses_o.append(run.step(xo, y))
        wall = time.perf_counter() - t0
        rep.add("1st step: loss", losses_o[0], losses_t[0])
        rep.add(f"loss (+ λ·dampening) of each of the {steps} steps", torch.stack(losses_o), torch.stack(losses_t))
        what = "freezing threshold" if kind == "freeze" else "dampening weight λ"
        rep.add(f"{what} of each step", torch.tensor(sched_o, dtype=torch.float64), torch.tensor(sched_t))

        p_t = {n.replace(".q._delta", ".scale"): p for n, p in theirs.named_parameters()}
        p_o = {n: p for n, p in ours.named_parameters() if p.requires_grad}
        same_names("parity nagel: parameters differ", p_t, p_o)
        net = [k for k in p_o if not k.endswith(".scale")]
        sc = [k for k in p_o if k.endswith(".scale")]
        after, st_o = f"after {steps} steps:", run.optimizer.state
        rep.add_many(f"{after} network param", {k: p_o[k] for k in net}, {k: p_t[k] for k in net})
        rep.add_many(f"{after} scale", {k: p_o[k] for k in sc}, {k: p_t[k] for k in sc})
        mom_o = {k: st_o[p_o[k]]["momentum_buffer"] for k in net}
        rep.add_many(f"{after} SGD momentum", mom_o, {k: opt_m.state[p_t[k]]["momentum_buffer"] for k in net})
        for key in ("exp_avg", "exp_avg_sq"):
            a_o = {k: st_o[p_o[k]][key] for k in sc}
            rep.add_many(f"{after} Adam {key} (scales)", a_o, {k: opt_q.state[p_t[k]][key] for k in sc})
        if kind == "freeze":
            with torch.no_grad():  # their tracker runs in the forward: once more on the final weights
                for n in trackers:
                    wq_t[n](layers_t[n].weight)
            tr_o = {n: layers_o[n].wq for n in trackers}
            # their EMA adds momentum * (bool mask), a float32 product (0.3 -> 0.30000001): a float32 tolerance
            for ours_key, their_key, label, tol in (
                ("freq", "ema_oscillation", "oscillation frequency EMA (theirs: float32 increments)", INIT_TOL),
                ("prev_int", "prev_x_int", "last integer weights", TOL),
            ):
                rep.add_many(
                    label,
                    {n: getattr(q, ours_key) for n, q in tr_o.items()},
                    {n: getattr(trackers[n], their_key) for n in trackers},
                    tol=tol,
                )

            def theirs_or_zeros(t: Any, attr: str, like: torch.Tensor) -> torch.Tensor:
                v = getattr(t, attr)  # None until their threshold first exceeds 0
                return torch.zeros_like(like, dtype=torch.float64) if v is None else v.double()

            frozen_t = {n: theirs_or_zeros(t, "frozen", tr_o[n].frozen) for n, t in trackers.items()}
            rep.add_many("frozen mask", {n: q.frozen_next.double() for n, q in tr_o.items()}, frozen_t)
            rep.add_many(
                "frozen integers (where frozen)",
                {n: q.frozen_int_next * q.frozen_next for n, q in tr_o.items()},
                {n: theirs_or_zeros(t, "frozen_x_int", tr_o[n].frozen) * frozen_t[n] for n, t in trackers.items()},
            )
            if all(t.ema_x_int is not None for t in trackers.values()):
                rep.add_many(
                    "integer EMA",
                    {n: q.ema_int for n, q in tr_o.items()},
                    {n: t.ema_x_int for n, t in trackers.items()},
                )
            n_frozen = sum(int(q.frozen_next.sum()) for q in tr_o.values())
            n_osc = sum(float(t.total_oscillation.sum()) for t in trackers.values())
            rep.notes.append(f"{int(n_osc)} oscillations counted, {n_frozen} weights frozen")
    moved = max(float((p_o[k].detach() - p_t[k].detach()).abs().max()) for k in p_o)
    rep.notes.append(f"largest parameter difference {moved:.3e}; both sides stepped in {wall:.1f} s")
    return rep


suite = cell_suite(
    "nagel",
    compare_cell,
    need=(
        "quantization/quantizers/uniform_quantizers.py",
        "utils/oscillation_tracking_utils.py",
        "utils/qat_utils.py",
    ),
    repo="oscillations-qat",
    grid=CELLS,
    quick_grid=CELLS,  # the suite is small
    default_batch=DEFAULT_BATCH,
)
