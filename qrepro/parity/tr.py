"""TR-scheduling parity: qrepro's SGDT/AdamT CIFAR-10 ResNet-20 against the authors' own code (hw-ch0/TRS).

``python -m qrepro.parity tr --reference <checkout>``: for W2A2 and W1A1, each with SGDT and AdamT (``--quick``: W2A2
SGDT and W1A1 AdamT), their ``resnet20_quant`` with ``quant_SGD`` / ``quant_Adam`` and the parameter groups
``train_quant.py`` builds for ``--baseline False`` (the values of ``run.sh``, the constants below) against the
``tr_resnet20_cifar10_w{b}a{b}_{sgdt|adamt}`` experiment, over a cosine schedule of ``EPOCHS`` epochs of
``STEPS_PER_EPOCH`` steps. What is compared, the two changes on their side (``flag=False`` for
``custom_optims.sgd``, the transition mask in float64) and the measured differences: docs/tr.md, section "Parity
with the authors' code".
"""

from __future__ import annotations

import contextlib
import functools
import io
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from qrepro.errors import QreproError
from qrepro.parity import (
    Report,
    add_grouped,
    cell_suite,
    copy_state,
    group_values,
    largest_change,
    our_inputs,
    our_run,
    param_state,
    reference_import,
    running_stats,
    same_names,
    their_inputs,
)

CELLS = (("w2a2", "sgdt"), ("w2a2", "adamt"), ("w1a1", "sgdt"), ("w1a1", "adamt"))
QUICK_CELLS = (("w2a2", "sgdt"), ("w1a1", "adamt"))
DEFAULT_BATCH = 16
TOL = 1e-9  # float64, absolute
OPT_TITLE = {"sgdt": "SGDT", "adamt": "AdamT"}
EPOCHS, STEPS_PER_EPOCH = 8, 5  # the schedule of the comparison: cosine over 8 epochs of 5 steps

# The oracle's recipe: run.sh (CIFAR, --baseline False) and train_quant.py's defaults
THEIR_MEAN, THEIR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)  # train_quant.py transforms.Normalize
THEIR_LR = {"sgdt": 0.1, "adamt": 1e-3}  # run.sh --lr
THEIR_WD = 1e-4  # run.sh --weight_decay
THEIR_MOMENTUM = 0.9  # train_quant.py --momentum default (SGD)
THEIR_SCALE_LR = 0.01  # train_quant.py --scale_lr default
THEIR_INITIAL_TR = 5e-3  # run.sh --initial_tr
THEIR_MOMENTUM_TR = 0.99  # run.sh --momentum_tr


def their_name_to_ours(name: str) -> str:
    """Name of a parameter / buffer of their ResNet-20 -> the same tensor's name in qrepro's model."""
    if name.startswith("bn2."):  # the BatchNorm1d before the classifier (not a block's bn2)
        return "bn_fc." + name[4:]
    if name.startswith("linear."):
        return "fc." + name[7:]
    if name.endswith(".sA"):
        return name[:-2] + "aq.scale"
    if name.endswith(".sW"):
        return name[:-2] + "wq.scale"
    return name


# ------------------------------------------------------------------------------------------------- oracle
def _their_optimizer(co: Any, ut: Any, model: nn.Module, opt_name: str) -> torch.optim.Optimizer:
    """train_quant.py, ``--baseline False``: the four groups of ``utils.get_trainable_params``."""
    with contextlib.redirect_stdout(io.StringIO()):  # get_trainable_params prints parameter counts
        quant_weights, fp_weights, scale_params, other_params = ut.get_trainable_params(model)
    lr = THEIR_LR[opt_name]
    no_momentum = {"momentum": 0} if opt_name == "sgdt" else {}
    groups = [
        {"params": quant_weights, "lr": THEIR_INITIAL_TR, "momentum_tr": THEIR_MOMENTUM_TR, "alpha": lr},
        {"params": fp_weights},
        {"params": scale_params, "lr": THEIR_SCALE_LR, **no_momentum, "weight_decay": 0},
        {"params": other_params, **no_momentum, "weight_decay": 0},
    ]
    if opt_name == "sgdt":
        return co.quant_SGD(groups, lr=lr, momentum=THEIR_MOMENTUM, weight_decay=THEIR_WD, baseline=False)
    return co.quant_Adam(groups, lr=lr, weight_decay=THEIR_WD, baseline=False)


def _f64(v: Any) -> torch.Tensor:
    """A float64 tensor (torch.tensor of Python floats would make float32)."""
    return v.detach().to(torch.float64) if isinstance(v, torch.Tensor) else torch.tensor(v, dtype=torch.float64)


def _transition_to_float64(module: nn.Module, args: Any, out: Any) -> None:
    t = getattr(module.weight, "transition", None)
    if t is not None:
        module.weight.transition = t.double()


# -------------------------------------------------------------------------------------------- comparison
def _kind(name: str) -> str:
    if name.endswith(("aq.scale", "wq.scale")):
        return "act scales" if name.endswith("aq.scale") else "weight scales"
    return "bn" if ".bn" in name or name.startswith("bn") else "conv/fc"


