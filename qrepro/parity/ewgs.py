"""EWGS parity: qrepro's ``ewgs`` CIFAR-10 ResNet-20 against the authors' own code (cvlab-yonsei/EWGS).

``python -m qrepro.parity ewgs --reference <checkout>``: for W1A1 and W2A2 (``--quick``: W1A1), their
``resnet20_quant`` trained as ``train_quant.py`` does (``update_grad_scales`` before epoch ``UPDATE_EVERY``) against
the ``ewgs_resnet20_cifar10_w1a1`` experiment at ``precision=w{b}a{b}``, stepped by ``Run.step`` and
``Run.end_epoch``. What is compared, what is not and why, and the measured differences: docs/ewgs.md, section
"Parity with the authors' code".
"""

from __future__ import annotations

import contextlib
import functools
import io
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from qrepro.parity import (
    Report,
    add_grouped,
    cell_suite,
    copy_state,
    largest_change,
    our_inputs,
    our_run,
    param_state,
    reference_import,
    same_names,
    their_inputs,
)

CELLS = ("w1a1", "w2a2")
QUICK_CELLS = ("w1a1",)
DEFAULT_BATCH = 8
TOL = 1e-9  # float64, absolute
EPOCHS, STEPS_PER_EPOCH = 4, 5  # the comparison's schedule: cosine over 4 epochs of 5 steps
UPDATE_EVERY = 2  # δ is re-estimated before epoch 2 (theirs) = after epoch 1 (qrepro's hook)
MAX_ITER = 2  # Hutchinson probes per trace by default (theirs: the keyword maxIter of utils.trace)
HESSIAN_SEED = 1234

THEIR_MEAN, THEIR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)  # train_quant.py transforms.Normalize
THEIR_LR_M, THEIR_LR_Q, THEIR_WD = 1e-3, 1e-5, 1e-4  # train_quant.py defaults (Adam / Adam)
HESSIAN_BATCHES = 3  # update_grad_scales: "estimate trace using 3 batches"

RENAME = {".lW": ".wq.lower", ".uW": ".wq.upper", ".lA": ".aq.lower", ".uA": ".aq.upper"}
RENAME |= {".output_scale": ".wq.output_scale", ".bkwd_scaling_factorW": ".wq.delta"}
RENAME |= {".bkwd_scaling_factorA": ".aq.delta"}


def their_name_to_ours(name: str) -> str:
    if name.startswith("bn2."):  # the BatchNorm1d before the classifier
        return "bn_fc." + name[4:]
    if name.startswith("linear."):
        return "fc." + name[7:]
    for a, b in RENAME.items():
        if name.endswith(a):
            return name[: -len(a)] + b
    return name


def _kind(name: str) -> str:
    if ".wq." in name or ".aq." in name:
        return "quantizer params"
    return "bn" if ".bn" in name or name.startswith("bn") else "conv/fc"


_add_grouped = functools.partial(add_grouped, kind=_kind, suite="ewgs")
# train_quant.py's test-time pipeline: ToTensor + Normalize (float32), then float64
_their_inputs = functools.partial(their_inputs, mean=THEIR_MEAN, std=THEIR_STD)


def _deltas(model: nn.Module, rename: bool) -> dict[str, torch.Tensor]:
    named = {(their_name_to_ours(n) if rename else n): b for n, b in model.named_buffers()}
    return {n: b.detach().clone() for n, b in named.items() if n.endswith(".delta")}


