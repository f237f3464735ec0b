"""Uniform and affine fake-quantizers set from data: clipping by min/max, MSE (Lp) search or ACIQ, per tensor or
per output channel, for weights and for layer inputs (activation statistics gathered with the quantizers off).

``init_quantizers(model, calib, cfg, how)`` is the calibration shared by post-training quantization
(``qrepro.ptq``) and QAT methods that start from calibrated steps (``robust_qat``). ``cfg`` is any object with
the fields of :class:`Calibration` (``qrepro.ptq.PTQConfig`` has them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from qrepro.errors import QreproError
from qrepro.quant.aciq import aciq_alpha, fit_scale
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
def _batches(n: int, batch_size: int) -> Iterator[slice]:
    for i in range(0, n, batch_size):
        yield slice(i, min(n, i + batch_size))


_SWITCHABLE = (UniformQuantizer, RangeQuantizer, AffineQuantizer)
_AFFINE = (RangeQuantizer, AffineQuantizer)


def _quantizers(model: nn.Module) -> Iterator[nn.Module]:
    for m in model.modules():
        if isinstance(m, _SWITCHABLE):
            yield m


def set_quantization(model: nn.Module, enabled: bool) -> None:
    """Enable / disable every uniform / asymmetric quantizer (disabled = full-precision pass-through)."""
    for q in _quantizers(model):
        q.enabled = enabled


def _fp_pass(q: nn.Module, calib: torch.Tensor, batch_size: int, pre_hooks: dict[nn.Module, Callable]) -> None:
    """Run ``q`` on ``calib`` with every quantizer disabled and ``pre_hooks`` on their modules (removed after)."""
    hooks = [m.register_forward_pre_hook(fn) for m, fn in pre_hooks.items()]
    set_quantization(q, False)
    try:
        for sl in _batches(len(calib), batch_size):
            q(calib[sl])
    finally:
        for h in hooks:
            h.remove()
        set_quantization(q, True)


class _Stop(Exception):
    pass


@torch.no_grad()
def capture(model: nn.Module, module: nn.Module, calib: torch.Tensor, batch_size: int, what: str) -> torch.Tensor:
    """Input (``what="input"``) or output of ``module`` when ``model`` runs on ``calib`` (stops there)."""
    out: list[torch.Tensor] = []

    def pre(_m, args):
        if what == "input":
            if len(args) != 1 or not torch.is_tensor(args[0]):
                raise QreproError(f"PTQ reconstruction needs single-tensor module inputs ({type(_m).__name__})")
            out.append(args[0].detach())
            raise _Stop

    def post(_m, _args, y):
        out.append(y.detach())
        raise _Stop

    h = module.register_forward_pre_hook(pre) if what == "input" else module.register_forward_hook(post)
    try:
        for sl in _batches(len(calib), batch_size):
            try:
                model(calib[sl])
            except _Stop:
                pass
    finally:
        h.remove()
    if len(out) != -(-len(calib) // batch_size):
        raise QreproError(f"PTQ: module {type(module).__name__} is not called exactly once per forward")
    return torch.cat(out)


@dataclass
class _ActStats:
    amax: torch.Tensor
    amin: torch.Tensor
    sum_abs: torch.Tensor
    sum_sq: torch.Tensor
    sum_pos: torch.Tensor
    sum_pos_sq: torch.Tensor
    n: int
    n_pos: torch.Tensor
    sum_sample_min: torch.Tensor  # Σ over images of each image's minimum (CalibTIP's "measure")
    sum_sample_max: torch.Tensor
    n_samples: int


@torch.no_grad()
def _collect_act_stats(q: nn.Module, calib: torch.Tensor, batch_size: int) -> dict[str, _ActStats]:
    """Statistics of every quantized layer's input on the calibration set (all quantizers disabled)."""
    stats: dict[str, _ActStats] = {}

    def make(name: str) -> Callable:
        def pre(_m, args):
            x = args[0].detach().double()
            pos = x.clamp_min(0)
            flat = x.flatten(1)
            upd = dict(
                amax=x.max(),
                amin=x.min(),
                sum_abs=x.abs().sum(),
                sum_sq=x.square().sum(),
                sum_pos=pos.sum(),
                sum_pos_sq=pos.square().sum(),
                n_pos=(x > 0).sum(),
                sum_sample_min=flat.amin(1).sum(),
                sum_sample_max=flat.amax(1).sum(),
            )
            s = stats.get(name)
            if s is None:
                stats[name] = _ActStats(n=x.numel(), n_samples=x.shape[0], **upd)
            else:
                s.amax, s.amin = torch.maximum(s.amax, upd["amax"]), torch.minimum(s.amin, upd["amin"])
                for k in ("sum_abs", "sum_sq", "sum_pos", "sum_pos_sq", "n_pos", "sum_sample_min", "sum_sample_max"):
                    setattr(s, k, getattr(s, k) + upd[k])
                s.n += x.numel()
                s.n_samples += x.shape[0]

        return pre

    _fp_pass(q, calib, batch_size, {layer: make(name) for name, layer in quantized_layers(q) if layer.aq is not None})
    return stats


