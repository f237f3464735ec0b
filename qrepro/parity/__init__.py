"""Parity harness: qrepro against the authors' own code, side by side, in float64.

``python -m qrepro.parity <suite> --reference DIR [--steps N]`` builds the authors' implementation (from a
checkout ``DIR`` of their repository) and qrepro's (through ``qrepro.api.build``, i.e. exactly as the trainer
builds it) from the same weights and the same CIFAR-10 images, runs a train-mode forward, backward and ``N``
optimizer steps in both, and prints the largest absolute and relative differences of outputs, gradients,
parameters and optimizer state, then PASS or FAIL against the stated tolerance (exit code 1 on FAIL).

This module holds what the suites share: the comparison table, importing the authors' modules without leaking
them into ``sys.modules``, a fixed batch of real CIFAR-10 images, both sides' input pipelines and qrepro's run.
One module per paper (``REFERENCE_REPOS``) registers into ``SUITES``. The authors' code is only imported, never
copied.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
import sys
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision import transforms

from qrepro.api import Run, build
from qrepro.data import Normalizer
from qrepro.data.cifar import load_cifar_tensors
from qrepro.errors import QreproError
from qrepro.registry import Registry, import_submodules

SUITES = Registry("parity suite")

# Where the authors' code and the CIFAR-10 images are when --reference / --data are not given.
REFERENCE_ENV = "QREPRO_REFERENCE"  # a folder holding one checkout per suite (REFERENCE_REPOS)
CIFAR_ENV = "QREPRO_CIFAR10"  # a CIFAR-10 root (torchvision folder, ImageFolder tree or .tar.gz of one)
#: the authors' repository each suite compares against, and its folder name under $QREPRO_REFERENCE
REFERENCE_REPOS = {
    "apot": ("yhhhli/APoT_Quantization", "apot"),
    "sat": ("deJQK/AdaBits", "sat"),
    "tr": ("cvlab-yonsei/TRS", "trs"),
    "reactnet": ("liuzechun/ReActNet", "reactnet"),
    "haq": ("mit-han-lab/haq", "haq"),
    "ewgs": ("cvlab-yonsei/EWGS", "ewgs"),
    "nagel": ("Qualcomm-AI-research/oscillations-qat", "oscillations-qat"),
}


def default_reference(suite: str) -> Path:
    """``$QREPRO_REFERENCE/<suite folder>``; a one-line error naming what is missing otherwise."""
    repo, folder = REFERENCE_REPOS.get(suite, (suite, suite))
    root = os.environ.get(REFERENCE_ENV)
    if not root:
        raise QreproError(
            f"parity {suite} compares against the authors' code: pass --reference <checkout of {repo}> "
            f"or set {REFERENCE_ENV}=<folder holding {folder}/>"
        )
    path = Path(root) / folder
    if not path.is_dir():
        raise QreproError(f"parity {suite}: {path} not found ({REFERENCE_ENV}={root}); add a checkout of {repo} there")
    return path


@dataclass
class Row:
    name: str
    max_abs: float
    max_rel: float
    numel: int
    tol: float

    @property
    def ok(self) -> bool:
        return math.isfinite(self.max_abs) and self.max_abs <= self.tol


@dataclass
class Report:
    """Rows of (quantity, max |ours - ref|, max relative difference); PASS iff every row is within its tolerance.

    The relative difference of a tensor is ``max|a - b| / max(max|b|, tiny)``: the difference measured against
    the tensor's own scale (elementwise relative errors are meaningless where the reference is ~0). A tolerance
    (``tol`` of the report or of a row) is a number or a function of the reference tensor (``relative_tol``).
    """

    title: str
    tol: float | Callable[[Any], float] = 1e-9
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, name: str, ours: Any, ref: Any, tol: float | Callable[[Any], float] | None = None) -> Row:
        tol = self.tol if tol is None else tol
        # dtype given here: torch.as_tensor(python float) alone would round to float32 first
        a = torch.as_tensor(ours, dtype=torch.float64).detach().to("cpu")
        b = torch.as_tensor(ref, dtype=torch.float64).detach().to("cpu")
        if a.shape != b.shape:
            if a.numel() == b.numel():
                a = a.reshape(b.shape)
            else:
                raise QreproError(f"parity: {name}: shapes differ, ours {tuple(a.shape)} vs reference {tuple(b.shape)}")
        if a.numel() == 0:
            d, scale = 0.0, 0.0
        else:
            diff = (a - b).abs()
            d = float(diff.max()) if not torch.isnan(diff).any() else math.inf
            scale = float(b.abs().max())
        row = Row(name, d, d / max(scale, 1e-300) if d else 0.0, a.numel(), tol(ref) if callable(tol) else tol)
        self.rows.append(row)
        return row

    def add_many(
        self, prefix: str, ours: dict[str, Any], ref: dict[str, Any], tol: float | Callable[[Any], float] | None = None
    ) -> None:
        """One row for two dicts with the same keys: the worst item, i.e. the largest difference (relative to each
        item's tolerance when ``tol`` is a function of the reference tensor), one out of tolerance first."""
        same_names(f"parity: {prefix}: keys present on one side only", ours, ref)
        if not ours:
            return
        tol = self.tol if tol is None else tol
        rows = {k: self.add(k, ours[k], ref[k], tol) for k in ours}
        del self.rows[-len(rows) :]
        size = (lambda r: r.max_abs / r.tol) if callable(tol) else (lambda r: r.max_abs)
        k = max(rows, key=lambda k: (not rows[k].ok, size(rows[k])))
        w = rows[k]
        n = sum(r.numel for r in rows.values())
        self.rows.append(Row(f"{prefix} (all {len(rows)}; worst {k})", w.max_abs, w.max_rel, n, w.tol))

    @property
    def ok(self) -> bool:
        return bool(self.rows) and all(r.ok for r in self.rows)

    def render(self) -> str:
        w = max([len(r.name) for r in self.rows] + [8])
        lines = [self.title, f"{'quantity':<{w}}  {'max abs diff':>12}  {'max rel diff':>12}  {'tolerance':>9}  ok"]
        for r in self.rows:
            lines.append(
                f"{r.name:<{w}}  {r.max_abs:12.3e}  {r.max_rel:12.3e}  {r.tol:9.1e}  {'yes' if r.ok else 'NO'}"
            )
        lines += self.notes
        lines.append(
            ("PASS" if self.ok else "FAIL") + f": {sum(r.ok for r in self.rows)}/{len(self.rows)} within tolerance"
        )
        return "\n".join(lines)


@contextlib.contextmanager
def reference_import(root: Path, stubs: dict[str, types.ModuleType] | None = None) -> Iterator[Callable[[str], Any]]:
    """Import modules of the authors' code from ``root`` (put first on ``sys.path``) with optional stand-in
    modules (e.g. SAT's global ``utils.config``), and remove every module imported from there afterwards, so
    two references with a package of the same name (``models``) can be used in one process."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise QreproError(f"--reference {root} is not a directory; pass a checkout of the authors' repository")
    before = set(sys.modules)
    saved = {k: sys.modules[k] for k in (stubs or {}) if k in sys.modules}
    sys.path.insert(0, str(root))
    for k, m in (stubs or {}).items():
        sys.modules[k] = m
    try:
        yield importlib.import_module
    finally:
        sys.path.remove(str(root))
        for k in set(sys.modules) - before:
            if _imported_from(sys.modules[k], root):  # not e.g. torch internals imported lazily meanwhile
                del sys.modules[k]
        for k in stubs or {}:
            sys.modules.pop(k, None)
        sys.modules.update(saved)


def _imported_from(module: Any, root: Path) -> bool:
    """True if ``module`` (a module or a namespace package) was loaded from a file or folder under ``root``."""
    paths = [getattr(module, "__file__", None), *(getattr(module, "__path__", None) or [])]
    return any(p and Path(p).resolve().is_relative_to(root) for p in paths)


def cifar_batches(
    root: Path | str | None, n: int, batch: int, seed: int = 0, split: str = "train"
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` batches of ``batch`` real CIFAR-10 images (uint8 NCHW, labels), drawn at random with ``seed``."""
    root = root or os.environ.get(CIFAR_ENV)
    if not root:
        raise QreproError(f"parity needs CIFAR-10 images: pass --data <CIFAR-10 root> or set {CIFAR_ENV}")
    if not Path(root).exists():
        raise QreproError(f"parity needs CIFAR-10 images: {root} does not exist; pass --data <CIFAR-10 root>")
    x, y = load_cifar_tensors(str(root), 10)[split]
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(y), generator=g)[: n * batch]
    return [(x[idx[i * batch : (i + 1) * batch]], y[idx[i * batch : (i + 1) * batch]]) for i in range(n)]