def compare_cell(
    reference: Path,
    bits: str,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    *,
    steps: int,
    overrides: list[str],
    max_iter: int = MAX_ITER,
    steps_per_epoch: int = STEPS_PER_EPOCH,
) -> Report:
    """One cell (``bits``: ``w1a1`` / ``w2a2``); ``max_iter``: Hutchinson probes per trace on both sides;
    ``steps_per_epoch``: the comparison's epoch length (δ is re-estimated after ``UPDATE_EVERY`` epochs)."""
    spe = steps_per_epoch
    b = int(bits[1 : bits.index("a")])
    batch = len(batches[0][1])
    extra = f", qrepro overrides {' '.join(overrides)}" if overrides else ""
    title = (
        f"EWGS ResNet-20 CIFAR-10 {bits.upper()}, float64, batch {batch}, {steps} steps (cosine over {EPOCHS} "
        f"epochs of {spe} steps, Hessian δ before epoch {UPDATE_EVERY}){extra}"
    )
    rep = Report(title, TOL)
    with reference_import(Path(reference) / "CIFAR10") as imp:
        cm, ut = imp("custom_models"), imp("utils")
        ut.trace = functools.partial(ut.trace, maxIter=max_iter)
        torch.manual_seed(0)
        args = SimpleNamespace(
            QWeightFlag=True,
            QActFlag=True,
            weight_levels=2**b,
            act_levels=2**b,
            baseline=False,
            bkwd_scaling_factorW=0.0,
            bkwd_scaling_factorA=0.0,
            use_hessian=True,
            num_classes=10,
        )
        theirs = cm.resnet20_quant(args).double()

        run = our_run(
            [
                "+experiment=ewgs_resnet20_cifar10_w1a1",
                f"precision={bits}",
                "trainer.device=cpu",
                f"trainer.epochs={EPOCHS}",
                f"quantizer.update_every={UPDATE_EVERY}",
                f"quantizer.hessian_max_iter={max_iter}",
                "quantizer.seed=null",
                "init_from=null",
                *overrides,
            ],
            spe,
        )
        ours = run.model
        copy_state("ewgs", ours, theirs, their_name_to_ours, lambda k: ".wq." in k or ".aq." in k)

        # their optimizers: train_quant.py's parameter split
        model_params, quant_params = [], []
        for m in theirs.modules():
            if isinstance(m, cm.QConv):
                model_params.append(m.weight)
                quant_params += [m.lW, m.uW, m.lA, m.uA, m.output_scale]
            elif isinstance(m, (nn.Conv2d, nn.Linear)):
                model_params += [m.weight] + ([m.bias] if m.bias is not None else [])
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                model_params += [m.weight, m.bias]
        opt_m = torch.optim.Adam(model_params, lr=THEIR_LR_M, weight_decay=THEIR_WD, foreach=False)
        opt_q = torch.optim.Adam(quant_params, lr=THEIR_LR_Q, foreach=False)
        sch_m = torch.optim.lr_scheduler.CosineAnnealingLR(opt_m, T_max=EPOCHS, eta_min=0)
        sch_q = torch.optim.lr_scheduler.CosineAnnealingLR(opt_q, T_max=EPOCHS, eta_min=0)

        t_params = {their_name_to_ours(n): p for n, p in theirs.named_parameters()}
        o_params = {n: p for n, p in ours.named_parameters() if p.requires_grad}
        same_names("parity ewgs: trainable parameters differ", t_params, o_params)

        logits: list[torch.Tensor] = []
        handle = ours.register_forward_hook(lambda m, a, out: logits.append(out.detach()))
        losses_t, losses_o = [], []
        t0 = time.perf_counter()
        for i in range(steps):
            x8, y = batches[i % len(batches)]
            xt, xo = _their_inputs(x8), our_inputs(run, x8)
            epoch = i // spe
            if i == 0:
                rep.add("normalised input batch", xo, xt)
                with contextlib.redirect_stdout(io.StringIO()):
                    ut.init_quant_model(theirs, [(xt, y)], "cpu")
                run.start(xo, y)
                t_q = {their_name_to_ours(n): p.detach().clone() for n, p in theirs.named_parameters()}
                t_q = {k: v for k, v in t_q.items() if ".wq." in k or ".aq." in k}
                o_q = {k: o_params[k].detach().clone() for k in t_q}
                _add_grouped(rep, "1st batch: initialised", o_q, t_q)
                start = {k: v.detach().clone() for k, v in o_params.items()}
            elif i % spe == 0 and epoch % UPDATE_EVERY == 0:
                # the Hessian update: theirs before epoch `epoch`, ours at the end of epoch `epoch - 1`
                h_batches = [batches[(i + k) % len(batches)] for k in range(HESSIAN_BATCHES + 1)]
                t_loader = [(_their_inputs(xb), yb) for xb, yb in h_batches]
                torch.manual_seed(HESSIAN_SEED)
                with contextlib.redirect_stdout(io.StringIO()):
                    ut.update_grad_scales(theirs, t_loader, nn.CrossEntropyLoss(), "cpu", args)
                run.data = SimpleNamespace(train=[(our_inputs(run, xb), yb) for xb, yb in h_batches])
                run.ctx.data = run.data
                torch.manual_seed(HESSIAN_SEED)
                run.ctx.epoch = epoch - 1
                run.end_epoch()
                d_o, d_t = _deltas(ours, False), _deltas(theirs, True)
                _add_grouped(rep, f"δ after the Hessian update before epoch {epoch}", d_o, d_t)
                delta_range = (min(float(v) for v in d_t.values()), max(float(v) for v in d_t.values()))

            theirs.train()
            opt_m.zero_grad()
            opt_q.zero_grad()
            out_t = theirs(xt)
            loss_t = nn.CrossEntropyLoss()(out_t, y)
            loss_t.backward()
            t_grads = {k: p.grad.detach().clone() for k, p in t_params.items()}
            opt_m.step()
            opt_q.step()
            if (i + 1) % spe == 0:
                sch_m.step()
                sch_q.step()
            losses_t.append(loss_t.detach())

            losses_o.append(run.step(xo, y))
            o_grads = {k: p.grad.detach().clone() for k, p in o_params.items()}
            if i == 0:
                rep.add("1st step: train-mode forward output (logits)", logits[-1], out_t)
                rep.add("1st step: loss", losses_o[0], losses_t[0])
                _add_grouped(rep, "1st step: grad", o_grads, t_grads)
        handle.remove()
        wall = time.perf_counter() - t0

        rep.add(f"loss of each of the {steps} steps", torch.stack(losses_o), torch.stack(losses_t))
        _add_grouped(rep, f"step {steps}: grad", o_grads, t_grads)
        _add_grouped(rep, f"after {steps} steps: param", o_params, t_params)
        st_o, st_t = run.optimizer.state, {**opt_m.state, **opt_q.state}
        for key in ("exp_avg", "exp_avg_sq"):
            o_v, t_v = param_state(st_o, o_params, key), param_state(st_t, t_params, key)
            _add_grouped(rep, f"after {steps} steps: Adam {key}", o_v, t_v)
    moved = largest_change(o_params, start)
    note = f"largest parameter change over the steps {moved:.3e}; both sides stepped in {wall:.1f} s"
    if steps > UPDATE_EVERY * spe:
        note += f"; their δ after the update in [{delta_range[0]:.3e}, {delta_range[1]:.3e}]"
    rep.notes.append(note)
    return rep


suite = cell_suite(
    "ewgs",
    compare_cell,
    need=("custom_models.py", "custom_modules.py", "utils.py"),
    need_in="CIFAR10",
    repo="cvlab-yonsei/EWGS",
    grid=CELLS,
    quick_grid=QUICK_CELLS,
    default_batch=DEFAULT_BATCH,
    extra_batches=HESSIAN_BATCHES + 1,  # the Hessian update's batches
)
