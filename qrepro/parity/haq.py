"""HAQ / Deep Compression k-means parity: qrepro's ``quantizer=dc`` against the HAQ authors' k-means code
(mit-han-lab/haq: ``lib/utils/quantize_utils.py`` and the training step of ``finetune.py``), and qrepro's linear
HAQ quantizer against their ``QConv2d`` / ``QLinear`` (``linear_suite``).

``python -m qrepro.parity haq --reference <checkout>``: an FP CIFAR ResNet-20 on both sides, clustered by their
``quantize_model`` (handed Deep Compression's linear centroid initialisation as its ``centroids_init``: their
default k-means++ is random) and fine-tuned by their ``finetune.py`` step with its per-epoch cosine lr, against the
``dc_resnet50_imagenet_w2a32`` experiment on ``model=resnet20`` with ``quantizer.centroid_grad=mean`` and
``quantizer.init=linear``; the same weights (copied in module order) and, for the fine-tuning, the same clustered
state. What is compared, the stand-ins (``.cuda()``, ``.float()``, ``progress.bar``) and the measured differences:
docs/haq.md, section "Parity with the authors' code".
"""

from __future__ import annotations

import contextlib
import math
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from qrepro.errors import QreproError
from qrepro.models import build_model
from qrepro.parity import SUITES, Report, cifar_batches, normalize, one_thread, our_run, reference_import
from qrepro.quant.layers import quantized_layers

BITS = 2
MODEL = "resnet20"  # any model: their k-means code works on every nn.Conv2d / nn.Linear of a module
DEFAULT_BATCH = 8
TOL = 1e-9
EPOCHS, STEPS_PER_EPOCH = 100, 5  # finetune.py's 100 epochs; a short epoch so the per-epoch cosine moves
THEIR_LR, THEIR_MOMENTUM, THEIR_WD = 0.01, 0.9, 1e-5  # run_kmeans_quantize_finetune.sh, finetune.py defaults
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # their ImageNet normalisation, also our experiment's


def _stubs() -> dict[str, types.ModuleType]:
    progress = types.ModuleType("progress")
    bar = types.ModuleType("progress.bar")

    class Bar:  # silent stand-in for the progress display
        def __init__(self, *a: Any, **k: Any) -> None:
            self.suffix = ""

        def next(self) -> None: ...

        def finish(self) -> None: ...

    bar.Bar = Bar  # type: ignore[attr-defined]
    progress.bar = bar  # type: ignore[attr-defined]
    return {"progress": progress, "progress.bar": bar}


@contextlib.contextmanager
def _cpu_float64() -> Any:
    """Their ``.cuda()`` as the identity and ``.float()`` as float64 while their code runs."""
    cuda, flt = torch.Tensor.cuda, torch.Tensor.float
    torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
    torch.Tensor.float = lambda self, *a, **k: self.to(torch.float64)  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.cuda, torch.Tensor.float = cuda, flt  # type: ignore[method-assign]


def linear_init(x: np.ndarray, n_clusters: int, random_state: Any = None) -> np.ndarray:
    """scikit-learn ``init`` callable: n_clusters centroids evenly spaced over [min, max] (Deep Compression)."""
    return np.linspace(x.min(), x.max(), n_clusters).reshape(-1, 1)


def _fp_and_ours(experiment: str, epochs: int, overrides: list[str] | None, *settings: str) -> tuple[nn.Module, Any]:
    """The FP ``MODEL`` their code quantizes and our run of ``experiment`` on ``MODEL`` holding its weights (copied
    in module order: same architecture, shapes checked one by one)."""
    torch.manual_seed(0)
    fp = build_model(MODEL, num_classes=10).double().train()
    base = [f"+experiment={experiment}", f"model={MODEL}", *settings, "trainer.device=cpu", f"trainer.epochs={epochs}"]
    run = our_run([*base, "init_from=null", *(overrides or [])], STEPS_PER_EPOCH)
    a, b = fp.state_dict(), run.model.state_dict()
    mine = [k for k in b if ".wq." not in k and ".aq." not in k]
    if len(a) != len(mine):
        raise QreproError(f"parity haq: {len(a)} tensors in their model, {len(mine)} in ours")
    with torch.no_grad():
        for (ka, va), kb in zip(a.items(), mine):
            if va.shape != b[kb].shape:
                raise QreproError(f"parity haq: {ka} {tuple(va.shape)} vs {kb} {tuple(b[kb].shape)}")
            b[kb].copy_(va)
    return fp, run