def normalize(x: torch.Tensor, mean: Any, std: Any, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """uint8 NCHW -> (x/255 - mean)/std in ``dtype``."""
    m = torch.tensor(mean, dtype=dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=dtype).view(1, -1, 1, 1)
    return (x.to(dtype) / 255.0 - m) / s


def our_run(overrides: list[str], steps_per_epoch: int, num_classes: int = 10) -> Run:
    """``qrepro.api.build(overrides)`` in float64 without the dataset (the suite feeds its own batches);
    ``steps_per_epoch`` sizes the schedule."""
    return build(
        overrides, dtype=torch.float64, load_data=False, num_classes=num_classes, steps_per_epoch=steps_per_epoch
    )


def our_inputs(run: Any, x: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW -> float64 through qrepro's ``Normalizer`` with the built run's dataset mean/std."""
    d = run.cfg.dataset
    return Normalizer(list(d.mean), list(d.std), bool(d.get("raw255", False)))(x).double()


def their_inputs(x: torch.Tensor, mean: Any, std: Any) -> torch.Tensor:
    """uint8 NCHW -> float64 through the authors' torchvision pipeline: ``ToTensor`` + ``Normalize`` (float32)."""
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])
    return torch.stack([tf(img.permute(1, 2, 0).numpy()) for img in x]).double()


