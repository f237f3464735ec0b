"""HAQ / Deep Compression k-means parity: qrepro's ``quantizer=dc`` against the HAQ authors' k-means code
(mit-han-lab/haq: ``lib/utils/quantize_utils.py`` and the training step of ``finetune.py``), and qrepro's linear
HAQ quantizer against their ``QConv2d`` / ``QLinear`` (``linear_suite``).

``python -m qrepro.parity haq --reference <checkout>``: an FP CIFAR ResNet-20 on both sides, clustered by their
``quantize_model`` (handed Deep Compression's linear centroid initialisation, computed here with numpy, as its
``centroids_init``: their default k-means++ is random) and fine-tuned by their ``finetune.py`` step with its
per-epoch cosine lr, against ``qrepro.api.build(["+experiment=dc_resnet50_imagenet_w2a32", "model=resnet20",
"quantizer.centroid_grad=mean", "quantizer.init=linear", ...])`` stepped with ``Run.step``; float64, the same
CIFAR-10 images, the same weights (copied in module order) and, for the fine-tuning, the same clustered state. What
is compared, the stand-ins (``.cuda()``, ``.float()``, ``progress.bar``) and the measured differences: docs/haq.md,
section "Parity with the authors' code".
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
from qrepro.parity import SUITES, Report, cifar_batches, normalize, our_run, reference_import
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


def _copy_weights(theirs: nn.Module, ours: nn.Module) -> None:
    """Their state in module order into ours (same architecture: shapes checked one by one)."""
    a, b = theirs.state_dict(), ours.state_dict()
    mine = [k for k in b if ".wq." not in k and ".aq." not in k]
    if len(a) != len(mine):
        raise QreproError(f"parity haq: {len(a)} tensors in their model, {len(mine)} in ours")
    with torch.no_grad():
        for (ka, va), kb in zip(a.items(), mine):
            if va.shape != b[kb].shape:
                raise QreproError(f"parity haq: {ka} {tuple(va.shape)} vs {kb} {tuple(b[kb].shape)}")
            b[kb].copy_(va)


def _their_lr(step: int) -> float:
    epoch = step // STEPS_PER_EPOCH
    return 0.5 * THEIR_LR * (1 + math.cos(math.pi * epoch / EPOCHS))


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
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    path0 = list(sys.path)
    try:
        with reference_import(root, _stubs()) as imp, _cpu_float64():
            qu = imp("lib.utils.quantize_utils")

            torch.manual_seed(0)
            theirs = build_model(MODEL, num_classes=10).double().train()
            run = our_run(
                [
                    "+experiment=dc_resnet50_imagenet_w2a32",
                    f"model={MODEL}",
                    "trainer.device=cpu",
                    f"trainer.epochs={EPOCHS}",
                    "quantizer.centroid_grad=mean",  # HAQ's code: the cluster mean after each step
                    "quantizer.init=linear",  # the initialisation the suite hands to their k-means
                    "init_from=null",
                    *(overrides or []),
                ],
                STEPS_PER_EPOCH,
            )
            _copy_weights(theirs, run.model)
            rep = Report(f"HAQ k-means (Deep Compression) {MODEL} W{BITS}, {steps} steps, batch {batch}", TOL)
            idx = [i for i, m in enumerate(theirs.modules()) if type(m) in (nn.Conv2d, nn.Linear)]
            cl = qu.quantize_model(
                theirs, idx, [BITS] * len(idx), max_iter=50, mode="cpu", quantize_bias=False, centroids_init=linear_init
            )
            opt = torch.optim.SGD(theirs.parameters(), lr=THEIR_LR, momentum=THEIR_MOMENTUM, weight_decay=THEIR_WD)
            layers = [layer for _, layer in quantized_layers(run.model)]
            if len(layers) != len(idx):
                raise QreproError(f"parity haq: {len(idx)} layers clustered by theirs, {len(layers)} by ours")
            their_layers = [m for i, m in enumerate(theirs.modules()) if i in set(idx)]
            ce = nn.CrossEntropyLoss()
            x0, y0 = batches[0]
            xin = normalize(x0, MEAN, STD)
            # step 0: our k-means runs in the first step's start hook; compare before stepping
            run.start(xin, y0)
            rep.add_many(
                "k-means centroids",
                {f"{k}": layers[k].wq.centroids for k in range(len(idx))},
                {f"{k}": cl[i][0][0].view(-1) for k, i in enumerate(idx)},
            )
            rep.add_many(
                "k-means labels",
                {f"{k}": layers[k].wq.labels.double() for k in range(len(idx))},
                {f"{k}": cl[i][0][1].double() for k, i in enumerate(idx)},
                tol=0.0,
            )
            rep.add_many(
                "clustered weights",
                {f"{k}": layers[k].effective_weight() for k in range(len(idx))},
                {f"{k}": their_layers[k].weight for k in range(len(idx))},
            )
            with torch.no_grad():  # the training comparison starts from the same clustered state
                for k, i in enumerate(idx):
                    layers[k].wq.centroids[: cl[i][0][0].numel()] = cl[i][0][0].view(-1)
            losses_ours, losses_theirs = [], []
            w0 = [layer.effective_weight().detach().clone() for layer in layers]
            for s in range(steps):
                x, y = batches[s]
                xin = normalize(x, MEAN, STD)
                for g in opt.param_groups:
                    g["lr"] = _their_lr(s)
                out_t = theirs(xin)
                loss_t = ce(out_t, y)
                opt.zero_grad()
                loss_t.backward()
                if s == 0:
                    first_grads = {n: p.grad.clone() for n, p in theirs.named_parameters()}
                opt.step()
                qu.kmeans_update_model(theirs, idx, cl, free_high_bit=True)
                losses_theirs.append(float(loss_t.detach()))
                losses_ours.append(float(run.step(xin, y)))
                if s == 0:
                    mean_grads = {}
                    for k, tl in enumerate(their_layers):
                        lab = layers[k].wq.labels
                        gsum = torch.zeros_like(layers[k].wq.centroids).index_add_(
                            0, lab.reshape(-1), first_grads[_pname(theirs, tl)].reshape(-1)
                        )
                        cnt = torch.bincount(lab.reshape(-1), minlength=gsum.numel()).clamp_min(1)
                        mean_grads[f"{k}"] = gsum / cnt
                    rep.add_many(
                        "1st step: centroid grad vs mean of member grads",
                        {f"{k}": layers[k].wq.centroids.grad for k in range(len(idx))},
                        mean_grads,
                    )
                    wnames = {_pname(theirs, tl) for tl in their_layers}
                    bn_t = {n: g for n, g in first_grads.items() if n not in wnames}
                    ours_named = [
                        (n, p) for n, p in run.model.named_parameters() if ".wq." not in n and p.grad is not None
                    ]
                    rep.add_many(
                        "1st step: grad of BN params and classifier bias",
                        {n: p.grad for n, p in ours_named},
                        dict(zip([n for n, _ in ours_named], bn_t.values())),
                    )
            rep.add("loss of each step", losses_ours, losses_theirs)
            rep.add_many(
                f"after {steps} steps: effective weights",
                {f"{k}": layers[k].effective_weight() for k in range(len(idx))},
                {f"{k}": their_layers[k].weight for k in range(len(idx))},
            )
            ours_other = [t for n, t in run.model.state_dict().items() if ".wq." not in n and not _is_qweight(n, run)]
            theirs_other = [t for n, t in theirs.state_dict().items() if not _is_weight_of(n, theirs, their_layers)]
            rep.add_many(
                f"after {steps} steps: BN params/statistics, classifier bias",
                {f"{k}": v for k, v in enumerate(ours_other)},
                {f"{k}": v for k, v in enumerate(theirs_other)},
            )
            mom_ours, mom_theirs = {}, {}
            for k, tl in enumerate(their_layers):
                buf = opt.state[tl.weight]["momentum_buffer"]
                lab = layers[k].wq.labels
                gsum = torch.zeros_like(layers[k].wq.centroids).index_add_(0, lab.reshape(-1), buf.reshape(-1))
                cnt = torch.bincount(lab.reshape(-1), minlength=gsum.numel()).clamp_min(1)
                present = torch.bincount(lab.reshape(-1), minlength=gsum.numel()) > 0
                mom_theirs[f"{k}"] = (gsum / cnt)[present]
                mom_ours[f"{k}"] = run.optimizer.state[layers[k].wq.centroids]["momentum_buffer"][present]
            rep.add_many(f"after {steps} steps: centroid momentum vs mean weight momentum", mom_ours, mom_theirs)
            moved = max(float((layers[k].effective_weight().detach() - w0[k]).abs().max()) for k in range(len(idx)))
            rep.notes.append(f"largest change of a shared weight over the steps: {moved:.3e}")
    finally:
        sys.path[:] = path0  # their models/mobilenet.py inserts a path of its own
        torch.set_num_threads(threads)
    return [rep]


def _pname(model: nn.Module, layer: nn.Module) -> str:
    for n, p in model.named_parameters():
        if p is layer.weight:
            return n
    raise KeyError("layer weight not found")


def _is_weight_of(name: str, model: nn.Module, layers: list[nn.Module]) -> bool:
    return name in {_pname(model, layer) for layer in layers}


def _is_qweight(name: str, run: Any) -> bool:
    return name in {f"{n}.weight" for n, _ in quantized_layers(run.model)}


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
        torch.manual_seed(0)
        fp = build_model(MODEL, num_classes=10).double().train()
        run = our_run(
            [
                "+experiment=haq_mobilenet_v1_imagenet_w8a8",
                f"model={MODEL}",
                f"precision=w{LINEAR_BITS}a{LINEAR_BITS}",
                "trainer.device=cpu",
                f"trainer.epochs={LINEAR_EPOCHS}",
                "init_from=null",
                *(overrides or []),
            ],
            STEPS_PER_EPOCH,
        )
        _copy_weights(fp, run.model)
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
        for m in theirs.modules():
            if isinstance(m, qu.QModule):
                m.set_calibrate(True)
        dtype0 = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)  # their calibrate stores the range as torch.tensor([float]): float64
        try:
            with torch.no_grad():
                theirs(xin)
        finally:
            torch.set_default_dtype(dtype0)
        for m in theirs.modules():
            if isinstance(m, qu.QModule):
                m.set_calibrate(False)
        run.start(xin, y0)
        rep.add_many(
            "calibrated weight ranges t",
            {f"{k}": q.wq.threshold for k, q in enumerate(ours)},
            {f"{k}": t.weight_range for k, t in enumerate(their_layers)},
        )
        act = [k for k, t in enumerate(their_layers) if t.a_bit > 0]
        rep.add_many(
            "calibrated activation ranges a",
            {f"{k}": ours[k].aq.alpha for k in act},
            {f"{k}": their_layers[k].activation_range for k in act},
        )
        opt = torch.optim.SGD(theirs.parameters(), lr=THEIR_LR, momentum=THEIR_MOMENTUM, weight_decay=LINEAR_WD)
        ce = nn.CrossEntropyLoss()
        losses_ours, losses_theirs = [], []
        w0 = [q.weight.detach().clone() for q in ours]
        for s in range(steps):
            x, y = batches[s + 1]
            xin = normalize(x, MEAN, STD)
            for g in opt.param_groups:
                g["lr"] = 0.5 * THEIR_LR * (1 + math.cos(math.pi * (s // STEPS_PER_EPOCH) / LINEAR_EPOCHS))
            out = theirs(xin)
            loss = ce(out, y)
            opt.zero_grad()
            loss.backward()
            if s == 0:
                their_grads = [(t.weight.grad.clone(), t.activation_range.grad) for t in their_layers]
            opt.step()
            losses_theirs.append(float(loss.detach()))
            losses_ours.append(float(run.step(xin, y)))
            if s == 0:
                rep.add_many(
                    "1st step: weight grads",
                    {f"{k}": q.weight.grad for k, q in enumerate(ours)},
                    {f"{k}": g[0] for k, g in enumerate(their_grads)},
                )
                rep.add_many(
                    "1st step: activation range grads",
                    {f"{k}": ours[k].aq.alpha.grad for k in act},
                    {f"{k}": their_grads[k][1].clone() for k in act},
                )
        rep.add("loss of each step", losses_ours, losses_theirs)
        rep.add_many(
            f"after {steps} steps: weights",
            {f"{k}": q.weight for k, q in enumerate(ours)},
            {f"{k}": t.weight for k, t in enumerate(their_layers)},
        )
        rep.add_many(
            f"after {steps} steps: activation ranges",
            {f"{k}": ours[k].aq.alpha for k in act},
            {f"{k}": their_layers[k].activation_range for k in act},
        )
        rep.add_many(
            f"after {steps} steps: quantized weights",
            {f"{k}": q.effective_weight() for k, q in enumerate(ours)},
            {f"{k}": t._quantize_weight(t.weight) for k, t in enumerate(their_layers)},
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
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    path0 = list(sys.path)
    try:
        reports.append(linear_suite(reference, steps=steps, data=data, batch=batch, overrides=linear_overrides))
    finally:
        sys.path[:] = path0
        torch.set_num_threads(threads)
    return reports


SUITES.register("haq")(haq_suite)
