"""Post-training quantization of a full-precision model (library code; the Hydra entry is __main__.py).

``quantize_model(fp_model, calib, PTQConfig(...))`` returns a quantized *copy* of ``fp_model`` (which is
left untouched) built with the framework's own QConv2d/QLinear layers:

1. the PTQ policy (a :class:`qrepro.quant.Method`) gives every conv/linear a weight quantizer at ``w_bits``
   and an input quantizer at ``a_bits`` (first/last layers at ``first_last_bits``; the network input is not
   quantized unless ``quantize_first_input``);
2. activation statistics are collected on the calibration set (quantizers disabled);
3. the registered algorithm (``PTQ_ALGORITHMS``) sets / optimises the quantizers:
   ``minmax``, ``mse``, ``aciq`` (closed-form clipping), ``adaquant`` (per-layer output-MSE optimisation of
   weights, biases and steps), ``qdrop`` (block reconstruction, AdaRound weights, learned activation steps,
   activation quantization dropped with probability p), ``pot`` and ``kmeans`` (non-uniform weights).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qrepro.errors import QreproError
from qrepro.ptq.aciq import DISTRIBUTIONS, aciq_alpha, fit_scale
from qrepro.ptq.levels import best_pot_levels, kmeans_levels, mse_alpha_candidates
from qrepro.ptq.quantizers import (
    GRIDS,
    AdaRoundWeight,
    LevelQuantizer,
    TransformedQuantizer,
    UniformQuantizer,
)
from qrepro.quant.layers import QUANT_LAYERS, quantized_layers
from qrepro.quant.methods import FP_BITS, LayerInfo, Method
from qrepro.quant.prepare import prepare
from qrepro.registry import Registry

PTQ_ALGORITHMS = Registry("ptq algorithm", config_group="ptq.algorithm")


@dataclass
class PTQConfig:
    """Options of one PTQ run (keys of the ``ptq`` config block, minus the bit list)."""

    algorithm: str = "aciq"
    w_bits: int = 4
    a_bits: int = 32
    first_last_bits: int | None = 8  # None: first/last layers at the network bit-widths
    quantize_first_input: bool = False
    weight_grid: str = "midrise"
    weight_granularity: str = "tensor"  # tensor | channel (one weight step per output channel)
    act_grid: str = "int"
    distribution: str = "laplace"  # ACIQ prior: laplace | gaussian
    init: str = "mse"  # initial clipping for adaquant / qdrop: minmax | mse | aciq
    iters: int | None = None  # None: the algorithm's default (adaquant 100, qdrop 20000)
    batch_size: int = 32
    lr_weight: float = 1e-5  # AdaQuant
    lr_bias: float = 1e-3  # AdaQuant
    lr_step: float = 1e-3  # AdaQuant (weight and activation steps)
    lr_round: float = 1e-3  # QDrop: AdaRound V
    lr_act_step: float = 4e-5  # QDrop: activation steps
    drop_prob: float = 0.5  # QDrop
    round_weight: float = 0.01  # QDrop: λ of the AdaRound regulariser
    round_warmup: float = 0.2  # QDrop: fraction of iterations without the regulariser
    round_beta: tuple[float, float] = (20.0, 2.0)  # QDrop: β annealed linearly from first to second
    kmeans_iters: int = 50
    weight_step_scale: float = 1.0  # Fig. 5A: evaluate with Δ = scale · Δ' after PTQ
    seed: int = 0

    def check(self) -> None:
        PTQ_ALGORITHMS.get(self.algorithm)
        for what, b in (("w_bits", self.w_bits), ("a_bits", self.a_bits)):
            if b != FP_BITS and not 1 <= b <= 16:
                raise QreproError(f"ptq {what}={b} out of range; use 1..16 or 32 (full precision)")
        if self.weight_grid not in GRIDS or self.act_grid not in GRIDS:
            raise QreproError(f"ptq grids must be one of {', '.join(GRIDS)}")
        if self.weight_granularity not in ("tensor", "channel"):
            raise QreproError(f"ptq.weight_granularity={self.weight_granularity!r}; choose tensor or channel")
        if self.distribution not in DISTRIBUTIONS:
            raise QreproError(f"ptq.distribution must be one of {', '.join(DISTRIBUTIONS)}")
        if self.init not in ("minmax", "mse", "aciq"):
            raise QreproError(f"ptq.init={self.init!r}; choose minmax, mse or aciq")
        if not 0.0 <= self.drop_prob < 1.0:
            raise QreproError(f"ptq.drop_prob must be in [0, 1), got {self.drop_prob}")
        if not self.weight_step_scale > 0:
            raise QreproError("ptq.weight_step_scale must be > 0")


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


def ptq_method(cfg: PTQConfig) -> Method:
    """The PTQ layer policy as a framework Method (uniform quantizers; algorithms may replace ``wq``)."""

    def quantize_layer(info: LayerInfo):
        wb = layer_bits(cfg.w_bits, info.role, cfg.first_last_bits)
        ab = layer_bits(cfg.a_bits, info.role, cfg.first_last_bits)
        wq = weight_quantizer_for(info.module, wb, cfg.weight_grid, cfg.weight_granularity) if wb != FP_BITS else None
        quant_input = ab != FP_BITS and (info.role != "first" or cfg.quantize_first_input)
        aq = UniformQuantizer(ab, signed=False, grid=cfg.act_grid) if quant_input else None
        return (wq, aq) if (wq is not None or aq is not None) else None

    return Method(name=f"ptq_{cfg.algorithm}", quantize_layer=quantize_layer, w_bits=cfg.w_bits, a_bits=cfg.a_bits)


# ---------------------------------------------------------------------------------------------- helpers
def _batches(n: int, batch_size: int) -> Iterator[slice]:
    for i in range(0, n, batch_size):
        yield slice(i, min(n, i + batch_size))


def _quantizers(model: nn.Module) -> Iterator[UniformQuantizer]:
    for m in model.modules():
        if isinstance(m, UniformQuantizer):
            yield m


def set_quantization(model: nn.Module, enabled: bool) -> None:
    """Enable / disable every uniform quantizer (disabled = full-precision pass-through)."""
    for q in _quantizers(model):
        q.enabled = enabled


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


@torch.no_grad()
def _collect_act_stats(q: nn.Module, calib: torch.Tensor, batch_size: int) -> dict[str, _ActStats]:
    """Statistics of every quantized layer's input on the calibration set (all quantizers disabled)."""
    stats: dict[str, _ActStats] = {}
    hooks = []

    def make(name: str) -> Callable:
        def pre(_m, args):
            x = args[0].detach().double()
            pos = x.clamp_min(0)
            upd = dict(
                amax=x.max(),
                amin=x.min(),
                sum_abs=x.abs().sum(),
                sum_sq=x.square().sum(),
                sum_pos=pos.sum(),
                sum_pos_sq=pos.square().sum(),
                n_pos=(x > 0).sum(),
            )
            s = stats.get(name)
            if s is None:
                stats[name] = _ActStats(n=x.numel(), **upd)
            else:
                s.amax, s.amin = torch.maximum(s.amax, upd["amax"]), torch.minimum(s.amin, upd["amin"])
                for k in ("sum_abs", "sum_sq", "sum_pos", "sum_pos_sq", "n_pos"):
                    setattr(s, k, getattr(s, k) + upd[k])
                s.n += x.numel()

        return pre

    for name, layer in quantized_layers(q):
        if layer.aq is not None:
            hooks.append(layer.register_forward_pre_hook(make(name)))
    set_quantization(q, False)
    try:
        for sl in _batches(len(calib), batch_size):
            q(calib[sl])
    finally:
        for h in hooks:
            h.remove()
        set_quantization(q, True)
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
    layers = {n: l for n, l in quantized_layers(q) if l.aq is not None}
    cands = {n: mse_alpha_candidates(amax[n].float()) for n in layers}
    errs = {n: torch.zeros(len(c), dtype=torch.float64, device=c.device) for n, c in cands.items()}
    hooks = []

    def make(name: str, aq: UniformQuantizer) -> Callable:
        def pre(_m, args):
            x = args[0].detach()
            for k, a in enumerate(cands[name]):
                errs[name][k] += (aq.quantize_with_alpha(x, a) - x).double().square().sum()

        return pre

    for n, l in layers.items():
        hooks.append(l.register_forward_pre_hook(make(n, l.aq)))
    set_quantization(q, False)
    try:
        for sl in _batches(len(calib), batch_size):
            q(calib[sl])
    finally:
        for h in hooks:
            h.remove()
        set_quantization(q, True)
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