def require_files(suite: str, folder: Path, files: tuple[str, ...], repo: str) -> None:
    """A one-line error unless every one of ``files`` is in ``folder`` (a checkout of the authors' ``repo``)."""
    if not all((folder / f).is_file() for f in files):
        raise QreproError(f"parity {suite}: {folder} lacks {', '.join(files)}; pass a checkout of {repo}")


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch on one CPU thread, restored afterwards: the same arithmetic on any machine, and no spinning on a
    shared CPU (two OpenMP threads made a float64 ResNet-20 step up to 10x slower on a loaded 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def relative_tol(ref: Any, tol: float = 1e-9) -> float:
    """``tol`` absolute, times the reference tensor's largest magnitude where that exceeds 1: float64 round-off
    grows with the values' scale (BN running variances of raw 0..255 inputs are ~1e4, FP logits ~1e3)."""
    r = torch.as_tensor(ref).detach()
    return tol * max(1.0, float(r.abs().max())) if r.numel() else tol


def same_names(message: str, ours: Any, ref: Any) -> None:
    """``QreproError(message: the names on one side only)`` unless the two collections hold the same names."""
    if set(ours) != set(ref):
        raise QreproError(f"{message}: {sorted(set(ours) ^ set(ref))[:8]}")


def add_grouped(
    rep: Report,
    prefix: str,
    ours: dict[str, Any],
    ref: dict[str, Any],
    *,
    kind: Callable[[str], str],
    suite: str,
    order: tuple[str, ...] = (),
) -> None:
    """One ``add_many`` row per ``kind(name)`` of the tensors (in the reference's order, or in ``order``)."""
    same_names(f"parity {suite}: {prefix}: names differ", ours, ref)
    kinds: dict[str, list[str]] = {}
    for k in ref:
        kinds.setdefault(kind(k), []).append(k)
    for name in sorted(kinds, key=order.index) if order else kinds:
        rep.add_many(f"{prefix} {name}", {k: ours[k] for k in kinds[name]}, {k: ref[k] for k in kinds[name]})


def copy_state(
    suite: str, ours: nn.Module, theirs: nn.Module, rename: Callable[[str], str], skip: Callable[[str], bool]
) -> None:
    """The authors' tensors into ours by (renamed) name; every tensor of ours but the ``skip``ped needs one."""
    t_sd, o_sd = {rename(k): v for k, v in theirs.state_dict().items()}, ours.state_dict()
    missing = [k for k in o_sd if k not in t_sd and not skip(k)]
    if missing:
        raise QreproError(f"parity {suite}: qrepro tensors without a counterpart in the authors' model: {missing[:8]}")
    with torch.no_grad():
        for k in o_sd:
            if k in t_sd and not skip(k):
                o_sd[k].copy_(t_sd[k])


def running_stats(model: nn.Module, rename: Callable[[str], str] | None = None) -> dict[str, torch.Tensor]:
    """Copies of the BatchNorm running statistics and batch counts, by name (``rename``: to qrepro's names)."""
    return {
        (rename(n) if rename else n): b.detach().clone()
        for n, b in model.named_buffers()
        if "running" in n or "num_batches" in n
    }


def param_state(state: Any, params: dict[str, Any], key: str) -> dict[str, Any]:
    """``state[p][key]`` of each named parameter ``p`` (an optimizer's state: momentum buffers, Adam's moments)."""
    return {n: state[p][key] for n, p in params.items()}


def group_values(opt: torch.optim.Optimizer, params: dict[str, Any], key: str) -> dict[str, torch.Tensor]:
    """``key`` (``lr``, ``weight_decay``, ...; 0 where unset) of the group holding each named parameter, float64."""
    owner = {id(p): g for g in opt.param_groups for p in g["params"]}
    return {n: torch.tensor(float(owner[id(p)].get(key, 0.0)), dtype=torch.float64) for n, p in params.items()}


def largest_change(now: dict[str, torch.Tensor], start: dict[str, torch.Tensor]) -> float:
    """max over the tensors of max |now - start| (how far the compared steps moved the parameters)."""
    return max(float((now[k].detach() - start[k]).abs().max()) for k in now)


def cell_suite(
    name: str,
    compare: Callable[..., Report],
    *,
    need: tuple[str, ...],
    need_in: str = "",
    repo: str,
    grid: tuple[Any, ...],
    quick_grid: tuple[Any, ...],
    default_batch: int,
    extra_batches: int = 0,
) -> Callable[..., list[Report]]:
    """Register suite ``name``: one report ``compare(reference, cell, batches, steps=, overrides=, **kw)`` per cell
    (``grid``; ``quick``: ``quick_grid``; or the ``cells`` asked for) on ``steps + extra_batches`` batches of
    CIFAR-10 (seed 0), once the checkout's folder ``need_in`` is found to hold the files ``need`` (of the authors'
    ``repo``)."""

    def suite(
        reference: Path | str,
        *,
        steps: int = 20,
        data: Any = None,
        quick: bool = False,
        batch: int = default_batch,
        cells: tuple[Any, ...] | None = None,
        overrides: list[str] | None = None,
        **kw: Any,
    ) -> list[Report]:
        reference = Path(reference)
        require_files(name, reference / need_in, need, repo)
        chosen = tuple(cells) if cells else (quick_grid if quick else grid)
        batches = cifar_batches(data, steps + extra_batches, batch, seed=0)
        with one_thread():
            return [compare(reference, c, batches, steps=steps, overrides=list(overrides or []), **kw) for c in chosen]

    return SUITES.register(name)(suite)


def run_suite(name: str, reference: Path | str | None, **kw: Any) -> list[Report]:
    import_submodules(__name__, __path__)
    suite = SUITES.get(name)
    ref = Path(reference) if reference else default_reference(name)
    return suite(ref, **kw)
