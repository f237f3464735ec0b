"""Post-training quantization of a full-precision model (library code; the Hydra entry is __main__.py).

``quantize_model(fp_model, calib, PTQConfig(...))`` returns a quantized *copy* of ``fp_model`` (which is
left untouched) built with the framework's own QConv2d/QLinear layers:

1. the PTQ policy (a :class:`qrepro.quant.Method`) gives every conv/linear a weight quantizer at ``w_bits``
   and an input quantizer at ``a_bits`` (first/last layers at ``first_last_bits``; the network input is not
   quantized unless ``quantize_first_input``);
2. activation statistics are collected on the calibration set (quantizers disabled);
3. the registered algorithm (``PTQ_ALGORITHMS``: ``minmax``, ``mse``, ``aciq``, ``adaquant``, ``qdrop``, ``pot``,
   ``kmeans``; the docstrings of ``_clipping`` (minmax, mse, aciq), ``_nonuniform`` (pot, kmeans),
   ``ptq_adaquant`` and ``ptq_qdrop`` say what each does) sets / optimises the quantizers.

AdaQuant and QDrop follow their reference implementations where the SymReg/SatNL supplement is silent
(CalibTIP ``utils/adaquant.py`` + ``models/modules/quantize.py``; wimh966/QDrop ``solver/recon.py`` +
``quantization/``): every such choice is a ``PTQConfig`` field (``None`` = the algorithm's reference value,
see ``ALGORITHM_DEFAULTS``), listed in docs/symreg.md.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qrepro.errors import QreproError
from qrepro.quant.aciq import DISTRIBUTIONS
from qrepro.quant.calibrate import _AFFINE, Calibration, capture, init_quantizers, layer_bits, weight_quantizer_for
from qrepro.quant.layers import QUANT_LAYERS, quantized_layers
from qrepro.quant.levels import best_pot_levels, kmeans_levels
from qrepro.quant.methods import FP_BITS, LayerInfo, Method
from qrepro.quant.prepare import prepare
from qrepro.quant.quantizers import (
    GRIDS,
    AdaRoundWeight,
    AffineQuantizer,
    LevelQuantizer,
    RangeQuantizer,
    UniformQuantizer,
)
from qrepro.registry import Registry

PTQ_ALGORITHMS = Registry("ptq algorithm", config_group="ptq.algorithm")


#: Reference values of the options left at ``None`` (CalibTIP for AdaQuant, wimh966/QDrop for QDrop).
ALGORITHM_DEFAULTS: dict[str, dict[str, object]] = {
    # CalibTIP: per-channel asymmetric weights (perC=True in its scripts), asymmetric inputs, ranges "measured"
    # as the mean over calibration samples of each sample's min/max, 1000 Adam iterations per layer
    # (optimize_layer), random batches of 50
    "adaquant": dict(weight_granularity="channel", asymmetric=True, init="mean_minmax", iters=1000, batch_size=50),
    # QDrop: per-channel asymmetric AdaRound weights, asymmetric LSQ activations, MSE (Lp, p = 2.4) observers,
    # 20000 iterations per block, batches of 32
    "qdrop": dict(weight_granularity="channel", asymmetric=True, init="lp", iters=20000, batch_size=32),
}
_FALLBACK = dict(weight_granularity="tensor", asymmetric=False, init="mse", iters=100, batch_size=32)
INITS_UNIFORM = ("minmax", "mse", "aciq")
INITS_AFFINE = ("minmax", "mse", "aciq", "mean_minmax", "lp")


@dataclass
class PTQConfig:
    """Options of one PTQ run (keys of the ``ptq`` config block, minus the bit list). ``None`` = the
    algorithm's reference value (``ALGORITHM_DEFAULTS``); ``resolved()`` fills them in."""

    algorithm: str = "aciq"
    w_bits: int = 4
    a_bits: int = 32
    first_last_bits: int | None = 8  # None: first/last layers at the network bit-widths
    quantize_first_input: bool = False
    weight_grid: str = "midrise"  # symmetric weight grid (asymmetric=False)
    weight_granularity: str | None = None  # tensor | channel (one weight step per output channel)
    asymmetric: bool | None = None  # adaquant / qdrop: asymmetric quantizers with zero points (reference)
    act_grid: str = "int"
    distribution: str = "laplace"  # ACIQ prior: laplace | gaussian
    init: str | None = None  # initial clipping for adaquant / qdrop: minmax | mse | aciq | mean_minmax | lp
    lp_norm: float = 2.4  # init=lp: the p of the Lp quantization error QDrop's MSE observer minimises
    act_calib_size: int = 256  # init=mse/lp with asymmetric quantizers: images the activation search sees
    iters: int | None = None  # per layer (adaquant) / block (qdrop)
    batch_size: int | None = None  # reconstruction mini-batch (adaquant 50, qdrop 32); calibration chunks
    lr_weight: float = 1e-5  # AdaQuant: weights
    lr_bias: float = 1e-3  # AdaQuant: biases
    lr_weight_qparams: float = 1e-3  # AdaQuant: weight range and zero point (step when symmetric)
    lr_act_qparams: float = 1e-1  # AdaQuant: input range and zero point (step when symmetric)
    keep_best: bool = True  # AdaQuant: each layer keeps its iterate with the lowest MSE on all calibration images
    relu_before_mse: bool = True  # AdaQuant: ReLU on both outputs before the MSE where the network applies one
    loss_through_bn: bool = True  # AdaQuant / QDrop layers: the MSE after the layer's BatchNorm (reference: folded)
    lr_round: float = 1e-3  # QDrop: AdaRound V
    lr_act_step: float = 4e-5  # QDrop: activation steps
    act_lr_schedule: str = "cosine"  # QDrop: activation-step lr cosine-annealed to 0 over iters | constant
    act_grad_scale: bool = True  # QDrop: LSQ gradient scale 1/sqrt(N·q_max) on the activation steps
    drop_prob: float = 0.5  # QDrop
    round_weight: float = 0.01  # QDrop: λ of the AdaRound regulariser
    round_warmup: float = 0.2  # QDrop: fraction of iterations without the regulariser
    round_beta: tuple[float, float] = (20.0, 2.0)  # QDrop: β annealed linearly from first to second
    kmeans_iters: int = 50
    weight_step_scale: float = 1.0  # Fig. 5A: evaluate with Δ = scale · Δ' after PTQ
    seed: int = 0

    def resolved(self) -> PTQConfig:
        """A copy with every ``None`` option set to the algorithm's reference value."""
        defaults = {**_FALLBACK, **ALGORITHM_DEFAULTS.get(self.algorithm, {})}
        fill = {k: v for k, v in defaults.items() if getattr(self, k) is None}
        return dataclasses.replace(self, **fill)

    chunk = Calibration.chunk  # mini-batch of calibration forwards (memory only; results do not depend on it)

    def quantizer_kind(self) -> str:
        """uniform (symmetric policy quantizers) | range (AdaQuant reference) | affine (QDrop reference)."""
        if not self.asymmetric:
            return "uniform"
        return "range" if self.algorithm == "adaquant" else "affine"

    def check(self) -> None:
        PTQ_ALGORITHMS.get(self.algorithm)
        for what, b in (("w_bits", self.w_bits), ("a_bits", self.a_bits)):
            if b != FP_BITS and not 1 <= b <= 16:
                raise QreproError(f"ptq {what}={b} out of range; use 1..16 or 32 (full precision)")
        if self.weight_grid not in GRIDS or self.act_grid not in GRIDS:
            raise QreproError(f"ptq grids must be one of {', '.join(GRIDS)}")
        if self.weight_granularity not in (None, "tensor", "channel"):
            raise QreproError(f"ptq.weight_granularity={self.weight_granularity!r}; choose tensor or channel")
        if self.distribution not in DISTRIBUTIONS:
            raise QreproError(f"ptq.distribution must be one of {', '.join(DISTRIBUTIONS)}")
        if self.asymmetric and self.algorithm not in ("adaquant", "qdrop"):
            raise QreproError(f"ptq.asymmetric=true is implemented for adaquant and qdrop, not {self.algorithm}")
        inits = INITS_AFFINE if self.asymmetric else INITS_UNIFORM
        if self.init is not None and self.init not in inits:
            kind = "asymmetric" if self.asymmetric else "symmetric"
            raise QreproError(f"ptq.init={self.init!r} with {kind} quantizers; choose one of: {', '.join(inits)}")
        if not self.lp_norm > 0:
            raise QreproError(f"ptq.lp_norm must be > 0, got {self.lp_norm}")
        if self.act_calib_size < 1 or (self.batch_size is not None and self.batch_size < 1):
            raise QreproError("ptq.act_calib_size and ptq.batch_size must be >= 1")
        if self.act_lr_schedule not in ("cosine", "constant"):
            raise QreproError(f"ptq.act_lr_schedule={self.act_lr_schedule!r}; choose cosine or constant")
        if not 0.0 <= self.drop_prob < 1.0:
            raise QreproError(f"ptq.drop_prob must be in [0, 1), got {self.drop_prob}")
        if not 0.0 <= self.round_warmup < 1.0:  # the rounding regulariser needs at least one step after warmup
            raise QreproError(f"ptq.round_warmup must be in [0, 1), got {self.round_warmup}")
        if not self.weight_step_scale > 0:
            raise QreproError("ptq.weight_step_scale must be > 0")