_add_grouped = functools.partial(add_grouped, kind=_kind, suite="tr")


def compare_cell(
    reference: Path,
    cell: tuple[str, str],
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    *,
    steps: int,
    overrides: list[str],
) -> Report:
    """One (bit-width, optimizer) cell: ``steps`` training steps on both sides from the same weights."""
    bits, opt_name = cell
    b = int(bits[1 : bits.index("a")])
    batch = len(batches[0][1])
    extra = f", qrepro overrides {' '.join(overrides)}" if overrides else ""
    title = (
        f"TR ResNet-20 CIFAR-10 {bits.upper()} {OPT_TITLE[opt_name]}, float64, batch {batch}, {steps} steps "
        f"(cosine over {EPOCHS} epochs of {STEPS_PER_EPOCH} steps){extra}"
    )
    rep = Report(title, TOL)
    with reference_import(Path(reference)) as imp:
        cm, co, ut = imp("custom_models"), imp("custom_optims"), imp("utils")
        co.sgd = functools.partial(co.sgd, flag=False)  # the unused keyword quant_SGD.step never passes
        torch.manual_seed(0)
        args = SimpleNamespace(bit_weight=b, bit_act=b, symmetric_fxp=False, baseline=False, num_classes=10)
        theirs = cm.resnet20_quant(args).double()
        t_opt = _their_optimizer(co, ut, theirs, opt_name)
        t_sched = torch.optim.lr_scheduler.CosineAnnealingLR(t_opt, T_max=EPOCHS, eta_min=0)
        t_qconv = {n: m for n, m in theirs.named_modules() if isinstance(m, cm.QConv)}
        for m in t_qconv.values():  # the 0/1 transition mask in float64 (their .float() makes k^t a float32 ratio)
            m.register_forward_hook(_transition_to_float64)

        experiment = f"+experiment=tr_resnet20_cifar10_{bits}_{opt_name}"
        run = our_run([experiment, "trainer.device=cpu", f"trainer.epochs={EPOCHS}", *overrides], STEPS_PER_EPOCH)
        ours = run.model
        skip = ("wq.scale", "aq.scale", "initialized")
        copy_state("tr", ours, theirs, their_name_to_ours, lambda k: k.endswith(skip))
        t_params = {their_name_to_ours(n): p for n, p in theirs.named_parameters()}
        o_params = {n: p for n, p in ours.named_parameters() if p.requires_grad}
        same_names("parity tr: trainable parameters differ", t_params, o_params)
        layers = run.optimizer.tr_layer_names
        if layers != list(t_qconv):
            raise QreproError(f"parity tr: quantized layers differ: {layers[:3]} vs {list(t_qconv)[:3]}")
        for key in ("weight_decay", "momentum") if opt_name == "sgdt" else ("weight_decay",):
            rep.add_many(
                f"param groups: {key} of every parameter",
                group_values(run.optimizer, o_params, key),
                group_values(t_opt, t_params, key),
            )

        logits: list[torch.Tensor] = []
        handle = ours.register_forward_hook(lambda m, a, out: logits.append(out.detach()))
        losses_t, losses_o, k_t, k_o, r_t, r_o, lr_t, lr_o = [], [], [], [], [], [], [], []
        talr_ids = {id(t_params[n + ".weight"]) for n in layers}
        t_name = {id(p): n for n, p in t_params.items()}
        plain_order = [t_name[id(p)] for g in t_opt.param_groups for p in g["params"] if id(p) not in talr_ids]
        t0 = time.perf_counter()
        for i in range(steps):
            x8, y = batches[i % len(batches)]
            xt, xo = their_inputs(x8, THEIR_MEAN, THEIR_STD), our_inputs(run, x8)
            if i == 0:
                rep.add("normalised input batch", xo, xt)
                run.start(xo, y)  # what Run.step does first on its first batch: the scale calibration hook
                start = {k: v.detach().clone() for k, v in o_params.items()}  # after the scale initialisation
            # the LR every non-TALR parameter is stepped with, and the target TR (their quant group's lr)
            lr_t.append(_f64([g["lr"] for g in t_opt.param_groups for p in g["params"] if id(p) not in talr_ids]))
            r_t.append(t_opt.param_groups[0]["lr"])
            owner = {id(p): g for g in run.optimizer.param_groups for p in g["params"]}
            lr_o.append(_f64([owner[id(o_params[n])]["lr"] for n in plain_order]))

            # the oracle: train_quant.py's step (their QConv initialises its scales in the first forward)
            theirs.train()
            t_opt.zero_grad()
            out_t = theirs(xt)
            loss_t = nn.CrossEntropyLoss()(out_t, y)
            loss_t.backward()
            if i == 0:
                t_scales = {f"{n}.aq.scale": m.sA.detach().clone() for n, m in t_qconv.items()}
                t_scales |= {f"{n}.wq.scale": m.sW.detach().clone() for n, m in t_qconv.items()}
                o_scales = {n: v.detach().clone() for n, v in ours.state_dict().items() if n.endswith(skip[:2])}
                _add_grouped(rep, "1st batch: initialised", o_scales, t_scales)
            t_grads = {k: p.grad.detach().clone() for k, p in t_params.items()}
            t_opt.step()
            if (i + 1) % STEPS_PER_EPOCH == 0:
                t_sched.step()
            losses_t.append(loss_t.detach())
            if i > 0:
                k_t.append(_f64([float(m.weight.transition.sum()) / m.weight.numel() for m in t_qconv.values()]))

            # qrepro: the trainer's step
            losses_o.append(run.step(xo, y))
            o_grads = {k: p.grad.detach().clone() for k, p in o_params.items()}
            last = run.optimizer.tr_last
            r_o.append(last["R"][0])
            if i > 0:
                k_o.append(_f64(last["k_layers"]))
            if i == 0:
                rep.add("1st step: train-mode forward output (logits)", logits[-1], out_t)
                rep.add("1st step: loss", losses_o[0], losses_t[0])
                _add_grouped(rep, "1st step: grad", o_grads, t_grads)
                _add_grouped(rep, "1st step: BN stats", running_stats(ours), running_stats(theirs, their_name_to_ours))
        handle.remove()
        wall = time.perf_counter() - t0

        rep.add(f"loss of each of the {steps} steps", torch.stack(losses_o), torch.stack(losses_t))
        rep.add("target TR of each step", _f64(r_o), _f64(r_t))
        rep.add("LR of every non-TALR parameter, each step", torch.stack(lr_o), torch.stack(lr_t))
        if k_t:
            rep.add(f"transition rate k^t per layer, steps 2..{steps}", torch.stack(k_o), torch.stack(k_t))
        rep.add(f"step {steps}: train-mode forward output (logits)", logits[-1], out_t)
        _add_grouped(rep, f"step {steps}: grad", o_grads, t_grads)
        after = f"after {steps} steps:"
        _add_grouped(rep, f"{after} param", o_params, t_params)
        frozen_o = {n + ".wq.scale": ours.get_submodule(n).wq.scale for n in layers}
        frozen_t = {n + ".wq.scale": m.sW for n, m in t_qconv.items()}
        _add_grouped(rep, f"{after} frozen", frozen_o, frozen_t)
        _add_grouped(rep, f"{after} BN stats", running_stats(ours), running_stats(theirs, their_name_to_ours))
        st_t, st_o = t_opt.state, run.optimizer.state
        if opt_name == "sgdt":
            have = [n for n, p in t_params.items() if st_t[p].get("momentum_buffer") is not None]
            if sorted(have) != sorted(n for n, p in o_params.items() if "momentum_buffer" in st_o.get(p, {})):
                raise QreproError("parity tr: momentum buffers exist for different parameters")
            bufs_o = {n: st_o[o_params[n]]["momentum_buffer"] for n in have}
            _add_grouped(
                rep, f"{after} momentum buffer", bufs_o, {n: st_t[t_params[n]]["momentum_buffer"] for n in have}
            )
        else:
            for key in ("exp_avg", "exp_avg_sq", "step"):
                o_v, t_v = param_state(st_o, o_params, key), param_state(st_t, t_params, key)
                _add_grouped(rep, f"{after} Adam {key}", o_v, t_v)
        last = run.optimizer.tr_last
        lr = THEIR_LR[opt_name]
        ema = {n: st_t[t_params[n + ".weight"]]["EMA_transition"] for n in layers}
        talr = {n: lr * st_t[t_params[n + ".weight"]]["lr_scale"] for n in layers}
        rep.add_many(f"{after} running TR (K vs EMA_transition)", dict(zip(layers, _f64(last["K"]))), ema)
        rep.add_many(f"{after} TALR (U vs alpha*lr_scale)", dict(zip(layers, _f64(last["U"]))), talr)
    moved = largest_change(o_params, start)
    k_all = torch.stack(k_t) if k_t else torch.zeros(1)
    u_all = _f64(last["U"])
    rep.notes.append(
        f"largest parameter change over the steps {moved:.3e}; transition rates k^t in [{float(k_all.min()):.2e}, "
        f"{float(k_all.max()):.2e}] (mean {float(k_all.mean()):.2e}); TALR U after the last step in "
        f"[{float(u_all.min()):.3e}, {float(u_all.max()):.3e}] (U^0 = {lr:g}); target TR {r_o[0]:.3e} -> "
        f"{r_o[-1]:.3e}; both sides stepped in {wall:.1f} s"
    )
    return rep


suite = cell_suite(
    "tr",
    compare_cell,
    need=("custom_models.py", "custom_modules.py", "custom_optims.py", "utils.py"),
    repo="hw-ch0/TRS (cvlab-yonsei/TRS)",
    grid=CELLS,
    quick_grid=QUICK_CELLS,
    default_batch=DEFAULT_BATCH,
)
