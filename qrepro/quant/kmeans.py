"""k-means weight sharing (Deep Compression, Han, Mao & Dally, ICLR 2016, Sec. 3) and HAQ's linear quantizer
(Wang et al., "HAQ: Hardware-Aware Automated Quantization with Mixed Precision", CVPR 2019).

k-means (Deep Compression Sec. 3.1-3.3; how it maps to the papers and the authors' code: docs/haq.md):
- the weights of one layer are clustered into k = 2^b shared values (1-D k-means, Lloyd's algorithm, stopped as
  scikit-learn's ``KMeans``, the HAQ code's k-means: see :func:`kmeans_1d`). An empty cluster keeps its
  centroid (scikit-learn moves it to a far point; k-means on real weights rarely empties one);
- centroid initialisation (Sec. 3.2): ``linear`` (evenly spaced over [min, max], the paper's best), ``density``
  (evenly spaced quantiles of the weight distribution), ``random`` (Forgy: k weights drawn at random) and
  ``kmeans++`` (what HAQ's code uses through scikit-learn, seeded on at most 65,536 sampled weights);
- fine-tuning (Sec. 3.3, Eq. 3): the assignments stay fixed, and the gradient of a centroid is the sum of the
  gradients of the weights that share it (``centroid_grad: sum``). HAQ's code instead lets every weight take its
  own SGD step and then replaces the weights of each cluster by their mean, which is SGD on the centroids with
  the *mean* of the member gradients (``centroid_grad: mean``; momentum and weight decay average the same way).

HAQ's linear quantizer (the authors' ``QModule``), for a layer with b_w weight and b_a activation bits:
- weights: t fixed at calibration; w_q = round(clip(w, -t, t)/s)·s, s = t/(2^(b_w-1) - 1); the gradient passes
  straight through to w everywhere (no clip mask);
- activations (the layer input), range a > 0 trainable: x_c = (|x| - |x - a| + a)/2 = clip(x, 0, a) for an
  unsigned input ("half wave"), x_c = (|x + a| - |x - a|)/2 = clip(x, -a, a) for a signed one; then
  x_q = round(x_c/s)·s with s = a/(2^b_a - 1) (unsigned) or a/(2^(b_a-1) - 1) (signed), s detached, the
  gradient straight through to x_c. The |·| form fixes the gradient at the clip points: 1/2 there (torch's
  d|u|/du = 0 at u = 0), so dx_q/da = 1[x > a] + 1/2·1[x = a] and dx_q/dx = 1/2 at x = 0 and x = a.
- calibration (one full-precision forward on the first batch): t = max|w| for b_w >= 5, else the KL threshold
  (:func:`kl_threshold`); a = min(6, max|x|) for 5 or more effective bits (b_a, or b_a - 1 when signed), else
  min(6, max|x|, KL threshold).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from qrepro.errors import QreproError

KMEANS_INITS = ("linear", "density", "random", "kmeans++")
CENTROID_GRADS = ("sum", "mean")
ACT_INIT_RANGE = 6.0  # HAQ: the initial (and largest calibrated) activation range
KMEANS_PP_SAMPLE = 2**16  # k-means++ seeds on at most this many weights drawn at random (Lloyd uses all)


# ------------------------------------------------------------------------------------------------ k-means
def _flat64(w: torch.Tensor) -> torch.Tensor:
    return w.detach().reshape(-1).to(torch.float64)


def init_centroids(
    w: torch.Tensor, k: int, init: str = "linear", generator: torch.Generator | None = None
) -> torch.Tensor:
    """k initial centroids (float64, in init order) for the 1-D k-means of ``w`` (Deep Compression Sec. 3.2)."""
    if init not in KMEANS_INITS:
        raise QreproError(f"unknown k-means init {init!r}; choose one of: {', '.join(KMEANS_INITS)}")
    if k < 1:
        raise QreproError(f"k-means needs at least one centroid, got k={k}")
    x = _flat64(w)
    if x.numel() == 0:
        raise QreproError("k-means of an empty weight tensor")
    if init == "linear":
        return torch.linspace(float(x.min()), float(x.max()), k, dtype=torch.float64, device=x.device)
    if init == "density":
        q = (torch.arange(k, dtype=torch.float64, device=x.device) + 0.5) / k
        xs = torch.sort(x).values
        pos = q * (xs.numel() - 1)  # linear interpolation between order statistics (torch.quantile's rule)
        lo = pos.floor().long()
        hi = torch.clamp(lo + 1, max=xs.numel() - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    xc = x.cpu()
    if init == "random":
        idx = torch.randperm(xc.numel(), generator=g)[:k]
        if idx.numel() < k:  # fewer weights than centroids: repeat
            idx = idx[torch.arange(k) % idx.numel()]
        return xc[idx].to(x.device)
    if xc.numel() > KMEANS_PP_SAMPLE:  # seeding cost is k x trials x n: seed on a random sample
        xc = xc[torch.randperm(xc.numel(), generator=g)[:KMEANS_PP_SAMPLE]]
    return _kmeans_pp(xc, k, g).to(x.device)


def _kmeans_pp(x: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    """Greedy k-means++ (Arthur & Vassilvitskii 2007, with 2 + floor(ln k) candidates per centroid as in
    scikit-learn): each new centroid is the candidate, drawn with probability proportional to the squared
    distance to the nearest chosen centroid, that lowers the total squared distance most."""
    n = x.numel()
    trials = 2 + int(math.log(k))
    centers = torch.empty(k, dtype=x.dtype)
    centers[0] = x[torch.randint(n, (1,), generator=g)]
    closest = (x - centers[0]).square()
    pot = closest.sum()
    for c in range(1, k):
        if pot <= 0:  # every weight already sits on a centroid
            centers[c:] = centers[0]
            break
        r = torch.rand(trials, generator=g, dtype=x.dtype) * pot
        cand = torch.clamp(torch.searchsorted(torch.cumsum(closest, 0), r), max=n - 1)
        d = torch.minimum(closest[None, :], (x[None, :] - x[cand][:, None]).square())
        best = int(torch.argmin(d.sum(1)))
        centers[c], closest = x[cand[best]], d[best]
        pot = closest.sum()
    return centers


def assign(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid for every element of ``x`` (a tie goes to the smaller centroid value)."""
    order = torch.argsort(centroids, stable=True)
    c = centroids[order]
    return order[torch.bucketize(x, 0.5 * (c[1:] + c[:-1]))]