def weight_quantizer(layer: nn.Module) -> tuple[UniformQuantizer, torch.Tensor] | None:
    """The layer's uniform weight quantizer and the tensor it quantizes (after a weight transform)."""
    wq = layer.wq
    if isinstance(wq, UniformQuantizer):
        return wq, layer.weight
    if isinstance(wq, TransformedQuantizer):
        return wq.quant, wq.transform(layer.weight)
    return None


@torch.no_grad()
def init_quantizers(q: nn.Module, calib: torch.Tensor, cfg: PTQConfig, how: str) -> None:
    """Set every weight and activation clipping value by ``how`` (minmax | mse | aciq)."""
    stats = _collect_act_stats(q, calib, cfg.batch_size)
    for name, layer in quantized_layers(q):
        parts = weight_quantizer(layer)
        if parts is not None:
            wq, w = parts
            wq.set_alpha(weight_alpha(wq, w, how, cfg.distribution))
        if isinstance(layer.aq, UniformQuantizer):
            s = stats[name]
            layer.aq.set_signed(bool(s.amin < 0))
    if how == "mse":
        amax = {n: torch.maximum(s.amax, -s.amin) for n, s in stats.items()}
        for name, alpha in _mse_act_alphas(q, calib, cfg.batch_size, amax).items():
            q.get_submodule(name).aq.set_alpha(alpha)
        return
    for name, layer in quantized_layers(q):
        if isinstance(layer.aq, UniformQuantizer):
            s, aq = stats[name], layer.aq
            if how == "minmax":
                alpha = torch.maximum(s.amax, -s.amin) if aq.signed else s.amax
            else:
                alpha = _aciq_act_alpha(s, aq.bits, cfg.distribution, aq.signed)
            aq.set_alpha(alpha.float())