def _aciq_act_alpha(s: _ActStats, bits: int, dist: str, signed: bool) -> torch.Tensor:
    if signed:
        scale = s.sum_abs / s.n if dist == "laplace" else (s.sum_sq / s.n).sqrt()
        return torch.minimum(aciq_alpha(scale, bits, dist, True), torch.maximum(s.amax, -s.amin))
    n = s.n_pos.clamp_min(1)
    scale = s.sum_pos / n if dist == "laplace" else (s.sum_pos_sq / n).sqrt()
    return torch.minimum(aciq_alpha(scale, bits, dist, False), s.amax)


@torch.no_grad()
def _mse_act_alphas(q: nn.Module, calib: torch.Tensor, batch_size: int, amax: dict[str, torch.Tensor]) -> dict:
    """Per layer input: α among mse_alpha_candidates(amax) minimising Σ‖Q_α(x) − x‖² on ``calib``."""
    layers = {n: l for n, l in quantized_layers(q) if isinstance(l.aq, UniformQuantizer)}
    cands = {n: mse_alpha_candidates(amax[n].float()) for n in layers}
    errs = {n: torch.zeros(len(c), dtype=torch.float64, device=c.device) for n, c in cands.items()}

    def make(name: str, aq: UniformQuantizer) -> Callable:
        def pre(_m, args):
            x = args[0].detach()
            for k, a in enumerate(cands[name]):
                errs[name][k] += (aq.quantize_with_alpha(x, a) - x).double().square().sum()

        return pre

    _fp_pass(q, calib, batch_size, {l: make(n, l.aq) for n, l in layers.items()})
    return {n: cands[n][int(torch.argmin(errs[n]))] for n in layers}


def weight_alpha(wq: UniformQuantizer, w: torch.Tensor, how: str, dist: str) -> torch.Tensor:
    """Clipping value of a weight tensor (per tensor, or per output channel when ``wq`` has one step per
    channel): min–max (max|W|), MSE search over α/max ∈ [0.2, 1], or ACIQ."""
    w = w.detach()
    per_channel = wq.step.dim() > 0
    dims = tuple(range(1, w.dim()))
    amax = w.abs().amax(dim=dims, keepdim=True) if per_channel else w.abs().max()
    if how == "minmax":
        return amax
    if how == "aciq":
        if per_channel:
            x = w.double()
            scale = (
                x.abs().mean(dims, keepdim=True) if dist == "laplace" else x.square().mean(dims, keepdim=True).sqrt()
            )
        else:
            scale = fit_scale(w, dist, True)
        return torch.minimum(aciq_alpha(scale, wq.bits, dist, True).float(), amax)
    fracs = torch.linspace(0.2, 1.0, 80, device=w.device)
    if not per_channel:
        cands = amax * fracs
        errs = torch.stack([(wq.quantize_with_alpha(w, a) - w).square().sum() for a in cands])
        return cands[torch.argmin(errs)]
    errs = torch.stack([(wq.quantize_with_alpha(w, amax * f) - w).square().sum(dims) for f in fracs])  # (K, C)
    return amax * fracs[torch.argmin(errs, dim=0)].view_as(amax)


