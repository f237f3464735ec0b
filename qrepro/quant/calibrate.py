"""Uniform and affine fake-quantizers set from data: clipping by min/max, MSE (Lp) search or ACIQ, per tensor or
per output channel, for weights and for layer inputs (activation statistics gathered with the quantizers off).

``init_quantizers(model, calib, cfg, how)`` is the calibration shared by post-training quantization
(``qrepro.ptq``) and QAT methods that start from calibrated steps (``robust_qat``). ``cfg`` is any object with
the fields of :class:`Calibration` (``qrepro.ptq.PTQConfig`` has them).
"""

from __future__ import annotations

import contextlib
import functools
import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from qrepro.errors import QreproError
from qrepro.quant.aciq import aciq_alpha
from qrepro.quant.layers import quantized_layers
from qrepro.quant.levels import mse_alpha_candidates
from qrepro.quant.methods import FP_BITS
from qrepro.quant.quantizers import (
    AffineQuantizer,
    RangeQuantizer,
    TransformedQuantizer,
    UniformQuantizer,
    affine_qparams,
    fake_quant_affine,
)

LP_CANDIDATES = 100  # QDrop MSEObserver: 100 clipping candidates (× every zero point for two-sided data)


@dataclass
class Calibration:
    """The calibration options (the same names as in ``qrepro.ptq.PTQConfig``)."""

    distribution: str = "laplace"  # ACIQ prior: laplace | gaussian
    lp_norm: float = 2.4  # init=lp: the p of the Lp quantization error minimised
    act_calib_size: int = 256  # init=mse/lp with asymmetric quantizers: images the activation search sees
    batch_size: int | None = None  # calibration chunks (memory only)

    @property
    def chunk(self) -> int:
        return int(self.batch_size or 32)


# ---------------------------------------------------------------------------------------------- policy
def layer_bits(bits: int, role: str, first_last_bits: int | None) -> int:
    """Bits of a layer: first/last layers get max(bits, first_last_bits) unless full precision or None."""
    if bits == FP_BITS or first_last_bits is None or role == "middle":
        return bits
    return max(bits, first_last_bits)


def weight_quantizer_for(
    layer: nn.Module, bits: int, grid: str, granularity: str, learn_step: bool = False
) -> UniformQuantizer:
    """A signed uniform weight quantizer for ``layer``, per tensor or per output channel."""
    w = layer.weight
    ch = w.shape[0] if granularity == "channel" else None
    return UniformQuantizer(bits, signed=True, grid=grid, learn_step=learn_step, channels=ch, ndim=w.dim())


# ---------------------------------------------------------------------------------------------- helpers
_SWITCHABLE = (UniformQuantizer, RangeQuantizer, AffineQuantizer)
_AFFINE = (RangeQuantizer, AffineQuantizer)


def _fp_pass(q: nn.Module, calib: torch.Tensor, batch_size: int, names: Iterable[str], on_input: Callable) -> None:
    """Run ``q`` on ``calib`` with every quantizer disabled; ``on_input(name, x)`` sees each input x (detached) of
    the submodules ``names``."""
    hooks = [
        q.get_submodule(n).register_forward_pre_hook(lambda _m, args, n=n: on_input(n, args[0].detach())) for n in names
    ]
    switches = [m for m in q.modules() if isinstance(m, _SWITCHABLE)]  # disabled: full-precision pass-through
    for m in switches:
        m.enabled = False
    try:
        for x in calib.split(batch_size):
            q(x)
    finally:
        for h in hooks:
            h.remove()
        for m in switches:
            m.enabled = True


class _Stop(Exception):
    pass