def _their_lr(step: int, epochs: int) -> float:
    """finetune.py's cosine lr, stepped once per epoch."""
    return 0.5 * THEIR_LR * (1 + math.cos(math.pi * (step // STEPS_PER_EPOCH) / epochs))


def _their_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, lr: float) -> float:
    """finetune.py's training step at learning rate ``lr``; returns the loss."""
    for g in opt.param_groups:
        g["lr"] = lr
    loss = nn.CrossEntropyLoss()(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return float(loss.detach())


@contextlib.contextmanager
def _isolated() -> Any:
    """One torch thread, and ``sys.path`` restored afterwards (their models/mobilenet.py inserts a path of its own)."""
    path0 = list(sys.path)
    try:
        with one_thread():
            yield
    finally:
        sys.path[:] = path0


def _cluster_mean(values: torch.Tensor, labels: torch.Tensor, n: int) -> torch.Tensor:
    """Per cluster: the mean of ``values`` over its members (0 where a cluster is empty)."""
    lab = labels.reshape(-1)
    total = torch.zeros(n, dtype=torch.float64).index_add_(0, lab, values.reshape(-1))
    return total / torch.bincount(lab, minlength=n).clamp_min(1)


def _ix(values: Any) -> dict[str, Any]:
    """Items keyed by their position (layers of the two sides are matched by order)."""
    return {str(k): v for k, v in enumerate(values)}


def suite(
    reference: Path | str,
    *,
    steps: int = 20,
    data: Path | str | None = None,
    batch: int = DEFAULT_BATCH,
    quick: bool = False,
    overrides: list[str] | None = None,
) -> list[Report]:
    root = Path(reference)
    if not (root / "lib" / "utils" / "quantize_utils.py").is_file():
        raise QreproError(f"--reference {root} has no lib/utils/quantize_utils.py; pass a checkout of mit-han-lab/haq")
    batches = cifar_batches(data, steps + 1, batch, seed=0)
    with _isolated(), reference_import(root, _stubs()) as imp, _cpu_float64():
        qu = imp("lib.utils.quantize_utils")

        theirs, run = _fp_and_ours(
            "dc_resnet50_imagenet_w2a32",
            EPOCHS,
            overrides,
            "quantizer.centroid_grad=mean",  # HAQ's code: the cluster mean after each step
            "quantizer.init=linear",  # the initialisation the suite hands to their k-means
        )
        rep = Report(f"HAQ k-means (Deep Compression) {MODEL} W{BITS}, {steps} steps, batch {batch}", TOL)
        found = [(i, n, m) for i, (n, m) in enumerate(theirs.named_modules()) if type(m) in (nn.Conv2d, nn.Linear)]
        idx = [i for i, _, _ in found]
        cl = qu.quantize_model(
            theirs, idx, [BITS] * len(idx), max_iter=50, mode="cpu", quantize_bias=False, centroids_init=linear_init
        )
        opt = torch.optim.SGD(theirs.parameters(), lr=THEIR_LR, momentum=THEIR_MOMENTUM, weight_decay=THEIR_WD)
        layers = [layer for _, layer in quantized_layers(run.model)]
        if len(layers) != len(idx):
            raise QreproError(f"parity haq: {len(idx)} layers clustered by theirs, {len(layers)} by ours")
        their_layers = [m for _, _, m in found]
        weight_names = [f"{n}.weight" for _, n, _ in found]
        centroids_t = [cl[i][0][0].view(-1) for i in idx]
        x0, y0 = batches[0]
        xin = normalize(x0, MEAN, STD)
        # step 0: our k-means runs in the first step's start hook; compare before stepping
        run.start(xin, y0)
        rep.add_many("k-means centroids", _ix(q.wq.centroids for q in layers), _ix(centroids_t))
        labels_t = _ix(cl[i][0][1].double() for i in idx)
        rep.add_many("k-means labels", _ix(q.wq.labels.double() for q in layers), labels_t, tol=0.0)
        effective = _ix(q.effective_weight() for q in layers)
        rep.add_many("clustered weights", effective, _ix(t.weight for t in their_layers))
        with torch.no_grad():  # the training comparison starts from the same clustered state
            for q, c in zip(layers, centroids_t):
                q.wq.centroids[: c.numel()] = c
        losses_ours, losses_theirs = [], []
        w0 = [q.effective_weight().detach().clone() for q in layers]
        for s in range(steps):
            x, y = batches[s]
            xin = normalize(x, MEAN, STD)
            losses_theirs.append(_their_step(theirs, opt, xin, y, _their_lr(s, EPOCHS)))
            if s == 0:  # SGD's step leaves the gradients as they are
                first_grads = {n: p.grad.clone() for n, p in theirs.named_parameters()}
            qu.kmeans_update_model(theirs, idx, cl, free_high_bit=True)
            losses_ours.append(float(run.step(xin, y)))
            if s == 0:
                rep.add_many(
                    "1st step: centroid grad vs mean of member grads",
                    _ix(q.wq.centroids.grad for q in layers),
                    _ix(
                        _cluster_mean(first_grads[w], q.wq.labels, q.wq.centroids.numel())
                        for w, q in zip(weight_names, layers)
                    ),
                )
                bn_t = [g for n, g in first_grads.items() if n not in weight_names]
                o_grads = {n: p.grad for n, p in run.model.named_parameters() if ".wq." not in n and p.grad is not None}
                rep.add_many("1st step: grad of BN params and classifier bias", o_grads, dict(zip(o_grads, bn_t)))
        rep.add("loss of each step", losses_ours, losses_theirs)
        effective = _ix(q.effective_weight() for q in layers)
        rep.add_many(f"after {steps} steps: effective weights", effective, _ix(t.weight for t in their_layers))
        q_weights = {f"{n}.weight" for n, _ in quantized_layers(run.model)}
        ours_other = [t for n, t in run.model.state_dict().items() if ".wq." not in n and n not in q_weights]
        theirs_other = [t for n, t in theirs.state_dict().items() if n not in weight_names]
        rep.add_many(f"after {steps} steps: BN params/statistics, classifier bias", _ix(ours_other), _ix(theirs_other))
        mom_ours, mom_theirs = {}, {}
        for k, (q, t) in enumerate(zip(layers, their_layers)):
            n = q.wq.centroids.numel()
            present = torch.bincount(q.wq.labels.reshape(-1), minlength=n) > 0
            mom_theirs[f"{k}"] = _cluster_mean(opt.state[t.weight]["momentum_buffer"], q.wq.labels, n)[present]
            mom_ours[f"{k}"] = run.optimizer.state[q.wq.centroids]["momentum_buffer"][present]
        rep.add_many(f"after {steps} steps: centroid momentum vs mean weight momentum", mom_ours, mom_theirs)
        moved = max(float((q.effective_weight().detach() - w).abs().max()) for q, w in zip(layers, w0))
        rep.notes.append(f"largest change of a shared weight over the steps: {moved:.3e}")
    return [rep]


# --------------------------------------------------------------------------------------------- linear
LINEAR_BITS = 4  # every layer but the first (8-bit weights, input unquantized): below 5 bits, so KL thresholds
LINEAR_EPOCHS, LINEAR_WD = 30, 4e-5  # run_linear_quantize_finetune.sh


def _their_linear_model(qu: Any, fp: nn.Module) -> tuple[nn.Module, list[nn.Module]]:
    """``fp`` with every nn.Conv2d / nn.Linear replaced by their QConv2d / QLinear (weights copied), bits set as
    finetune.py sets them from a strategy: [8, -1] for the first layer, [LINEAR_BITS] x 2 for the others."""
    layers = []
    for i, (name, m) in enumerate([(n, m) for n, m in fp.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]):
        if isinstance(m, nn.Conv2d):
            q = qu.QConv2d(
                m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups,
                bias=m.bias is not None,
            )  # fmt: skip
        else:
            q = qu.QLinear(m.in_features, m.out_features, bias=m.bias is not None)
        q = q.double()
        with torch.no_grad():
            q.weight.copy_(m.weight)
            if m.bias is not None:
                q.bias.copy_(m.bias)
        q.w_bit, q.a_bit = (8, -1) if i == 0 else (LINEAR_BITS, LINEAR_BITS)
        parent, _, child = name.rpartition(".")
        setattr(fp.get_submodule(parent) if parent else fp, child, q)
        layers.append(q)
    return fp, layers


def linear_suite(
    reference: Path | str, *, steps: int, data: Path | str | None, batch: int, overrides: list[str] | None
) -> Report:
    """HAQ's linear quantizer (their QConv2d / QLinear, calibration and training step) against ``quantizer=haq``."""
    root = Path(reference)
    batches = cifar_batches(data, steps + 1, batch, seed=1)
    with reference_import(root, _stubs()) as imp:
        qu = imp("lib.utils.quantize_utils")
        fp, run = _fp_and_ours(
            "haq_mobilenet_v1_imagenet_w8a8", LINEAR_EPOCHS, overrides, f"precision=w{LINEAR_BITS}a{LINEAR_BITS}"
        )
        theirs, their_layers = _their_linear_model(qu, fp)
        ours = [layer for _, layer in quantized_layers(run.model)]
        if len(ours) != len(their_layers):
            raise QreproError(f"parity haq: {len(their_layers)} layers quantized by theirs, {len(ours)} by ours")
        rep = Report(
            f"HAQ linear quantizer {MODEL} W{LINEAR_BITS}A{LINEAR_BITS} (first layer W8, input as is), "
            f"{steps} steps, batch {batch}",
            TOL,
        )
        x0, y0 = batches[0]
        xin = normalize(x0, MEAN, STD)
        # their calibrate(): every QModule in calibration mode, one forward of the first batch (train mode)
        qmodules = [m for m in theirs.modules() if isinstance(m, qu.QModule)]
        for m in qmodules:
            m.set_calibrate(True)
        dtype0 = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)  # their calibrate stores the range as torch.tensor([float]): float64
        try:
            with torch.no_grad():
                theirs(xin)
        finally:
            torch.set_default_dtype(dtype0)
        for m in qmodules:
            m.set_calibrate(False)
        run.start(xin, y0)
        rep.add_many(
            "calibrated weight ranges t", _ix(q.wq.threshold for q in ours), _ix(t.weight_range for t in their_layers)
        )
        act = [k for k, t in enumerate(their_layers) if t.a_bit > 0]
        o_act = {f"{k}": ours[k].aq.alpha for k in act}  # the same tensors, trained in place, throughout
        t_act = {f"{k}": their_layers[k].activation_range for k in act}
        rep.add_many("calibrated activation ranges a", o_act, t_act)
        opt = torch.optim.SGD(theirs.parameters(), lr=THEIR_LR, momentum=THEIR_MOMENTUM, weight_decay=LINEAR_WD)
        losses_ours, losses_theirs = [], []
        w0 = [q.weight.detach().clone() for q in ours]
        for s in range(steps):
            x, y = batches[s + 1]
            xin = normalize(x, MEAN, STD)
            losses_theirs.append(_their_step(theirs, opt, xin, y, _their_lr(s, LINEAR_EPOCHS)))
            losses_ours.append(float(run.step(xin, y)))
            if s == 0:
                rep.add_many(
                    "1st step: weight grads", _ix(q.weight.grad for q in ours), _ix(t.weight.grad for t in their_layers)
                )
                o_g, t_g = ({k: a.grad for k, a in d.items()} for d in (o_act, t_act))
                rep.add_many("1st step: activation range grads", o_g, t_g)
        rep.add("loss of each step", losses_ours, losses_theirs)
        rep.add_many(f"after {steps} steps: weights", _ix(q.weight for q in ours), _ix(t.weight for t in their_layers))
        rep.add_many(f"after {steps} steps: activation ranges", o_act, t_act)
        rep.add_many(
            f"after {steps} steps: quantized weights",
            _ix(q.effective_weight() for q in ours),
            _ix(t._quantize_weight(t.weight) for t in their_layers),
        )
        bn_ours = {n: v for n, v in run.model.state_dict().items() if ".bn" in n or n.startswith("bn")}
        bn_theirs = {n: v for n, v in theirs.state_dict().items() if ".bn" in n or n.startswith("bn")}
        rep.add_many(f"after {steps} steps: BatchNorm parameters and statistics", bn_ours, bn_theirs)
        moved = max(float((q.weight.detach() - w).abs().max()) for q, w in zip(ours, w0))
        rep.notes.append(f"largest change of a weight over the steps: {moved:.3e}")
    return rep


def haq_suite(reference: Path | str, *, steps: int = 20, data: Path | str | None = None, batch: int = DEFAULT_BATCH,
              quick: bool = False, overrides: list[str] | None = None, linear_overrides: list[str] | None = None,
              ) -> list[Report]:  # fmt: skip
    """Both comparisons: k-means (Deep Compression / HAQ model-size policies) and the linear quantizer."""
    reports = suite(reference, steps=steps, data=data, batch=batch, overrides=overrides)
    with _isolated():
        reports.append(linear_suite(reference, steps=steps, data=data, batch=batch, overrides=linear_overrides))
    return reports


SUITES.register("haq")(haq_suite)