def kmeans_1d(
    w: torch.Tensor, centroids: torch.Tensor, max_iter: int = 50, tol: float = 1e-4
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Lloyd's algorithm on the elements of ``w`` from the initial ``centroids`` (float64).

    Returns (centroids, labels shaped like ``w``, iterations run). Stopping as scikit-learn's KMeans: labels
    unchanged, or summed squared centroid shift <= ``tol`` x var(w); then a final assignment. In 1-D a cluster is
    a run of the sorted weights, so each iteration needs only the k - 1 split points (binary search on the
    midpoints) and prefix sums: O(k log n) per iteration after one sort.
    """
    if max_iter < 1:
        raise QreproError(f"k-means max_iter must be >= 1, got {max_iter}")
    x = _flat64(w)
    xs = torch.sort(x).values
    prefix = torch.cat([xs.new_zeros(1), torch.cumsum(xs, 0)])
    n = xs.numel()
    c = centroids.detach().to(device=x.device, dtype=torch.float64).clone()
    tol_abs = float(x.var(unbiased=False)) * tol
    prev, it = None, 0
    while it < max_iter:
        it += 1
        order = torch.argsort(c, stable=True)
        cs = c[order]
        # cluster order[j] holds xs[edges[j]:edges[j+1]] (x <= midpoint goes to the smaller centroid)
        splits = torch.searchsorted(xs, 0.5 * (cs[1:] + cs[:-1]), right=True)
        edges = torch.cat([splits.new_zeros(1), splits, splits.new_full((1,), n)])
        counts = (edges[1:] - edges[:-1]).to(x.dtype)
        sums = prefix[edges[1:]] - prefix[edges[:-1]]
        lo = xs[edges[:-1].clamp(max=n - 1)]
        hi = xs[(edges[1:] - 1).clamp(min=0)]
        # a mean lies within its members' range (exact for a cluster of equal weights, which prefix sums are not)
        mean = torch.minimum(torch.maximum(sums / counts.clamp_min(1), lo), hi)
        new_sorted = torch.where(counts > 0, mean, cs)
        new = torch.empty_like(c)
        new[order] = new_sorted
        shift = float((new - c).square().sum())
        c = new
        # stop when the clusters are those of the previous iteration (labels unchanged) or the shift is small
        if (prev is not None and torch.equal(order, prev[0]) and torch.equal(splits, prev[1])) or shift <= tol_abs:
            break
        prev = (order, splits)
    labels = assign(x, c)
    return c, labels.reshape(w.shape), it


def centroid_grad_scale(labels: torch.Tensor, k: int, mode: str) -> torch.Tensor:
    """Per-centroid factor on the summed member gradients: 1 (``sum``, Eq. 3) or 1/|cluster| (``mean``)."""
    if mode not in CENTROID_GRADS:
        raise QreproError(f"unknown centroid_grad {mode!r}; choose one of: {', '.join(CENTROID_GRADS)}")
    if mode == "sum":
        return torch.ones(k, dtype=torch.float64, device=labels.device)
    counts = torch.bincount(labels.reshape(-1), minlength=k).to(torch.float64)
    return 1.0 / counts.clamp_min(1)


class _SharedWeights(torch.autograd.Function):
    """W = C[labels]; dL/dC_k = scale_k · sum_{i: labels_i = k} dL/dW_i (Deep Compression Eq. 3 for scale 1).
    No gradient reaches the labels (fixed assignments)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(centroids: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return centroids[labels]

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        centroids, labels, scale = inputs
        ctx.save_for_backward(labels, scale)
        ctx.k = centroids.shape[0]

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        labels, scale = ctx.saved_tensors
        gc = torch.zeros(ctx.k, dtype=g.dtype, device=g.device).index_add_(0, labels.reshape(-1), g.reshape(-1))
        return gc * scale.to(g.dtype), None, None


def shared_weights(centroids: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The effective weights ``centroids[labels]`` with the centroid gradient of :class:`_SharedWeights`."""
    return _SharedWeights.apply(centroids, labels, scale)


# ------------------------------------------------------------------------------------ HAQ linear quantizer
def linear_weight(w: torch.Tensor, threshold: torch.Tensor, bits: int) -> torch.Tensor:
    """round(clip(w, -t, t)/s)·s with s = t/(2^(b-1) - 1); gradient 1 w.r.t. w everywhere (HAQ's STE)."""
    t = threshold.detach().to(w.dtype)
    s = t / (2.0 ** (bits - 1) - 1.0)
    q = torch.round(torch.minimum(torch.maximum(w, -t), t) / s) * s
    return w + (q - w).detach()


def linear_act(x: torch.Tensor, alpha: torch.Tensor, levels: torch.Tensor, signed: torch.Tensor) -> torch.Tensor:
    """HAQ's activation quantizer. ``signed`` is 0 (half wave: clip to [0, a]) or 1 (clip to [-a, a]);
    ``levels`` = 2^b - 1 (unsigned) or 2^(b-1) - 1 (signed). The clip is written with |·| as the authors', so
    its gradient is 1/2 at the clip points."""
    a = alpha.to(x.dtype)
    sg = signed.to(x.dtype)
    # (|x + a| - |x - a|)/2 when signed, (|x| + a - |x - a|)/2 when not: one expression, scalar coefficients
    xc = 0.5 * ((x + sg * a).abs() + (1 - sg) * a - (x - a).abs())
    s = a.detach() / levels.to(x.dtype)
    q = torch.round(xc.detach() / s) * s
    return xc + (q - xc).detach()


def kl_threshold(data: torch.Tensor | np.ndarray, bits: int) -> float:
    """HAQ's calibration threshold for b < 5 bits: over a histogram of |data| (``sqrt`` bins on [0, max|data|]),
    the bin edge i + 1/2 (i > 2^(b-1)) whose 2^(b-1)-level coarsening of the cumulative histogram differs least,
    by the symmetric (J) divergence sum (P - Q) log2(P / Q) of the cumulative distributions, from the original.
    Evaluated in float64 with numpy, as the authors compute it (including their NaN/inf handling: ``argmin``
    returns the first NaN)."""
    a = np.abs(data.detach().cpu().double().numpy() if isinstance(data, torch.Tensor) else np.asarray(data, np.float64))
    mx = a.max()
    if np.isclose(mx, 0.0):
        return 0.0
    hist, edges = np.histogram(a, bins="sqrt", range=(0.0, mx), density=True)
    hist = hist / np.sum(hist)
    cdf = np.cumsum(hist)
    n = 2 ** (int(bits) - 1)
    if n + 1 > len(edges) - 1:
        return float(edges[-1])
    width = edges[1] - edges[0]
    coarse = np.linspace(0.0, 1.0, n)
    divergences, thresholds = [], []
    with np.errstate(divide="ignore", invalid="ignore"):
        for i in range(n + 1, len(edges)):
            p = cdf.copy()
            p[i - 1 :] = 1
            fine = np.linspace(0.0, 1.0, i)
            q = p.copy()
            q[:i] = np.interp(fine, coarse, np.interp(coarse, fine, p[:i]))
            divergences.append(np.sum((cdf - q) * np.log2(cdf / q)))
            thresholds.append((i + 0.5) * width)
    return float(thresholds[int(np.argmin(divergences))])


def weight_threshold(w: torch.Tensor, bits: int) -> float:
    """HAQ's calibrated weight range t: the KL threshold below 5 bits, else max|w|."""
    return kl_threshold(w, bits) if bits < 5 else float(w.detach().abs().max())


def act_range(x: torch.Tensor, eff_bits: int, init_range: float = ACT_INIT_RANGE) -> float:
    """HAQ's calibrated activation range: min(6, max|x|), and also at most the KL threshold below 5 effective
    bits (b_a for an unsigned input, b_a - 1 for a signed one)."""
    r = min(init_range, float(x.detach().abs().max()))
    return min(r, kl_threshold(x, eff_bits)) if eff_bits < 5 else r