# keys of the ``ptq`` config block that are not PTQConfig options: the bit list and what the entry point does
RUN_KEYS = ("bits", "calib_size", "use_ema", "eval_fp")


def bit_pairs(bits: object, w_bits: int, a_bits: int) -> list[tuple[int, int]]:
    """The (w_bits, a_bits) configurations of ``ptq.bits``: None -> the run's own ``(w_bits, a_bits)``."""
    if bits is None:
        return [(int(w_bits), int(a_bits))]
    ok = isinstance(bits, (list, tuple)) and bits and all(isinstance(b, (list, tuple)) and len(b) == 2 for b in bits)
    if not ok or not all(isinstance(x, int) and not isinstance(x, bool) for b in bits for x in b):
        raise QreproError(f"ptq.bits={bits!r}; use a list of [w_bits, a_bits] pairs, e.g. ptq.bits=[[4,32],[4,4]]")
    return [(int(w), int(a)) for w, a in bits]


def ptq_configs(options: dict, w_bits: int, a_bits: int, seed: int) -> list[PTQConfig]:
    """The resolved, checked PTQConfig of every bit configuration of a ``ptq`` config block (``options``: its
    plain keys; ``bits`` null -> ``w_bits``/``a_bits``). Raises the one-line error of the first bad option."""
    fields = {f.name for f in dataclasses.fields(PTQConfig)} - {"w_bits", "a_bits", "seed"}
    unknown = sorted(k for k in options if k not in fields and k not in RUN_KEYS)
    if unknown:
        raise QreproError(
            f"unknown config key ptq.{unknown[0]} (ptq keys: {', '.join(sorted(fields | set(RUN_KEYS)))})"
        )
    pairs = bit_pairs(options.get("bits"), w_bits, a_bits)
    opts = {k: v for k, v in options.items() if k in fields}
    if "round_beta" in opts:
        opts["round_beta"] = tuple(opts["round_beta"])
    out = [PTQConfig(**{**opts, "w_bits": w, "a_bits": a, "seed": int(seed)}).resolved() for w, a in pairs]
    for cfg in out:
        cfg.check()
    return out


