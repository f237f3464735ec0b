"""APoT (Additive Powers-of-Two Quantization, Li, Dong & Wang, ICLR 2020): level sets, projection, RCF and
weight normalisation.

Pure functions of tensors (level sets, projection, clipping functions, Eq. 14's error, Table 1's model cost); the
nn.Module quantizers live in ``qrepro/quant/methods/apot.py``, the method in docs/apot.md. Equation numbers refer
to the paper.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from itertools import product

import torch
from torch import nn

from qrepro.errors import QreproError
from qrepro.quant.prepare import _layer_infos
from qrepro.quant.ste import value_ste

MIN_BITS, MAX_BITS = 2, 8


# ----------------------------------------------------------------------------------------------- levels
def _additive_terms(bits: int, k: int) -> list[list[float]]:
    """The candidate values of each additive PoT term (before the scaling gamma)."""
    if k == 2 and bits % 2 == 1:
        # Eq. (6): 2n+1 bits -> n terms p_i in {0, 2^-i, 2^-(i+n), 2^-(i+2n+1)} plus p~ in {0, 2^-2n}
        n = (bits - 1) // 2
        terms = [[0.0, 2.0**-i, 2.0 ** -(i + n), 2.0 ** -(i + 2 * n + 1)] for i in range(n)]
        return [*terms, [0.0, 2.0 ** -(2 * n)]]
    if bits % k:
        raise QreproError(
            f"APoT levels need bits divisible by the base bit-width k (got bits={bits}, k={k}); "
            "use k=2 (odd bits via Eq. 6), k=1 (uniform) or k=bits (powers of two)"
        )
    # Eq. (5): n = b/k terms p_i in {0, 2^-i, 2^-(i+n), ..., 2^-(i+(2^k-2)n)}
    n = bits // k
    return [[0.0] + [2.0 ** -(i + j * n) for j in range(2**k - 1)] for i in range(n)]


def apot_levels(bits: int, k: int = 2) -> torch.Tensor:
    """Sorted unsigned level set Q^a(1, bits) in [0, 1] (float64), normalised by its maximum (gamma).

    k = 2: Eq. (5) for even bits, Eq. (6) for odd bits. k = 1: uniform {j / (2^b - 1)}. k = bits: powers of
    two {0, 2^-(2^b-2), ..., 2^-1, 1} (Eq. 3 for an unsigned b-bit number). All sums of one value per
    additive term are formed, de-duplicated and divided by the largest (gamma = 1 / max), so every set
    contains 0 and 1.
    """
    if not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise QreproError(f"APoT level sets exist for bits in {MIN_BITS}..{MAX_BITS}, got {bits!r}")
    if not isinstance(k, int) or not 1 <= k <= bits:
        raise QreproError(f"APoT base bit-width k must be in 1..bits={bits}, got {k!r}")
    sums = sorted({sum(c) for c in product(*_additive_terms(bits, k))})
    levels = torch.tensor(sums, dtype=torch.float64)
    return levels / levels.max()


def uniform_levels(bits: int) -> torch.Tensor:
    """Uniform unsigned levels {0, 1/(2^b-1), ..., 1}: APoT with k = 1 (fixed point)."""
    return apot_levels(bits, k=1)


def pot_levels(bits: int) -> torch.Tensor:
    """Powers-of-two unsigned levels {0, 2^-(2^b-2), ..., 1}: APoT with k = bits (Eq. 3)."""
    return apot_levels(bits, k=bits)


def level_set(family: str, bits: int) -> torch.Tensor:
    """Unsigned level set of a named family: ``apot`` (k=2), ``pot`` (k=b) or ``uniform`` (k=1)."""
    k = {"apot": 2, "pot": bits, "uniform": 1}.get(family)
    if k is None:
        raise QreproError(f"unknown APoT level family {family!r}; choose apot, pot, uniform or lloyd")
    return apot_levels(bits, k)


def magnitude_levels(family: str, bits: int) -> torch.Tensor:
    """Magnitude set of a signed ``bits``-bit weight: sign x the (bits-1)-bit unsigned set.

    2-bit weights are ternary whatever the family ({0, 1} magnitudes: Q(alpha, 2) = {-alpha, 0, alpha}).
    """
    return torch.tensor([0.0, 1.0], dtype=torch.float64) if bits == 2 else level_set(family, bits - 1)


# ------------------------------------------------------------------------------------------- projection
def project(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Pi_Q(x): the nearest element of the sorted ``levels`` for every element of ``x``.

    One ``bucketize`` against the levels (O(numel log L), no numel x L matrix) gives the two neighbours
    of each element; the nearer one is chosen by comparing |x - l| in x's dtype, i.e. the same decision as
    a brute-force argmin over all levels (the authors' code), also for x within rounding of a midpoint.
    An exact tie goes to the lower level. Values outside [min, max] go to the end levels.
    """
    levels = levels.to(dtype=x.dtype, device=x.device)
    if levels.numel() <= CHAIN_MAX_LEVELS and torch.compiler.is_compiling():
        return _project_chain(x, levels)
    hi_idx = torch.bucketize(x, levels).clamp(max=levels.numel() - 1)  # first level >= x
    hi = levels[hi_idx]
    lo = levels[(hi_idx - 1).clamp(min=0)]
    return torch.where((x - lo).abs() <= (hi - x).abs(), lo, hi)


