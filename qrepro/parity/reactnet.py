"""ReActNet-18 parity: qrepro's ``reactnet18`` + ``quantizer=reactnet`` against the authors' own code
(liuzechun/ReActNet, ``resnet/``).

``python -m qrepro.parity reactnet --reference <checkout>``: step 2 (binary weights and activations; ``--quick``) and
step 1 (binary activations, real weights): their ``birealnet18`` trained as their ``train.py`` trains it
(``DistributionLoss`` against a teacher, their Adam groups, their first-epoch lr) against the
``reactnet18_cifar10_{w1a1_adam|fp}`` experiment. The teacher, the initialisation, what is compared and the measured
differences: docs/reactnet.md, section "Parity with the authors' code". Their code is run as published.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn
from torchvision.models import resnet18 as tv_resnet18

from qrepro.errors import QreproError
from qrepro.parity import Report, cell_suite, normalize, our_run, param_state, reference_import, running_stats

STEPS = {"step2": ("resnet/2_step2", "w1a1_adam"), "step1": ("resnet/1_step1", "fp")}
CELLS = ("step2", "step1")
QUICK_CELLS = ("step2",)
DEFAULT_BATCH = 8
TOL = 1e-9
THEIR_LR, THEIR_EPOCHS = 2.5e-3, 128  # run.sh (128-epoch setting)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # their train.py Normalize


def _their_optimizer(model: nn.Module, weight_decay: float) -> torch.optim.Optimizer:
    """train.py: Adam over [others, weights (4-d or 'conv' in the name) with --weight_decay]."""
    weight = [p for n, p in model.named_parameters() if p.ndimension() == 4 or "conv" in n]
    ids = {id(p) for p in weight}
    other = [p for p in model.parameters() if id(p) not in ids]
    return torch.optim.Adam([{"params": other}, {"params": weight, "weight_decay": weight_decay}], lr=THEIR_LR)


def _init_like_a_trained_step(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "binary_conv" in n:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.05)
            elif ".move" in n:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.1)


def compare_step(
    reference: Path,
    step: str,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    *,
    steps: int,
    overrides: list[str],
) -> Report:
    """One ReActNet step (``step2``: W1A1, ``step1``: W32A1) over ``steps`` optimizer steps on both sides."""
    folder, cell = STEPS[step]
    batch = len(batches[0][1])
    extra = f", qrepro overrides {' '.join(overrides)}" if overrides else ""
    what = "W1A1 (step 2)" if step == "step2" else "W32A1 (step 1)"
    rep = Report(f"ReActNet-18 {what}, float64, batch {batch}, {steps} Adam steps, distillation loss{extra}", TOL)
    lr = THEIR_LR * (1.0 - 1.0 / THEIR_EPOCHS)  # LambdaLR stepped before the first epoch
    with (
        reference_import(Path(reference) / folder) as imp,
        reference_import(Path(reference) / "utils") as imp_utils,  # a folder of modules, no package
        tempfile.TemporaryDirectory() as tmp,
    ):
        torch.manual_seed(0)
        theirs = imp("birealnet").birealnet18(num_classes=10).double()
        _init_like_a_trained_step(theirs, 0)
        teacher = tv_resnet18(weights=None, num_classes=10).double().eval()
        for p in teacher.parameters():
            p.requires_grad = False
        torch.save(teacher.state_dict(), Path(tmp) / "teacher.pt")
        kd = imp_utils("KD_loss").DistributionLoss()
        t_opt = _their_optimizer(theirs, 0.0)
        t_sched = torch.optim.lr_scheduler.LambdaLR(t_opt, lambda e: 1.0 - e / THEIR_EPOCHS, last_epoch=-1)
        with warnings.catch_warnings():  # torch warns about a schedule stepped before the optimizer: their order
            warnings.simplefilter("ignore", UserWarning)
            t_sched.step()  # train(): scheduler.step() at the start of the epoch

        run = our_run(
            [
                f"+experiment=reactnet18_cifar10_{cell}",
                "trainer.device=cpu",
                "model.stem=imagenet",
                f"quantizer.distill={{model: resnet18, checkpoint: '{Path(tmp) / 'teacher.pt'}'}}",
                f"optimizer.lr={lr!r}",
                "optimizer.weight_decay=0",
                "optimizer.groups=[]",
                "scheduler=constant",
                "trainer.epochs=1",
                *overrides,
            ],
            max(1, steps),
        )
        ours = run.model
        t_sd, o_sd = theirs.state_dict(), ours.state_dict()
        if set(t_sd) != set(o_sd):
            raise QreproError(f"parity reactnet: state_dict keys differ: {sorted(set(t_sd) ^ set(o_sd))[:8]}")
        ours.load_state_dict(t_sd, strict=True)
        t_params = dict(theirs.named_parameters())
        o_params = dict(ours.named_parameters())
        binary = [n for n in o_params if n.endswith("binary_conv.weight")]
        start = {n: o_params[n].detach().clone() for n in binary}
        logits: list[torch.Tensor] = []
        handle = ours.register_forward_hook(lambda m, a, out: logits.append(out.detach()))
        losses_t, losses_o, lr_t, lr_o = [], [], [], []
        for i in range(steps):
            x8, y = batches[i % len(batches)]
            x = normalize(x8, IMAGENET_MEAN, IMAGENET_STD)
            lr_t.append(torch.tensor([g["lr"] for g in t_opt.param_groups], dtype=torch.float64))
            lr_o.append(torch.tensor(sorted({g["lr"] for g in run.optimizer.param_groups}), dtype=torch.float64))
            # the oracle: train.py's step
            theirs.train()
            out_t = theirs(x)
            loss_t = kd(out_t, teacher(x))
            t_opt.zero_grad()
            loss_t.backward()
            keep = i in (0, steps - 1)  # gradients compared at the first and the last step
            t_grads = {k: p.grad.detach().clone() for k, p in t_params.items()} if keep else {}
            t_opt.step()
            losses_t.append(loss_t.detach())
            # qrepro: the trainer's step
            losses_o.append(run.step(x, y))
            o_grads = {k: p.grad.detach().clone() for k, p in o_params.items()} if keep else {}
            if i == 0:
                rep.add("1st step: train-mode forward output (logits)", logits[-1], out_t)
                rep.add("1st step: loss (distribution loss)", losses_o[0], losses_t[0])
                rep.add_many("1st step: grad", o_grads, t_grads)
        handle.remove()
        rep.add(f"loss of each of the {steps} steps", torch.stack(losses_o), torch.stack(losses_t))
        rep.add("LR of each step (one value per group)", torch.stack(lr_o).expand(-1, 1), torch.stack(lr_t)[:, :1])
        rep.add("LR: their two groups agree", torch.stack(lr_t)[:, 1], torch.stack(lr_t)[:, 0])
        rep.add(f"step {steps}: train-mode forward output (logits)", logits[-1], out_t)
        rep.add_many(f"step {steps}: grad", o_grads, t_grads)
        rep.add_many(f"after {steps} steps: param", {k: v.detach() for k, v in o_params.items()}, t_params)
        st_o, st_t = run.optimizer.state, t_opt.state
        for key in ("exp_avg", "exp_avg_sq", "step"):
            o_v, t_v = param_state(st_o, o_params, key), param_state(st_t, t_params, key)
            rep.add_many(f"after {steps} steps: Adam {key}", o_v, t_v)
        rep.add_many(f"after {steps} steps: BN stats", running_stats(ours), running_stats(theirs))
    flips = sum(int((torch.sign(o_params[n].detach()) != torch.sign(start[n])).sum()) for n in binary)
    moved = max(float((o_params[n].detach() - start[n]).abs().max()) for n in binary)
    rep.notes.append(
        f"{flips} of {sum(start[n].numel() for n in binary)} binary-conv latent weights changed sign over the steps; "
        f"largest latent-weight change {moved:.3e}; losses {float(losses_t[0]):.4f} -> {float(losses_t[-1]):.4f}"
    )
    return rep


suite = cell_suite(
    "reactnet",
    compare_step,
    need=("resnet/1_step1/birealnet.py", "resnet/2_step2/birealnet.py", "utils/KD_loss.py"),
    repo="liuzechun/ReActNet",
    grid=CELLS,
    quick_grid=QUICK_CELLS,
    default_batch=DEFAULT_BATCH,
)