def _weight_quantizer(layer: nn.Module, bits: int, cfg: PTQConfig) -> nn.Module:
    kind = cfg.quantizer_kind()
    if kind == "uniform":
        return weight_quantizer_for(layer, bits, cfg.weight_grid, cfg.weight_granularity)
    ch = layer.weight.shape[0] if cfg.weight_granularity == "channel" else None
    return (RangeQuantizer if kind == "range" else AffineQuantizer)(bits, channels=ch, ndim=layer.weight.dim())


def _act_quantizer(bits: int, cfg: PTQConfig) -> nn.Module:
    kind = cfg.quantizer_kind()
    if kind == "uniform":
        return UniformQuantizer(bits, signed=False, grid=cfg.act_grid)
    if kind == "range":
        return RangeQuantizer(bits)
    return AffineQuantizer(bits, grad_scale=cfg.act_grad_scale)


def ptq_method(cfg: PTQConfig) -> Method:
    """The PTQ layer policy as a framework Method (algorithms may replace ``wq``)."""
    cfg = cfg.resolved()

    def quantize_layer(info: LayerInfo):
        wb = layer_bits(cfg.w_bits, info.role, cfg.first_last_bits)
        ab = layer_bits(cfg.a_bits, info.role, cfg.first_last_bits)
        wq = _weight_quantizer(info.module, wb, cfg) if wb != FP_BITS else None
        quant_input = ab != FP_BITS and (info.role != "first" or cfg.quantize_first_input)
        aq = _act_quantizer(ab, cfg) if quant_input else None
        return (wq, aq) if (wq is not None or aq is not None) else None

    return Method(name=f"ptq_{cfg.algorithm}", quantize_layer=quantize_layer, w_bits=cfg.w_bits, a_bits=cfg.a_bits)


