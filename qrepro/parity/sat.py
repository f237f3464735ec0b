"""SAT parity: qrepro against the SAT authors' code (their AdaBits repository), float64, real CIFAR-10 images.

``python -m qrepro.parity sat --reference <checkout of deJQK/AdaBits>`` runs (1) quantized conv + linear layers,
(2) a MobileNet-V2 inverted residual block and (3) whole SAT experiments (qrepro's built by ``qrepro.api.build``),
both sides from the authors' randomly initialised weights, N steps each. ``quantizer={...}`` changes qrepro's
quantizer options (``{"variance": "mean_square"}``, the paper's VAR, must FAIL). What is compared, the recipes and
the measured differences: docs/sat.md, section "Parity with the authors' code".
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qrepro.models.sat_nets import InvertedResidual, adabits_key, adabits_state_dict
from qrepro.optim import build_optimizer
from qrepro.parity import SUITES, Report, cifar_batches, one_thread, our_run, reference_import, relative_tol
from qrepro.quant import build_method, prepare

D = torch.float64
ALPHA_CONV, ALPHA_FC = 2.0, 1.0
SGD = {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 4.0e-5}  # apps/cifar10/*.yml
GROUPS = [{"tags": ["norm", "bias", "depthwise", "act_clip"], "weight_decay": 0.0}]  # the SAT experiments' rule

# quantizer flags of the authors' recipes (apps/*/*.yml; unset flags take their code's getattr defaults)
FLAGS_CIFAR = dict(
    depth=20,
    reset_parameters=True,
    weight_quant_scheme="modified",
    act_quant_scheme="original",
    rescale=True,
    rescale_conv=True,
    rescale_type="constant",
    clamp=True,
    switch_alpha=True,
    switchbn=True,
    stats_sharing=False,
    weight_only=False,
)
FLAGS_MBV2 = {**FLAGS_CIFAR, "rescale_conv": False}  # apps/imagenet/q_mobilenetv2_uint8_train_val.yml
FLAGS_MBV1 = {**FLAGS_MBV2, "switch_alpha": False}  # apps/imagenet/q_mobilenetv1_uint8_train_val.yml


@contextlib.contextmanager
def authors(reference: Path, bits: int, **flags: Any) -> Iterator[Callable[[str], Any]]:
    """Import the authors' modules with ``FLAGS`` = their recipe's flags and ``bits_list = [bits]``."""
    cfg = types.ModuleType("utils.config")
    cfg.FLAGS = types.SimpleNamespace(bits_list=[bits], **flags)  # their code reads FLAGS with getattr defaults
    pkg = types.ModuleType("utils")
    pkg.__path__ = []  # a package, so that "utils.config" resolves to the stand-in
    pkg.config = cfg
    with reference_import(reference, {"utils": pkg, "utils.config": cfg}) as imp:
        yield imp


def authors_sgd(model: nn.Module, lr: float, momentum: float, nesterov: bool, weight_decay: float):
    """The authors' ``get_optimizer`` (train.py) rule: one group per parameter, weight decay on 4-D weights that
    are not depthwise (size(1) != 1) and on 2-D weights, none on BN parameters, biases, clips and depthwise."""
    groups = []
    for p in model.parameters():
        s = list(p.size())
        wd = weight_decay if (len(s) == 4 and s[1] != 1) or len(s) == 2 else 0.0
        groups.append({"params": [p], "weight_decay": wd, "lr": lr, "momentum": momentum, "nesterov": nesterov})
    return torch.optim.SGD(groups)


@dataclass
class Side:
    """One implementation: its model, optimizer, one training step, and what the first step captured."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    layers: dict[str, nn.Module] = field(default_factory=dict)  # our names -> layers whose inputs are compared
    logits: torch.Tensor | None = None
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    _handles: list[Any] = field(default_factory=list)

    def capture(self) -> None:
        def out_hook(mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
            self.logits = out.detach().clone()

        self._handles.append(self.model.register_forward_hook(out_hook))
        for name, layer in self.layers.items():

            def pre(mod: nn.Module, args: tuple, _n: str = name) -> None:
                if args[0].requires_grad:
                    args[0].retain_grad()
                self.inputs[_n] = args[0]

            self._handles.append(layer.register_forward_pre_hook(pre))

    def release(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def plain_step(model: nn.Module, opt: torch.optim.Optimizer) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        model.train()
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def compare_training(
    report: Report,
    ours: Side,
    ref: Side,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    eval_batch: torch.Tensor,
    alphas: dict[str, float] | None = None,
) -> None:
    """Copy the authors' weights into ours, take ``len(batches)`` steps on both, add the comparison rows."""
    with torch.no_grad():
        for name, m in ref.model.named_modules():  # the clips under test, on both sides
            if alphas and name in alphas and hasattr(m, "alpha"):
                m.alpha.fill_(alphas[name])
        ours.model.load_state_dict(adabits_state_dict(ref.model.state_dict(), ours.model.state_dict()))
    o_params = dict(ours.model.named_parameters())
    r_params = {adabits_key(k): p for k, p in ref.model.named_parameters()}
    r_params = {k: p for k, p in r_params.items() if k in o_params}  # their weight-only first conv's clip
    assert set(r_params) == set(o_params), sorted(set(o_params) ^ set(r_params))
    o_group = {id(p): g for g in ours.optimizer.param_groups for p in g["params"]}
    r_group = {id(p): g for g in ref.optimizer.param_groups for p in g["params"]}
    losses_o, losses_r = [], []
    for i, (x, y) in enumerate(batches):
        x = x.to(D)
        if i == 0:
            ours.capture(), ref.capture()
        for k, p in o_params.items():  # the authors' optimizer takes our schedule's learning rate
            r_group[id(r_params[k])]["lr"] = o_group[id(p)]["lr"]
        losses_o.append(ours.step(x, y))
        losses_r.append(ref.step(x, y))
        if i == 0:
            ours.release(), ref.release()
            report.add("train logits (step 1)", ours.logits, ref.logits)
            for n in ours.layers:
                report.add(f"grad input {n}", ours.inputs[n].grad, ref.inputs[n].grad)
            report.add_many("grad", {k: p.grad for k, p in o_params.items()}, {k: r_params[k].grad for k in o_params})
            al = [k for k in o_params if k.endswith("aq.alpha")]
            if al:
                report.add_many("grad alpha", {k: o_params[k].grad for k in al}, {k: r_params[k].grad for k in al})
    report.add(f"loss, steps 1..{len(batches)}", torch.stack(losses_o), torch.stack(losses_r))
    report.add_many(f"params after {len(batches)} steps", o_params, r_params)
    mom_o = {k: ours.optimizer.state[p]["momentum_buffer"] for k, p in o_params.items()}
    mom_r = {k: ref.optimizer.state[r_params[k]]["momentum_buffer"] for k in o_params}
    report.add_many("momentum", mom_o, mom_r)
    o_bufs = {k: b for k, b in ours.model.named_buffers() if "running" in k}
    r_bufs = {adabits_key(k): b for k, b in ref.model.named_buffers() if "running" in k}
    report.add_many("BN running stats", o_bufs, {k: r_bufs[k] for k in o_bufs})
    with torch.no_grad():
        ours.model.eval(), ref.model.eval()
        report.add("eval logits", ours.model(eval_batch.to(D)), ref.model(eval_batch.to(D)))
        ours.model.train(), ref.model.train()


def compare_layers(rep: Report, ours: nn.Module, ref: nn.Module, bits: int, opts: dict, alphas: dict, *data) -> None:
    """``compare_training`` of ``ours`` quantized by ``build_method('sat', bits, bits, **opts)`` against the
    authors' layers ``ref``, with the inputs to the layers ``alphas`` (clips set to these values) compared too."""
    prepare(ours, build_method("sat", bits, bits, **opts)).to(D)  # the quantizers' clips in float64 too
    o_opt, r_opt = build_optimizer(ours, "sgd", GROUPS, **SGD), authors_sgd(ref, **SGD)
    o = Side(ours, o_opt, plain_step(ours, o_opt), layers={n: ours.get_submodule(n) for n in alphas})
    r = Side(ref, r_opt, plain_step(ref, r_opt), layers={n: ref.get_submodule(n) for n in alphas})
    compare_training(rep, o, r, *data, alphas=alphas)


# ------------------------------------------------------------------------------------------------- suites
def _layers_net(conv: Any, bn: Any, linear: Any, **first_conv: Any) -> nn.Sequential:
    """The network of (1) made of ``conv`` / ``bn`` / ``linear`` layers (the authors' quantized ones or torch's)."""
    return nn.Sequential(
        conv(3, 8, 3, 2, 1, bias=False, **first_conv),
        bn(8),
        nn.ReLU(),
        conv(8, 16, 3, 1, 1, bias=False),
        bn(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        linear(16, 10),
    )


def layers_report(reference: Path, scheme: str, bits: int, batches, eval_batch, quantizer: dict) -> Report:
    """(1): first conv (3 -> 8, stride 2, weight-only) - BN - ReLU - conv (8 -> 16) - BN - ReLU - pool - FC,
    every layer rescaled."""
    rep = Report(f"SAT layers, weight levels {scheme}, W{bits}A{bits}, rescaled (Eq. 10), CG-PACT", relative_tol)
    with authors(reference, bits, **{**FLAGS_CIFAR, "weight_quant_scheme": scheme}) as imp:
        q = imp("models.quant_ops")
        torch.manual_seed(bits)
        ref = _layers_net(q.QConv2d, q.SwitchBN2d, q.QLinear, weight_only=True).to(D)
        ours = _layers_net(nn.Conv2d, nn.BatchNorm2d, nn.Linear)
        opts = {"scheme": scheme, "rescale": "all", "first_last": "same", **quantizer}
        compare_layers(rep, ours, ref, bits, opts, {"3": ALPHA_CONV, "8": ALPHA_FC}, batches, eval_batch)
    rep.notes.append(f"qrepro: build_method('sat', {bits}, {bits}, {opts}) + prepare; {len(batches)} SGD steps {SGD}")
    return rep


def block_report(reference: Path, bits: int, double_side: bool, batches, eval_batch, quantizer: dict) -> Report:
    """(2): first conv (8-bit, weight-only, stride 2) - BN - inverted residual (C -> C, t = 6, residual) - pool -
    FC (8-bit); C = 24 as in MobileNet-V2's second stage, 16x16 maps."""
    C = 24

    side = "two-sided PACT on the expand conv (double_side)" if double_side else "one-sided PACT"
    rep = Report(f"SAT MobileNet-V2 block, W{bits}A{bits}, {side}, last FC rescaled", relative_tol)
    with authors(reference, bits, **{**FLAGS_MBV2, "double_side": double_side}) as imp:
        q = imp("models.quant_ops")
        mb = imp("models.q_mobilenet_v2")
        torch.manual_seed(100 + bits)
        ref = nn.Sequential(
            q.QConv2d(3, C, 3, 2, 1, bias=False, bitw_min=8, weight_only=True),
            q.SwitchBN2d(C),
            mb.InvertedResidual(C, C, 1, 6, double_side=double_side),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            q.QLinear(C, 10, bitw_min=8),
        ).to(D)
        ours = nn.Sequential(
            nn.Conv2d(3, C, 3, 2, 1, bias=False),
            nn.BatchNorm2d(C),
            InvertedResidual(C, C, 1, 6),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(C, 10),
        )
        opts = {"signed_act": ["2.body.0"] if double_side else False, **quantizer}
        alphas = {"2.body.0": ALPHA_CONV, "2.body.3": ALPHA_CONV, "2.body.6": ALPHA_CONV, "5": ALPHA_FC}
        compare_layers(rep, ours, ref, bits, opts, alphas, batches, eval_batch)
    rep.notes.append(f"qrepro: qrepro.models.sat_nets.InvertedResidual, build_method('sat', {bits}, {bits}, {opts})")
    return rep


# experiment -> (the authors' model module, their recipe's flags, steps per epoch for our schedule, classes,
# extra overrides). The ImageNet MobileNets keep 1000 classes (with 10, Eq. 10 makes the logits several times too
# large: ETR I is an ImageNet rule) and train at a hundredth of the recipe's lr: from a random init, 8 images a
# step, the recipe's lr makes both implementations diverge alike (weights ~1e20 within 5 steps; MobileNet-V2 still
# at a tenth), and then float64 round-off is amplified without bound: no comparison of anything.
EXPERIMENTS: dict[str, tuple[str, dict[str, Any], int, int, list[str]]] = {
    "sat_cifar_resnet20_4bit_sat": ("models.q_resnet_cifar", FLAGS_CIFAR, 391, 10, []),
    "sat_cifar_resnet20_fp": ("models.q_resnet_cifar", FLAGS_CIFAR, 391, 10, []),
    "sat_mbv2_4bit": ("models.q_mobilenet_v2", FLAGS_MBV2, 625, 1000, ["optimizer.lr=0.004"]),
    "sat_mbv1_4bit": ("models.q_mobilenet_v1", FLAGS_MBV1, 625, 1000, ["optimizer.lr=0.004"]),
}


def experiment_report(reference: Path, experiment: str, batches, eval_batch, quantizer: dict) -> Report:
    """(3): a SAT experiment as the trainer builds it against the authors' model with their recipe's flags."""
    module, flags, spe, classes, extra = EXPERIMENTS[experiment]
    overrides = [f"+experiment={experiment}", *extra, *(f"quantizer.{k}={v}" for k, v in quantizer.items())]
    run = our_run([*overrides, "trainer.device=cpu", "logger=none", "trainer.compile=false"], spe, num_classes=classes)
    bits = int(run.cfg.precision.w_bits)
    prec = "FP (clamped, rescaled)" if bits == 32 else f"W{bits}A{bits}"
    rep = Report(f"SAT experiment {experiment} vs the authors' {module}, {prec}", relative_tol)
    with authors(reference, bits, **flags) as imp:
        torch.manual_seed(7)
        ref = imp(module).Model(classes).to(D)
        wd = float(run.cfg.optimizer.weight_decay)
        r_opt = authors_sgd(ref, lr=0.0, momentum=0.9, nesterov=True, weight_decay=wd)
        o = Side(run.model, run.optimizer, run.step)
        r = Side(ref, r_opt, plain_step(ref, r_opt))
        compare_training(rep, o, r, batches, eval_batch)
    q, opt, sch = run.cfg.quantizer, run.cfg.optimizer, run.cfg.scheduler
    rep.notes += [
        f"qrepro: qrepro.api.build({' '.join(overrides)}), {classes} classes: model={run.cfg.model.name}, "
        f"quantizer={q.name}, scheme={q.scheme}, rescale={q.rescale}, variance={q.variance}, "
        f"first_last={q.first_last}, signed_act={q.signed_act}",
        f"{len(batches)} steps of run.step, {batches[0][0].shape[0]} images each; the authors' SGD (momentum 0.9, "
        f"Nesterov, wd {wd}) takes our schedule's lr ({sch.name}, lr {opt.lr}) at every step",
    ]
    return rep


@SUITES.register("sat")
def suite(
    reference: Path,
    *,
    steps: int = 20,
    data: Any = None,
    quick: bool = False,
    batch: int = 16,
    quantizer: dict[str, Any] | None = None,
) -> list[Report]:
    quantizer = dict(quantizer or {})
    batches = cifar_batches(data, steps + 1, batch, seed=0)
    train, (eval_x, _) = batches[:steps], batches[steps]
    layer_grid = (
        [("modified", 2), ("original", 4)] if quick else [(s, b) for s in ("original", "modified") for b in (2, 4, 8)]
    )
    block_grid = [(4, False), (4, True)] if quick else [(2, False), (4, False), (4, True)]
    small = [(x[:8], y[:8]) for x, y in train]  # whole networks: 8 images a step
    with one_thread():
        return [
            *(layers_report(reference, scheme, bits, train, eval_x, quantizer) for scheme, bits in layer_grid),
            *(block_report(reference, bits, ds, train, eval_x, quantizer) for bits, ds in block_grid),
            *(
                experiment_report(reference, exp, small, eval_x[:8], quantizer)
                for exp in (["sat_cifar_resnet20_4bit_sat"] if quick else EXPERIMENTS)
            ),
        ]