@torch.no_grad()
def capture(model: nn.Module, module: nn.Module, calib: torch.Tensor, batch_size: int, what: str) -> torch.Tensor:
    """Input (``what="input"``) or output of ``module`` when ``model`` runs on ``calib`` (stops there)."""
    out: list[torch.Tensor] = []

    def pre(_m, args):
        if len(args) != 1 or not torch.is_tensor(args[0]):
            raise QreproError(f"PTQ reconstruction needs single-tensor module inputs ({type(_m).__name__})")
        out.append(args[0].detach())
        raise _Stop

    def post(_m, _args, y):
        out.append(y.detach())
        raise _Stop

    h = module.register_forward_pre_hook(pre) if what == "input" else module.register_forward_hook(post)
    try:
        for x in calib.split(batch_size):
            with contextlib.suppress(_Stop):
                model(x)
    finally:
        h.remove()
    if len(out) != -(-len(calib) // batch_size):
        raise QreproError(f"PTQ: module {type(module).__name__} is not called exactly once per forward")
    return torch.cat(out)


_MERGE = {"amax": torch.maximum, "amin": torch.minimum}  # how batches combine (every other statistic: +)


@torch.no_grad()
def _collect_act_stats(q: nn.Module, calib: torch.Tensor, batch_size: int) -> dict[str, SimpleNamespace]:
    """Statistics of every quantized layer's input on the calibration set (all quantizers disabled), in float64:
    extremes, sums of |x|, x², x⁺ and x⁺², element counts, and the sums over images of each image's min / max
    (CalibTIP's "measure")."""
    stats: dict[str, SimpleNamespace] = {}

    def add(name: str, x: torch.Tensor) -> None:
        x = x.double()
        pos, flat = x.clamp_min(0), x.flatten(1)
        new = dict(
            amax=x.max(),
            amin=x.min(),
            sum_abs=x.abs().sum(),
            sum_sq=x.square().sum(),
            sum_pos=pos.sum(),
            sum_pos_sq=pos.square().sum(),
            n=x.numel(),
            n_pos=(x > 0).sum(),
            sum_sample_min=flat.amin(1).sum(),
            sum_sample_max=flat.amax(1).sum(),
            n_samples=x.shape[0],
        )
        if name in stats:
            old = vars(stats[name])
            new = {k: _MERGE.get(k, operator.add)(old[k], v) for k, v in new.items()}
        stats[name] = SimpleNamespace(**new)

    _fp_pass(q, calib, batch_size, [name for name, layer in quantized_layers(q) if layer.aq is not None], add)
    return stats


def _act_alpha(s: SimpleNamespace, how: str, bits: int, dist: str, signed: bool) -> torch.Tensor:
    """Clipping value of a layer input from its statistics: the largest magnitude (of the positive values when
    unsigned) for ``minmax``, else ACIQ's, at most that."""
    if signed:
        n, s1, s2, amax = s.n, s.sum_abs, s.sum_sq, torch.maximum(s.amax, -s.amin)
    else:
        n, s1, s2, amax = s.n_pos.clamp_min(1), s.sum_pos, s.sum_pos_sq, s.amax
    if how == "minmax":
        return amax
    scale = s1 / n if dist == "laplace" else (s2 / n).sqrt()
    return torch.minimum(aciq_alpha(scale, bits, dist, signed), amax)


@torch.no_grad()
def _act_search(q: nn.Module, calib: torch.Tensor, batch_size: int, errors: dict[str, Callable]) -> dict[str, int]:
    """Per layer name: the index of the candidate with the least error summed over ``calib`` (the first on ties);
    ``errors[name](x)`` gives one float64 error per candidate for the layer input x (all quantizers off)."""
    totals: dict[str, torch.Tensor] = {}

    def add(name: str, x: torch.Tensor) -> None:
        e = errors[name](x)
        totals[name] = totals[name] + e if name in totals else e

    _fp_pass(q, calib, batch_size, errors, add)
    return {n: int(torch.argmin(t)) for n, t in totals.items()}


def _mse_errors(x: torch.Tensor, aq: UniformQuantizer, cands: torch.Tensor) -> torch.Tensor:
    return torch.stack([(aq.quantize_with_alpha(x, a) - x).double().square().sum() for a in cands])


def _aciq_weight_alpha(w: torch.Tensor, bits: int, dist: str, per_channel: bool, dtype: torch.dtype) -> torch.Tensor:
    """ACIQ clipping of a weight tensor (per tensor, or per output channel), at most max|W|."""
    dims, keep = tuple(range(1 if per_channel else 0, w.dim())), per_channel
    x = w.detach().double()
    scale = x.abs().mean(dims, keep) if dist == "laplace" else x.square().mean(dims, keep).sqrt()
    return torch.minimum(aciq_alpha(scale, bits, dist, True).to(dtype), w.detach().abs().amax(dims, keep))


def weight_alpha(wq: UniformQuantizer, w: torch.Tensor, how: str, dist: str) -> torch.Tensor:
    """Clipping value of a weight tensor (per tensor, or per output channel when ``wq`` has one step per
    channel): min–max (max|W|), MSE search over α/max ∈ [0.2, 1], or ACIQ."""
    w = w.detach()
    per_channel = wq.step.dim() > 0
    dims = tuple(range(1 if per_channel else 0, w.dim()))
    amax = w.abs().amax(dims, keepdim=per_channel)
    if how == "minmax":
        return amax
    if how == "aciq":
        return _aciq_weight_alpha(w, wq.bits, dist, per_channel, torch.float32)
    fracs = torch.linspace(0.2, 1.0, 80, device=w.device)
    if not per_channel:
        cands = amax * fracs
        errs = torch.stack([(wq.quantize_with_alpha(w, a) - w).square().sum() for a in cands])
        return cands[torch.argmin(errs)]
    errs = torch.stack([(wq.quantize_with_alpha(w, amax * f) - w).square().sum(dims) for f in fracs])  # (K, C)
    return amax * fracs[torch.argmin(errs, dim=0)].view_as(amax)


def _lp_candidates(xmin: torch.Tensor, xmax: torch.Tensor, bits: int, one_side: str) -> tuple[torch.Tensor, ...]:
    """Clipping candidates (lo, hi) of QDrop's ``MSEObserver`` in its search order, shape (K, *xmin.shape):
    one-sided data: [0, range·i/100] (or [−range·i/100, 0]), range = max(|min|, max), i = 1..100; two-sided:
    every (width range·i/100, integer zero point z = 0..2^b − 1) with lo = −z·Δ, hi = width − z·Δ, Δ =
    width/(2^b − 1), range = max − min."""
    n = LP_CANDIDATES
    i = torch.arange(1, n + 1, dtype=xmin.dtype, device=xmin.device).view(-1, *([1] * xmin.dim()))
    if one_side != "no":
        thres = torch.maximum(xmin.abs(), xmax) / n * i
        zero = torch.zeros_like(thres)
        return (zero, thres) if one_side == "pos" else (-thres, zero)
    qmax = 2**bits - 1
    width = ((xmax - xmin) / n * i).unsqueeze(1)  # (n, 1, ...)
    z = torch.arange(0, qmax + 1, dtype=xmin.dtype, device=xmin.device).view(1, -1, *([1] * xmin.dim()))
    lo = 0 - z * (width / qmax)
    return lo.flatten(0, 1), (width + lo).flatten(0, 1)


def _one_side(xmin: torch.Tensor, xmax: torch.Tensor) -> str:
    return "pos" if bool(xmin.min() >= 0) else "neg" if bool(xmax.max() <= 0) else "no"


@torch.no_grad()
def lp_weight_bounds(w: torch.Tensor, bits: int, per_channel: bool, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """QDrop's ``MSEObserver`` on a weight tensor: the candidate (lo, hi) minimising mean |Q(w) − w|^p, per
    output channel or per tensor (first minimum in search order)."""
    w = w.detach()
    flat = w.flatten(1) if per_channel else w.reshape(1, -1)
    xmin, xmax = flat.amin(1), flat.amax(1)
    one_side = _one_side(xmin, xmax)
    if per_channel:  # the reference clamps per channel only
        xmin, xmax = xmin.clamp(max=0), xmax.clamp(min=0)
    lo, hi = _lp_candidates(xmin, xmax, bits, one_side)  # (K, C)
    scores = []
    per = max(1, (1 << 22) // max(1, flat.numel()))
    qmax = float(2**bits - 1)
    for k in range(0, lo.shape[0], per):
        s, z = affine_qparams(lo[k : k + per], hi[k : k + per], bits)  # (k, C)
        s, z = s.unsqueeze(-1), z.unsqueeze(-1)
        # fake_quant_affine, in place: (clamp(round(w/s) + z, 0, q_max) − z)·s − w
        e = flat.unsqueeze(0) / s
        e.round_().add_(z).clamp_(0.0, qmax).sub_(z).mul_(s).sub_(flat)
        scores.append(e.abs_().pow_(p).mean(-1))
    best = torch.argmin(torch.cat(scores), dim=0)  # (C,)
    cols = torch.arange(lo.shape[1], device=w.device)
    lo_b, hi_b = lo[best, cols], hi[best, cols]
    shape = (-1,) + (1,) * (w.dim() - 1) if per_channel else ()
    return lo_b.reshape(shape), hi_b.reshape(shape)


def _lp_errors(step: torch.Tensor, zero: torch.Tensor, x: torch.Tensor, bits: int, p: float) -> torch.Tensor:
    return torch.stack([(fake_quant_affine(x, s, z, bits) - x).abs().pow(p).double().sum() for s, z in zip(step, zero)])


def _affine_weight_bounds(wq: nn.Module, w: torch.Tensor, how: str, cfg: Any) -> tuple[torch.Tensor, ...]:
    per_channel = (wq.range if isinstance(wq, RangeQuantizer) else wq.step).dim() > 0
    w = w.detach()
    if how in ("minmax", "mean_minmax"):  # CalibTIP measures weights by their min / max
        dims = tuple(range(1 if per_channel else 0, w.dim()))
        return w.amin(dims, keepdim=per_channel), w.amax(dims, keepdim=per_channel)
    if how == "aciq":
        a = _aciq_weight_alpha(w, wq.bits, cfg.distribution, per_channel, w.dtype)
        return -a, a
    return lp_weight_bounds(w, wq.bits, per_channel, 2.0 if how == "mse" else cfg.lp_norm)


def _affine_act_bounds(s: SimpleNamespace, bits: int, how: str, cfg: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi) of an asymmetric input quantizer from the calibration statistics (float64; the quantizer
    casts them to its own dtype)."""
    if how == "minmax":
        return s.amin, s.amax
    if how == "mean_minmax":  # CalibTIP's measure: mean over images of each image's min / max
        return s.sum_sample_min / s.n_samples, s.sum_sample_max / s.n_samples
    signed = bool(s.amin < 0)  # aciq
    a = _act_alpha(s, "aciq", bits, cfg.distribution, signed)
    return (-a if signed else torch.zeros_like(a)), a


@torch.no_grad()
def init_quantizers(q: nn.Module, calib: torch.Tensor, cfg: Any, how: str) -> None:
    """Set every weight and activation clipping value by ``how``: minmax | mse | aciq for the symmetric
    quantizers; also mean_minmax | lp for the asymmetric ones (mse = the Lp search with p = 2)."""
    stats = _collect_act_stats(q, calib, cfg.chunk)
    for name, layer in quantized_layers(q):
        wq, w = layer.wq, layer.weight
        if isinstance(wq, TransformedQuantizer):  # the quantizer sees the transformed weight
            wq, w = wq.quant, wq.transform(w)
        if isinstance(wq, UniformQuantizer):
            wq.set_alpha(weight_alpha(wq, w, how, cfg.distribution))
        elif isinstance(wq, _AFFINE):
            wq.set_bounds(*_affine_weight_bounds(wq, w, how, cfg))
        if isinstance(layer.aq, UniformQuantizer):
            layer.aq.set_signed(bool(stats[name].amin < 0))
    affine = {n: layer.aq for n, layer in quantized_layers(q) if isinstance(layer.aq, _AFFINE)}
    if affine and how in ("mse", "lp"):
        # QDrop's MSEObserver on a subset: the candidate (lo, hi) minimising the mean |Q(x) − x|^p (one-sided
        # inputs: 100 candidates; two-sided: 100 × 2^b)
        sub = calib[: min(len(calib), cfg.act_calib_size)]
        sub_stats, cands, errors = _collect_act_stats(q, sub, cfg.chunk), {}, {}
        for name, aq in affine.items():
            xmin, xmax = sub_stats[name].amin.to(sub.dtype), sub_stats[name].amax.to(sub.dtype)
            cands[name] = _lp_candidates(xmin, xmax, aq.bits, _one_side(xmin, xmax))
            p = 2.0 if how == "mse" else cfg.lp_norm
            errors[name] = functools.partial(_lp_errors, *affine_qparams(*cands[name], aq.bits), bits=aq.bits, p=p)
        for name, k in _act_search(q, sub, cfg.chunk, errors).items():
            affine[name].set_bounds(cands[name][0][k], cands[name][1][k])
    else:
        for name, aq in affine.items():
            aq.set_bounds(*_affine_act_bounds(stats[name], aq.bits, how, cfg))
    uniform = {n: layer.aq for n, layer in quantized_layers(q) if isinstance(layer.aq, UniformQuantizer)}
    if how == "mse" and uniform:
        cands = {n: mse_alpha_candidates(torch.maximum(stats[n].amax, -stats[n].amin).float()) for n in uniform}
        errors = {n: functools.partial(_mse_errors, aq=aq, cands=cands[n]) for n, aq in uniform.items()}
        for name, k in _act_search(q, calib, cfg.chunk, errors).items():
            uniform[name].set_alpha(cands[name][k])
        return
    for name, aq in uniform.items():
        aq.set_alpha(_act_alpha(stats[name], how, aq.bits, cfg.distribution, aq.signed).float())