# ---------------------------------------------------------------------------------------------- algorithms
def _clipping(how: str, q: nn.Module, fp: nn.Module, calib: torch.Tensor, cfg: PTQConfig) -> None:
    """``minmax``: clipping at the observed extremes (max|W|; activation max over the calibration set); ``mse``:
    clipping minimising the quantization MSE of each tensor (grid search); ``aciq``: per-tensor analytic
    clipping for a Laplace or Gaussian prior (supplement §9.1)."""
    init_quantizers(q, calib, cfg, how)


for _how in ("minmax", "mse", "aciq"):
    PTQ_ALGORITHMS.register(_how)(functools.partial(_clipping, _how))


_BN = (nn.BatchNorm1d, nn.BatchNorm2d)
_ACTS = {"relu": F.relu, "relu6": F.relu6}
# call_function / call_method targets of a torch.fx graph that are a ReLU / ReLU6
_ACT_TARGETS = dict.fromkeys((F.relu, torch.relu, torch.relu_, "relu", "relu_"), "relu") | {F.relu6: "relu6"}


def layer_post_ops(model: nn.Module) -> dict[str, tuple[str | None, str | None]]:
    """For every conv/linear of ``model`` (a plain FP model): (name of the BatchNorm module its output feeds
    alone, or None; "relu"/"relu6" when that BatchNorm output — or the layer output itself when there is no
    BatchNorm — feeds a ReLU alone, else None). Read from a ``torch.fx`` trace; {} (no post-ops) with a
    printed note when the model does not trace."""
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception as e:  # data-dependent control flow etc.: the MSE stays on the raw layer output
        print(f"ptq: model does not trace with torch.fx ({type(e).__name__}); MSE on raw layer outputs", flush=True)
        return {}
    mods = dict(model.named_modules())

    def act(node) -> str | None:
        if node.op == "call_module":
            m = mods.get(node.target)
            return "relu" if isinstance(m, nn.ReLU) else "relu6" if isinstance(m, nn.ReLU6) else None
        return _ACT_TARGETS.get(node.target) if node.op in ("call_function", "call_method") else None

    out: dict[str, tuple[str | None, str | None]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(mods.get(node.target), (nn.Conv2d, nn.Linear)):
            continue
        bn, users = None, list(node.users)
        if len(users) == 1 and users[0].op == "call_module" and isinstance(mods.get(users[0].target), _BN):
            bn, users = users[0].target, list(users[0].users)
        a = act(users[0]) if len(users) == 1 else None
        out[str(node.target)] = (bn, a)
    return out


def _identity(y: torch.Tensor) -> torch.Tensor:
    return y


def _post_fn(
    q: nn.Module, ops: tuple[str | None, str | None] | None, through_bn: bool, with_act: bool
) -> Callable[[torch.Tensor], torch.Tensor]:
    """y ↦ act(BN(y)) for a layer's post-ops (BN only when ``through_bn``; the activation only when asked for
    and the BN before it, if any, is applied); the identity when nothing applies."""
    bn_name, act = ops or (None, None)
    bn = q.get_submodule(bn_name) if (bn_name is not None and through_bn) else None
    use_act = with_act and act is not None and (bn_name is None or bn is not None)
    if bn is None and not use_act:
        return _identity

    def f(y: torch.Tensor) -> torch.Tensor:
        if bn is not None:
            y = bn(y)
        return _ACTS[act](y) if use_act else y

    return f


def _qparams(qq: nn.Module | None) -> list[nn.Parameter]:
    if isinstance(qq, _AFFINE):
        return qq.qparams()
    if isinstance(qq, UniformQuantizer):
        return [qq.step]
    return []


@torch.no_grad()
def _calib_mse(layer: nn.Module, post: Callable, x_in: torch.Tensor, target: torch.Tensor, chunk: int) -> float:
    """MSE(post(layer(x_in)), target) over every calibration image (chunked; the same value as one batch)."""
    total = 0.0
    for x, y in zip(x_in.split(chunk), target.split(chunk)):
        total += float(F.mse_loss(post(layer(x)), y, reduction="sum"))
    return total / target.numel()


@PTQ_ALGORITHMS.register("adaquant")
def ptq_adaquant(q: nn.Module, fp: nn.Module, calib: torch.Tensor, cfg: PTQConfig) -> None:
    """AdaQuant (Hubara et al., ICML 2021), sequential, as its reference implementation (CalibTIP
    ``adaquant``/``optimize_layer``): for each layer in order, minimise MSE(post(Q_w(W)·Q_in(x̃) + b),
    post(W·x + b)) with Adam over the weights (lr 1e-5), bias (1e-3), the weight quantizer's range and zero
    point (1e-3) and the input quantizer's range and zero point (1e-1), on random batches of 50 distinct
    calibration images; x̃ is the layer input in the already-quantized model, W·x the FP layer output on the
    same images; post = the layer's BatchNorm (``loss_through_bn``; the reference folds it into the conv)
    then ReLU where the network applies one (``relu_before_mse``)."""
    init_quantizers(q, calib, cfg, cfg.init)
    gen = torch.Generator().manual_seed(cfg.seed)
    post_ops = layer_post_ops(fp) if (cfg.loss_through_bn or cfg.relu_before_mse) else {}
    n = len(calib)
    for name, layer in quantized_layers(q):
        x_in = capture(q, layer, calib, cfg.chunk, "input")
        target = capture(fp, fp.get_submodule(name), calib, cfg.chunk, "output")
        post = _post_fn(q, post_ops.get(name), cfg.loss_through_bn, cfg.relu_before_mse)
        with torch.no_grad():
            target = post(target)
        bias = [layer.bias] if layer.bias is not None else []
        groups = [([layer.weight], cfg.lr_weight), (bias, cfg.lr_bias)]
        groups += [(_qparams(layer.wq), cfg.lr_weight_qparams), (_qparams(layer.aq), cfg.lr_act_qparams)]
        groups = [{"params": ps, "lr": lr} for ps, lr in groups if ps]
        params = [p for g in groups for p in g["params"]]
        flags = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(groups)
        every = max(1, cfg.iters // 10)
        best = None  # keep_best: (calibration MSE, parameters) of the best iterate checked (at steps 0, every, ...)
        for i in range(cfg.iters + 1):
            if i > 0:
                idx = torch.randperm(n, generator=gen)[: cfg.batch_size].to(x_in.device)
                loss = F.mse_loss(post(layer(x_in[idx])), target[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            if cfg.keep_best and (i % every == 0 or i == cfg.iters):
                mse = _calib_mse(layer, post, x_in, target, cfg.chunk)
                if best is None or mse < best[0]:
                    best = (mse, [p.detach().clone() for p in params])
        if best is not None:
            with torch.no_grad():
                for p, v in zip(params, best[1]):
                    p.copy_(v)
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
    return list(dict.fromkeys(order))


def _round_beta(count: int, iters: int, warmup: float, beta: tuple[float, float]) -> float:
    """QDrop's ``LinearTempDecay`` at a regularised step ``count`` (1-based, warmup·iters <= count <= iters, where
    the reference's clamps to β₀ / β₁ never act): linear from β₀ at warmup·iters to β₁ at iters."""
    start = warmup * iters
    b0, b1 = beta
    return b1 + (b0 - b1) * (1.0 - (count - start) / (iters - start))


@PTQ_ALGORITHMS.register("qdrop")
def ptq_qdrop(q: nn.Module, fp: nn.Module, calib: torch.Tensor, cfg: PTQConfig) -> None:
    """QDrop (Wei et al., ICLR 2022), as its reference implementation (``solver/recon.py``): block-wise
    reconstruction of the FP block output with AdaRound weights (Adam, lr 1e-3) and LSQ activation steps
    (Adam, lr 4e-5 cosine-annealed to 0), each activation element's quantization dropped with probability p.
    Loss per step: Σ_channels (out − target)² averaged over batch and positions, + λ·Σ AdaRound regulariser
    from step warmup·iters on (β from 20 to 2). A stand-alone layer's output includes its BatchNorm and ReLU
    (the reference's QuantizedLayer, BN folded)."""
    init_quantizers(q, calib, cfg, cfg.init)
    iters, n = cfg.iters, len(calib)
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # the drop masks
    blocks = _execution_order(q, find_blocks(q), calib[: min(2, len(calib))])
    post_ops = layer_post_ops(fp)
    for bname in blocks:
        qb, fb = q.get_submodule(bname), fp.get_submodule(bname)
        x_in = capture(q, qb, calib, cfg.chunk, "input")
        target = capture(fp, fb, calib, cfg.chunk, "output")
        standalone = isinstance(qb, QUANT_LAYERS)
        post = _post_fn(q, post_ops.get(bname), cfg.loss_through_bn, True) if standalone else _identity
        with torch.no_grad():
            target = post(target)
        layers = [qb] if standalone else [m for _, m in quantized_layers(qb)]
        ada, acts = [], []
        for layer in layers:
            if isinstance(layer.wq, (UniformQuantizer, AffineQuantizer)):
                layer.wq = AdaRoundWeight(layer.wq, layer.weight)
                ada.append(layer.wq)
            if isinstance(layer.aq, (UniformQuantizer, AffineQuantizer)):
                layer.aq.step.requires_grad_(True)
                layer.aq.drop_prob = cfg.drop_prob
                layer.aq.train()
                acts.append(layer.aq)
        groups = [([a.v for a in ada], cfg.lr_round), ([a.step for a in acts], cfg.lr_act_step)]
        groups = [{"params": ps, "lr": lr} for ps, lr in groups if ps]
        if groups:
            opt = torch.optim.Adam(groups)
            act_group = opt.param_groups[-1] if acts else None
            for it in range(iters):
                if act_group is not None and cfg.act_lr_schedule == "cosine":  # CosineAnnealingLR(T=iters, 0)
                    act_group["lr"] = cfg.lr_act_step * (1 + math.cos(math.pi * it / iters)) / 2
                idx = torch.randint(0, n, (min(cfg.batch_size, n),), generator=gen).to(x_in.device)
                loss = (post(qb(x_in[idx])) - target[idx]).square().sum(1).mean()  # Σ channels, mean batch/positions
                count = it + 1
                if ada and count >= cfg.round_warmup * iters:
                    beta = _round_beta(count, iters, cfg.round_warmup, cfg.round_beta)
                    loss = loss + sum(cfg.round_weight * a.round_loss(beta) for a in ada)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                for a in acts:
                    if isinstance(a, AffineQuantizer):
                        a.sanitize()
        for a in ada:
            a.hard = True
            a.v.requires_grad_(False)
        for a in acts:
            a.step.requires_grad_(False)
            a.step.grad = None
            a.drop_prob = 0.0
            a.eval()


def _nonuniform(kind: str, q: nn.Module, fp: nn.Module, calib: torch.Tensor, cfg: PTQConfig) -> None:
    """Non-uniform weight levels per tensor (supplement Fig. 4A): ``pot`` logarithmic (power-of-two) levels with
    the scale by MSE search, ``kmeans`` k-means (2^b clusters) levels; activations (if quantized): ACIQ."""
    init_quantizers(q, calib, cfg, "aciq")
    for _, layer in quantized_layers(q):
        if isinstance(layer.wq, UniformQuantizer):
            b, w = layer.wq.bits, layer.weight
            lv = best_pot_levels(w, b) if kind == "pot" else kmeans_levels(w, b, cfg.kmeans_iters)
            layer.wq = LevelQuantizer(lv.to(w.device))


for _kind in ("pot", "kmeans"):
    PTQ_ALGORITHMS.register(_kind)(functools.partial(_nonuniform, _kind))


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
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, plain)  # get_submodule("") is the model
    return model


def quantize_model(fp_model: nn.Module, calib: torch.Tensor, cfg: PTQConfig) -> nn.Module:
    """PTQ of ``fp_model`` (not modified) on calibration inputs ``calib``; returns a quantized copy."""
    cfg = cfg.resolved()
    cfg.check()
    fp = fold_weight_transforms(copy.deepcopy(fp_model)).eval().requires_grad_(False)
    q = prepare(copy.deepcopy(fp), ptq_method(cfg)).eval().requires_grad_(False)
    PTQ_ALGORITHMS.get(cfg.algorithm)(q, fp, calib, cfg)
    if cfg.weight_step_scale != 1.0:
        for _, layer in quantized_layers(q):
            if hasattr(layer.wq, "rescale_step"):
                layer.wq.rescale_step(cfg.weight_step_scale)
    return q.eval()