def weight_quantizer(layer: nn.Module) -> tuple[nn.Module, torch.Tensor] | None:
    """The layer's uniform / asymmetric weight quantizer and the tensor it quantizes (after a weight
    transform)."""
    wq = layer.wq
    if isinstance(wq, _SWITCHABLE):
        return wq, layer.weight
    if isinstance(wq, TransformedQuantizer):
        return wq.quant, wq.transform(layer.weight)
    return None


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
    width = (xmax - xmin) / n * i  # (n, ...)
    delta = (width - 0) / qmax
    z = torch.arange(0, qmax + 1, dtype=xmin.dtype, device=xmin.device).view(1, -1, *([1] * xmin.dim()))
    lo = 0 - z * delta.unsqueeze(1)
    hi = width.unsqueeze(1) - z * delta.unsqueeze(1)
    return lo.flatten(0, 1), hi.flatten(0, 1)


def _one_side(xmin: torch.Tensor, xmax: torch.Tensor) -> str:
    return "pos" if bool(xmin.min() >= 0) else "neg" if bool(xmax.max() <= 0) else "no"


@torch.no_grad()
def lp_weight_bounds(w: torch.Tensor, bits: int, per_channel: bool, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """QDrop's ``MSEObserver`` on a weight tensor: the candidate (lo, hi) minimising mean |Q(w) − w|^p, per
    output channel or per tensor (first minimum in search order)."""
    w = w.detach()
    if per_channel:
        flat = w.flatten(1)
        xmin, xmax = flat.amin(1), flat.amax(1)
        one_side = _one_side(xmin, xmax)
        xmin, xmax = xmin.clamp(max=0), xmax.clamp(min=0)  # the reference clamps per channel only
    else:
        flat = w.reshape(1, -1)
        xmin, xmax = w.min().reshape(1), w.max().reshape(1)
        one_side = _one_side(xmin, xmax)
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


@torch.no_grad()
def _lp_act_bounds(
    q: nn.Module, calib: torch.Tensor, cfg: Any, names: list[str], p: float
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """QDrop's ``MSEObserver`` on every listed layer input over ``calib`` (all quantizers off): the candidate
    (lo, hi) minimising the mean |Q(x) − x|^p (one-sided inputs: 100 candidates; two-sided: 100 × 2^b)."""
    stats = _collect_act_stats(q, calib, cfg.chunk)
    layers = {n: q.get_submodule(n) for n in names}
    cands, errs = {}, {}
    for n in names:
        st, bits = stats[n], layers[n].aq.bits
        xmin, xmax = st.amin.to(calib.dtype), st.amax.to(calib.dtype)
        lo, hi = _lp_candidates(xmin, xmax, bits, _one_side(xmin, xmax))
        cands[n] = (lo, hi, *affine_qparams(lo, hi, bits))
        errs[n] = torch.zeros(len(lo), dtype=torch.float64, device=lo.device)

    def make(name: str) -> Callable:
        def pre(_m, args):
            x = args[0].detach()
            _, _, st, zp = cands[name]
            bits = layers[name].aq.bits
            for k in range(len(st)):
                errs[name][k] += (fake_quant_affine(x, st[k], zp[k], bits) - x).abs().pow(p).double().sum()

        return pre

    _fp_pass(q, calib, cfg.chunk, {layers[n]: make(n) for n in names})
    out = {}
    for n in names:
        k = int(torch.argmin(errs[n]))
        out[n] = (cands[n][0][k], cands[n][1][k])
    return out


def _aciq_weight_alpha(w: torch.Tensor, bits: int, dist: str, per_channel: bool) -> torch.Tensor:
    w = w.detach()
    if per_channel:
        dims = tuple(range(1, w.dim()))
        x = w.double()
        scale = x.abs().mean(dims, keepdim=True) if dist == "laplace" else x.square().mean(dims, keepdim=True).sqrt()
        amax = w.abs().amax(dim=dims, keepdim=True)
    else:
        scale, amax = fit_scale(w, dist, True), w.abs().max()
    return torch.minimum(aciq_alpha(scale, bits, dist, True).to(w.dtype), amax)


def _affine_weight_bounds(wq: nn.Module, w: torch.Tensor, how: str, cfg: Any) -> tuple[torch.Tensor, ...]:
    per_channel = (wq.range if isinstance(wq, RangeQuantizer) else wq.step).dim() > 0
    w = w.detach()
    if how in ("minmax", "mean_minmax"):  # CalibTIP measures weights by their min / max
        if per_channel:
            flat = w.flatten(1)
            shape = (-1,) + (1,) * (w.dim() - 1)
            return flat.amin(1).reshape(shape), flat.amax(1).reshape(shape)
        return w.min(), w.max()
    if how == "aciq":
        a = _aciq_weight_alpha(w, wq.bits, cfg.distribution, per_channel)
        return -a, a
    return lp_weight_bounds(w, wq.bits, per_channel, 2.0 if how == "mse" else cfg.lp_norm)


def _affine_act_bounds(s: _ActStats, bits: int, how: str, cfg: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi) of an asymmetric input quantizer from the calibration statistics (float64; the quantizer
    casts them to its own dtype)."""
    if how == "minmax":
        return s.amin, s.amax
    if how == "mean_minmax":  # CalibTIP's measure: mean over images of each image's min / max
        return s.sum_sample_min / s.n_samples, s.sum_sample_max / s.n_samples
    signed = bool(s.amin < 0)  # aciq
    a = _aciq_act_alpha(s, bits, cfg.distribution, signed)
    return (-a if signed else torch.zeros_like(a)), a


@torch.no_grad()
def init_quantizers(q: nn.Module, calib: torch.Tensor, cfg: Any, how: str) -> None:
    """Set every weight and activation clipping value by ``how``: minmax | mse | aciq for the symmetric
    quantizers; also mean_minmax | lp for the asymmetric ones (mse = the Lp search with p = 2)."""
    stats = _collect_act_stats(q, calib, cfg.chunk)
    affine_acts: list[str] = []
    for name, layer in quantized_layers(q):
        parts = weight_quantizer(layer)
        if parts is not None:
            wq, w = parts
            if isinstance(wq, UniformQuantizer):
                wq.set_alpha(weight_alpha(wq, w, how, cfg.distribution))
            else:
                wq.set_bounds(*_affine_weight_bounds(wq, w, how, cfg))
        if isinstance(layer.aq, UniformQuantizer):
            s = stats[name]
            layer.aq.set_signed(bool(s.amin < 0))
        elif isinstance(layer.aq, _AFFINE):
            affine_acts.append(name)
    if affine_acts:
        if how in ("mse", "lp"):
            sub = calib[: min(len(calib), cfg.act_calib_size)]
            p = 2.0 if how == "mse" else cfg.lp_norm
            for name, (lo, hi) in _lp_act_bounds(q, sub, cfg, affine_acts, p).items():
                q.get_submodule(name).aq.set_bounds(lo, hi)
        else:
            for name in affine_acts:
                aq = q.get_submodule(name).aq
                aq.set_bounds(*_affine_act_bounds(stats[name], aq.bits, how, cfg))
    uniform_acts = {n: s for n, s in stats.items() if isinstance(q.get_submodule(n).aq, UniformQuantizer)}
    if not uniform_acts:
        return
    if how == "mse":
        amax = {n: torch.maximum(s.amax, -s.amin) for n, s in uniform_acts.items()}
        for name, alpha in _mse_act_alphas(q, calib, cfg.chunk, amax).items():
            q.get_submodule(name).aq.set_alpha(alpha)
        return
    for name, s in uniform_acts.items():
        aq = q.get_submodule(name).aq
        if how == "minmax":
            alpha = torch.maximum(s.amax, -s.amin) if aq.signed else s.amax
        else:
            alpha = _aciq_act_alpha(s, aq.bits, cfg.distribution, aq.signed)
        aq.set_alpha(alpha.float())