CHAIN_MAX_LEVELS = 32  # up to 5-bit level sets; larger sets keep the bucketize form when compiled too


def _project_chain(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """``project`` as one chain of L - 1 compare-and-select steps, used inside compiled graphs.

    Step i moves x up to level i + 1 when ``x - l_i > l_{i+1} - x``: below its bucket that holds (the left side is
    positive, the right side <= 0), above it it fails, and in x's own bucket it is the tie rule of ``project``
    (nearer level, lower on an exact tie) evaluated on the same float differences, so both forms return
    identical values (tests/test_apot.py). The compiler fuses the chain into one element-wise kernel: no
    ``bucketize`` fallback, no int64 index tensor, no gathers.
    """
    out = levels[0].expand_as(x)
    for i in range(levels.numel() - 1):
        lo, hi = levels[i], levels[i + 1]
        out = torch.where(x - lo > hi - x, hi, out)
    return out


def project_signed(x: torch.Tensor, magnitudes: torch.Tensor) -> torch.Tensor:
    """sign(x) * Pi_Q(|x|): projection onto the symmetric set {+-m} built from unsigned magnitudes."""
    return torch.sign(x) * project(x.abs(), magnitudes)


# ------------------------------------------------------------------------------------ clipping functions
def _ste_project(c: torch.Tensor, levels: torch.Tensor, signed: bool) -> torch.Tensor:
    q = project_signed(c, levels) if signed else project(c, levels)
    return c + (q - c).detach()  # STE on the projection only (Eq. 10)


def rcf_weight(w: torch.Tensor, alpha: torch.Tensor, magnitudes: torch.Tensor, *, grad: str = "ste") -> torch.Tensor:
    """RCF for weights, Eq. (7): W^ = alpha * Pi_Q(1,b)(clip(W / alpha, -1, 1)).

    The clip and the divide/multiply by alpha stay in autograd and only the projection is straight-
    through, so dW^/dalpha is exactly Eq. (8)/(13c): sign(W) where |W| > alpha, Pi(W/alpha) - W/alpha inside.
    ``grad``: weight gradient ``"ste"`` = the upstream gradient unchanged, everywhere and for any alpha (paper
    Sec. 2.5, authors' CIFAR code; also when a learned alpha reaches 0 or goes negative) or ``"clipped"`` = the
    gradient of the clip, zero where |W / alpha| > 1 (authors' ImageNet code above 2 bits).
    """
    src = _weight_source(w, grad)
    c = torch.clamp(src / alpha, -1.0, 1.0)
    out = alpha * _ste_project(c, magnitudes, signed=True)
    return _straight_through(out, w, grad)


def rcf_act(x: torch.Tensor, alpha: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """RCF for (post-ReLU) activations: x^ = alpha * Pi_Q(1,b)(min(x / alpha, 1)).

    No lower clamp (as the authors' code): the input gradient is zeroed above alpha only, and
    dx^/dalpha = 1 above alpha, Pi(x/alpha) - x/alpha below (Eq. 8 for unsigned data).
    """
    c = torch.clamp(x / alpha, max=1.0)
    return alpha * _ste_project(c, levels, signed=False)


def pact_weight(w: torch.Tensor, alpha: torch.Tensor, magnitudes: torch.Tensor, *, grad: str = "ste") -> torch.Tensor:
    """Plain clipping (Eq. 1) with the PACT/STE gradient (Eq. 11): dW^/dalpha = sign(W) 1[|W| > alpha].

    Same forward as RCF; alpha only receives gradient through the clip, not through the levels.
    """
    c = torch.minimum(torch.maximum(_weight_source(w, grad), -alpha), alpha)
    out = value_ste(c, alpha.detach() * project_signed(c.detach() / alpha.detach(), magnitudes))
    return _straight_through(out, w, grad)


def pact_act(x: torch.Tensor, alpha: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Plain clipping of activations with the PACT gradient: dx^/dalpha = 1[x > alpha], no lower clamp."""
    c = torch.minimum(x, alpha)
    return value_ste(c, alpha.detach() * project(c.detach() / alpha.detach(), levels))


def _weight_source(w: torch.Tensor, grad: str) -> torch.Tensor:
    """The weights the clip sees: with the straight-through gradient they carry no gradient there (the clip only
    shapes alpha's gradient), so no mask decides where W's gradient passes and none can be wrong for alpha <= 0."""
    if grad == "ste":
        return w.detach()
    if grad == "clipped":
        return w
    raise QreproError(f"unknown APoT weight gradient {grad!r}; choose ste or clipped")


def _straight_through(out: torch.Tensor, w: torch.Tensor, grad: str) -> torch.Tensor:
    # ste: add a zero-valued term whose gradient is exactly the upstream gradient: dW^/dW = 1 everywhere
    return out + (w - w.detach()) if grad == "ste" else out


def max_scaled_weight(w: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """First/last layer weights as the authors' code does: scale s = max(W) (the largest *positive*
    weight, detached, not max|W|), W^ = s * round(127 W / s) / 127 for 8 bits, no clamp (weights below -s
    get levels beyond -127), straight-through gradient."""
    s = w.detach().max()
    n = 2 ** (bits - 1) - 1
    q = torch.round(w.detach() / s * n) / n * s
    return w + (q - w).detach()


# --------------------------------------------------------------------------------- weight normalisation
def weight_norm(w: torch.Tensor, *, eps: float = 1e-5, unbiased: bool = False, detach: bool = False) -> torch.Tensor:
    """Eq. (9) per tensor: (W - mu) / (sigma + eps) with sigma the population std (1/I).

    ``unbiased=True, eps=0, detach=True`` is what the authors' CIFAR code computes (torch.std, statistics
    without gradient); their ImageNet code keeps the statistics in the graph (``detach=False``).
    """
    src = w.detach() if detach else w
    mu = src.mean()
    sigma = src.std(correction=1 if unbiased else 0)
    return (w - mu) / (sigma + eps)


# ------------------------------------------------------------------------------------------- Lloyd-Max
def lloyd_max_levels(
    samples: torch.Tensor, n_levels: int, *, iters: int = 30, fix_zero: bool = True, init: torch.Tensor | None = None
) -> torch.Tensor:
    """Lloyd-Max levels (Cai et al., 2017; APoT Table 3 "Lloyd") fitted to ``samples`` (1-D).

    Alternates nearest-level assignment (thresholds = midpoints) and centroid update for a fixed number of
    iterations (vectorised, no host synchronisation). ``fix_zero`` keeps the smallest level at 0 so that a
    sign-magnitude set still contains zero, as the APoT/PoT/uniform sets do. Empty cells keep their level.
    Returns the sorted levels in the samples' dtype.
    """
    if n_levels < 2:
        raise QreproError(f"Lloyd-Max needs at least 2 levels, got {n_levels}")
    x = samples.detach().reshape(-1)
    if init is None:
        lo, hi = (torch.zeros((), dtype=x.dtype, device=x.device) if fix_zero else x.min()), x.max()
        levels = lo + (hi - lo) * torch.linspace(0, 1, n_levels, dtype=x.dtype, device=x.device)
    else:
        levels = init.detach().to(x)
    for _ in range(iters):
        levels, _ = torch.sort(levels)
        idx = torch.bucketize(x, (levels[1:] + levels[:-1]) * 0.5)
        sums = torch.zeros_like(levels).scatter_add_(0, idx, x)
        counts = torch.zeros_like(levels).scatter_add_(0, idx, torch.ones_like(x))
        levels = torch.where(counts > 0, sums / counts.clamp_min(1), levels)
        if fix_zero:
            levels = torch.cat([torch.zeros_like(levels[:1]), levels[1:]])
    return torch.sort(levels)[0]


# ------------------------------------------------------------------------------- quantization error
@dataclass
class QuantError:
    """Eq. (14): total = clip + proj (mean squared errors over all I weights)."""

    total: torch.Tensor
    clip: torch.Tensor
    proj: torch.Tensor


def quantization_error(w: torch.Tensor, alpha: torch.Tensor | float, magnitudes: torch.Tensor) -> QuantError:
    """Clipping and projection errors of the (normalised) weights ``w`` for threshold ``alpha`` (Eq. 14).

    clip = (1/I) sum_{|w| > alpha} (|w| - alpha)^2, proj = (1/I) sum_{|w| <= alpha} (w - w^)^2 and
    total = mean((w - w^)^2) with w^ = alpha * Pi(clip(w / alpha, -1, 1)). total = clip + proj holds when the
    largest level is 1 (every APoT/PoT/uniform set), since clipped weights land exactly on +-alpha.
    """
    alpha = torch.as_tensor(alpha, dtype=w.dtype, device=w.device)
    w_hat = alpha * project_signed(torch.clamp(w / alpha, -1.0, 1.0), magnitudes)
    outside = w.abs() > alpha
    n = w.numel()
    clip = torch.where(outside, (w.abs() - alpha) ** 2, torch.zeros_like(w)).sum() / n
    proj = torch.where(outside, torch.zeros_like(w), (w - w_hat) ** 2).sum() / n
    return QuantError(total=((w - w_hat) ** 2).mean(), clip=clip, proj=proj)


# -------------------------------------------------------------------------------- model size / FixOPs
def pot_terms(bits: int, k: int = 2) -> int:
    """Number of additive PoT terms n of an unsigned ``bits``-bit APoT number (Eq. 5: b/k; Eq. 6: n+1)."""
    return (bits - 1) // 2 + 1 if k == 2 and bits % 2 == 1 else max(1, bits // k)


@dataclass
class ModelCost:
    """Model size and FixOPs of a network under a quantization scheme (Table 1 columns)."""

    size_bytes: float
    fixops: float  # in FixOPs (one 8-bit x 8-bit multiply = 64 binary operations); MACs for FP
    macs: int

    @property
    def size_mib(self) -> float:  # the paper's "MB" for quantized models (2^20 bytes)
        return self.size_bytes / 2**20

    @property
    def size_mb(self) -> float:  # the paper's "MB" for its FP rows (10^6 bytes)
        return self.size_bytes / 1e6


def layer_macs(model: nn.Module, input_shape: tuple[int, ...] = (3, 224, 224)) -> dict[str, int]:
    """Multiply-accumulates of every Conv2d / Linear (qualified name -> MACs) for one input of ``input_shape``."""
    macs: dict[str, int] = {}

    def hook(name, mod, inp, out):  # MACs per output element: C_in/groups * kh * kw (conv), in_features (linear)
        macs[name] = int(out[0].numel()) * mod.weight[0].numel()

    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    handles = [m.register_forward_hook(partial(hook, n)) for n, m in layers]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_shape))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return macs


def model_cost(
    model: nn.Module,
    w_bits: int,
    a_bits: int,
    *,
    scheme: str = "apot",
    first_last_bits: int | None = 8,
    input_shape: tuple[int, ...] = (3, 224, 224),
    k: int = 2,
    macs: dict[str, int] | None = None,
) -> ModelCost:
    """Model size and FixOPs as in the paper's Table 1 (bit-op scheme of Zhou et al., 2016).

    - size: quantized conv/linear weights at ``w_bits``; first conv and last FC (weights and bias) at
      ``first_last_bits`` (None = 32-bit, as the paper counts the other methods); every other parameter and
      the BN running statistics at 32 bits (quantizer clip parameters are not counted).
    - FixOPs per multiply-accumulate (one FixOP = an 8-bit x 8-bit multiply = 64 binary operations):
      ``uniform`` = w_bits * a_bits / 64; ``apot`` = n * a_bits / 64 with n the number of additive PoT terms
      of the weight magnitude (Sec. 4.1: "mn shift-adds, i.e. n*m/64"); ``pot`` = the same with n = 1;
      ``lloyd`` (floating-point levels, no fixed-point arithmetic) = one per MAC, as Table 3 counts it;
      first/last layers b_fl * b_fl / 64 (8-bit: one FixOP); ``fp`` = one per MAC and 32-bit parameters.
    ``w_bits`` = 32 gives the FP size. Layers are visited with a zero input of ``input_shape`` unless their
    ``macs`` (from :func:`layer_macs`) are given.
    """
    if scheme not in ("apot", "pot", "uniform", "lloyd", "fp"):
        raise QreproError(f"unknown cost scheme {scheme!r}; choose apot, pot, uniform, lloyd or fp")
    macs = layer_macs(model, input_shape) if macs is None else macs
    roles = {info.name: info.role for info in _layer_infos(model, w_bits, a_bits)}
    fl_bits = 32 if first_last_bits is None else first_last_bits
    bits: dict[str, float] = {}  # parameter/buffer name -> bits per element
    fixops = 0.0
    for name, m in model.named_modules():
        if name not in roles:
            continue
        edge = roles[name] in ("first", "last")
        wb = 32 if scheme == "fp" else (fl_bits if edge else w_bits)
        bits[f"{name}.weight"] = wb
        if getattr(m, "bias", None) is not None:
            bits[f"{name}.bias"] = fl_bits if (edge and scheme != "fp") else 32
        if scheme in ("fp", "lloyd") or w_bits == 32:
            fixops += macs[name]
        elif edge:
            fixops += macs[name] * fl_bits * fl_bits / 64
        elif scheme == "uniform":
            fixops += macs[name] * w_bits * a_bits / 64
        else:
            n = 1 if (w_bits == 2 or scheme == "pot") else pot_terms(w_bits - 1, k)
            fixops += macs[name] * n * a_bits / 64
    tensors = [*model.named_parameters(), *model.named_buffers()]
    size = sum((p.numel() * bits.get(n, 32) / 8 for n, p in tensors if not n.endswith("num_batches_tracked")), 0.0)
    return ModelCost(size_bytes=size, fixops=fixops, macs=sum(macs.values()))