# ---------------------------------------------------------------------------------------------- algorithms
@PTQ_ALGORITHMS.register("minmax")
def ptq_minmax(q: nn.Module, fp: nn.Module, calib: torch.Tensor, cfg: PTQConfig) -> None:
    """Clipping at the observed extremes (max|W|; activation max over the calibration set)."""
    init_quantizers(q, calib, cfg, "minmax")


@PTQ_ALGORITHMS.register("mse")
def ptq_mse(q: nn.Module, fp: nn.Module, calib: torch.Tensor, cfg: PTQConfig) -> None:
    """Clipping minimising the quantization MSE of each tensor (grid search)."""
    init_quantizers(q, calib, cfg, "mse")


@PTQ_ALGORITHMS.register("aciq")
def ptq_aciq(q: nn.Module, fp: nn.Module, calib: torch.Tensor, cfg: PTQConfig) -> None:
    """ACIQ: per-tensor analytic clipping for a Laplace or Gaussian prior (supplement §9.1)."""
    init_quantizers(q, calib, cfg, "aciq")


def _minibatch(n: int, batch_size: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.randint(0, n, (min(batch_size, n),), generator=gen).to(device)


@PTQ_ALGORITHMS.register("adaquant")
def ptq_adaquant(q: nn.Module, fp: nn.Module, calib: torch.Tensor, cfg: PTQConfig) -> None:
    """AdaQuant (Hubara et al., ICML 2021), sequential: for each layer in order, minimise
    ‖Q(W + V)·Q(x̃) − W·x‖² over the weights, bias and the weight/activation steps with Adam, where x̃ is the
    layer input in the already-quantized model and W·x the FP layer output on the same images."""
    init_quantizers(q, calib, cfg, cfg.init)
    iters = 100 if cfg.iters is None else cfg.iters
    gen = torch.Generator().manual_seed(cfg.seed)
    fp_layers = dict(fp.named_modules())
    for name, layer in quantized_layers(q):
        x_in = capture(q, layer, calib, cfg.batch_size, "input")
        target = capture(fp, fp_layers[name], calib, cfg.batch_size, "output")
        groups = [{"params": [layer.weight], "lr": cfg.lr_weight}]
        if layer.bias is not None:
            groups.append({"params": [layer.bias], "lr": cfg.lr_bias})
        steps = [qq.step for qq in (layer.wq, layer.aq) if isinstance(qq, UniformQuantizer)]
        if steps:
            groups.append({"params": steps, "lr": cfg.lr_step})
        params = [p for g in groups for p in g["params"]]
        flags = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(groups)
        for _ in range(iters):
            idx = _minibatch(len(calib), cfg.batch_size, gen, x_in.device)
            loss = F.mse_loss(layer(x_in[idx]), target[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        for p, f in zip(params, flags):
            p.requires_grad_(f)
            p.grad = None


def find_blocks(model: nn.Module) -> list[str]:
    """Reconstruction units for QDrop: residual/custom blocks and stand-alone conv/linear layers.

    Containers (the model itself, nn.Sequential, nn.ModuleList, nn.ModuleDict) are opened; any other module
    holding a quantized layer is one block; a quantized layer outside such a module is its own block.
    """
    containers = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
    out: list[str] = []

    def visit(prefix: str, m: nn.Module, root: bool) -> None:
        if isinstance(m, QUANT_LAYERS):
            out.append(prefix)
            return
        if not any(isinstance(c, QUANT_LAYERS) for c in m.modules()):
            return
        if root or isinstance(m, containers):
            for n, c in m.named_children():
                visit(f"{prefix}.{n}" if prefix else n, c, False)
            return
        out.append(prefix)

    visit("", model, True)
    return out


@torch.no_grad()
def _execution_order(model: nn.Module, names: list[str], x: torch.Tensor) -> list[str]:
    order: list[str] = []
    hooks = [model.get_submodule(n).register_forward_pre_hook(lambda _m, _a, n=n: order.append(n)) for n in names]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    seen: list[str] = []
    for n in order:
        if n not in seen:
            seen.append(n)
    return seen


@PTQ_ALGORITHMS.register("qdrop")
def ptq_qdrop(q: nn.Module, fp: nn.Module, calib: torch.Tensor, cfg: PTQConfig) -> None:
    """QDrop (Wei et al., ICLR 2022): block-wise reconstruction of the FP block output with AdaRound weights
    and learned activation steps, each activation element's quantization dropped with probability p during
    reconstruction; AdaRound regulariser after a warm-up with β annealed 20 → 2."""
    init_quantizers(q, calib, cfg, cfg.init)
    iters = 20000 if cfg.iters is None else cfg.iters
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # the drop masks
    blocks = _execution_order(q, find_blocks(q), calib[: min(2, len(calib))])
    warm = int(cfg.round_warmup * iters)
    b0, b1 = cfg.round_beta
    for bname in blocks:
        qb, fb = q.get_submodule(bname), fp.get_submodule(bname)
        x_in = capture(q, qb, calib, cfg.batch_size, "input")
        target = capture(fp, fb, calib, cfg.batch_size, "output")
        layers = [qb] if isinstance(qb, QUANT_LAYERS) else [m for _, m in quantized_layers(qb)]
        ada, acts = [], []
        for layer in layers:
            if isinstance(layer.wq, UniformQuantizer):
                layer.wq = AdaRoundWeight(layer.wq, layer.weight)
                ada.append(layer.wq)
            if isinstance(layer.aq, UniformQuantizer):
                layer.aq.step.requires_grad_(True)
                layer.aq.drop_prob = cfg.drop_prob
                layer.aq.train()
                acts.append(layer.aq)
        groups = []
        if ada:
            groups.append({"params": [a.v for a in ada], "lr": cfg.lr_round})
        if acts:
            groups.append({"params": [a.step for a in acts], "lr": cfg.lr_act_step})
        if groups:
            opt = torch.optim.Adam(groups)
            for it in range(iters):
                idx = _minibatch(len(calib), cfg.batch_size, gen, x_in.device)
                out = qb(x_in[idx])
                loss = (out - target[idx]).square().flatten(1).sum(1).mean()
                if ada and it >= warm:
                    beta = b1 + (b0 - b1) * (1 - (it - warm) / max(1, iters - warm))
                    loss = loss + cfg.round_weight * sum(a.round_loss(beta) for a in ada)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        for a in ada:
            a.hard = True
            a.v.requires_grad_(False)
        for a in acts:
            a.step.requires_grad_(False)
            a.step.grad = None
            a.drop_prob = 0.0
            a.eval()


def _nonuniform(q: nn.Module, calib: torch.Tensor, cfg: PTQConfig, kind: str) -> None:
    init_quantizers(q, calib, cfg, "aciq")  # activations (if quantized): ACIQ
    for _, layer in quantized_layers(q):
        if isinstance(layer.wq, UniformQuantizer):
            b = layer.wq.bits
            w = layer.weight
            lv = best_pot_levels(w, b) if kind == "pot" else kmeans_levels(w, b, cfg.kmeans_iters)
            layer.wq = LevelQuantizer(lv.to(w.device))


@PTQ_ALGORITHMS.register("pot")
def ptq_pot(q: nn.Module, fp: nn.Module, calib: torch.Tensor, cfg: PTQConfig) -> None:
    """Logarithmic (power-of-two) weight levels per tensor, scale by MSE search (supplement Fig. 4A)."""
    _nonuniform(q, calib, cfg, "pot")


@PTQ_ALGORITHMS.register("kmeans")
def ptq_kmeans(q: nn.Module, fp: nn.Module, calib: torch.Tensor, cfg: PTQConfig) -> None:
    """k-means (2^b clusters) weight levels per tensor (supplement Fig. 4A)."""
    _nonuniform(q, calib, cfg, "kmeans")


# ---------------------------------------------------------------------------------------------- entry
def fold_weight_transforms(model: nn.Module) -> nn.Module:
    """Replace every quantized layer by a plain layer whose weight is its effective weight (e.g. SatNL's
    W' = d·f(W/d)), so PTQ quantizes what the trained network really computes. Works in place on ``model``."""
    for name, layer in list(quantized_layers(model)):
        if layer.aq is not None:
            raise QreproError(f"PTQ input must be a full-precision model; layer {name} quantizes its input")
        with torch.no_grad():
            w = layer.effective_weight().detach().clone()
        base_cls = nn.Conv2d if isinstance(layer, nn.Conv2d) else nn.Linear
        plain = base_cls.__new__(base_cls)
        plain.__dict__ = layer.__dict__.copy()
        plain._modules = {k: v for k, v in layer._modules.items() if k not in ("wq", "aq")}
        plain._parameters = dict(layer._parameters)
        plain._parameters["weight"] = nn.Parameter(w, requires_grad=False)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, plain)
    return model


def quantize_model(fp_model: nn.Module, calib: torch.Tensor, cfg: PTQConfig) -> nn.Module:
    """PTQ of ``fp_model`` (not modified) on calibration inputs ``calib``; returns a quantized copy."""
    cfg.check()
    fp = fold_weight_transforms(copy.deepcopy(fp_model)).eval()
    for p in fp.parameters():
        p.requires_grad_(False)
    q = prepare(copy.deepcopy(fp), ptq_method(cfg)).eval()
    for p in q.parameters():
        p.requires_grad_(False)
    PTQ_ALGORITHMS.get(cfg.algorithm)(q, fp, calib, cfg)
    if cfg.weight_step_scale != 1.0:
        for _, layer in quantized_layers(q):
            if isinstance(layer.wq, (UniformQuantizer, AdaRoundWeight)):
                with torch.no_grad():
                    layer.wq.step.mul_(cfg.weight_step_scale)
    return q.eval()
