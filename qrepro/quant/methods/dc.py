"""``quantizer=dc``: Deep Compression's trained quantization (Han, Mao & Dally, ICLR 2016, Sec. 3), weight-only;
see docs/haq.md.

Every Conv2d/Linear weight, the first and last layer included (as HAQ's code runs its k-means baseline; ``first_last:
fp`` keeps those two in full precision), is replaced by 2^b shared values: :class:`KMeansWeightQuantizer` holds the
centroids (tag ``centroids``), the fixed cluster index of every weight and each centroid's gradient factor. The
k-means runs once, at the start of training (:class:`KMeansInit`); the ``initialized`` buffer in a checkpoint
keeps a resumed run from clustering again. The layer's FP ``weight`` is unused while the quantizer is in place.
Pruning is not part of it. Maths: ``qrepro.quant.kmeans``.
"""

from __future__ import annotations

import torch
from torch import nn

from qrepro.errors import QreproError
from qrepro.hooks import Context, Hook
from qrepro.quant import kmeans as km
from qrepro.quant.layers import quantized_layers
from qrepro.quant.methods import FP_BITS, METHODS, LayerInfo, Method, builder_options, check_choice

SUPPORTED_W_BITS = (1, 2, 3, 4, 5, 6, 7, 8)
FIRST_LAST = ("same", "fp")


class KMeansWeightQuantizer(nn.Module):
    """W = C[labels] with fixed labels; the centroid gradient is ``scale`` x the sum of its members' gradients."""

    param_tags = {"centroids": "centroids"}

    def __init__(
        self,
        bits: int,
        init: str = "linear",
        centroid_grad: str = "sum",
        max_iter: int = 50,
        tol: float = 1e-4,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if bits not in SUPPORTED_W_BITS:
            raise QreproError(f"k-means weight sharing supports 1..8 bits, got {bits}")
        if init not in km.KMEANS_INITS:
            raise QreproError(f"unknown k-means init {init!r}; choose one of: {', '.join(km.KMEANS_INITS)}")
        if centroid_grad not in km.CENTROID_GRADS:
            raise QreproError(f"unknown centroid_grad {centroid_grad!r}; choose one of: {', '.join(km.CENTROID_GRADS)}")
        self.bits, self.init, self.centroid_grad = bits, init, centroid_grad
        self.max_iter, self.tol, self.seed = max_iter, tol, seed
        k = 2**bits
        self.centroids = nn.Parameter(torch.zeros(k))
        self.register_buffer("labels", torch.zeros(0, dtype=torch.long))
        self.register_buffer("grad_scale", torch.ones(k))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def bind(self, layer: nn.Module) -> None:
        w = layer.weight  # type: ignore[attr-defined]
        self.labels = torch.zeros(w.shape, dtype=torch.long, device=w.device)
        self.centroids.data = self.centroids.data.to(device=w.device, dtype=w.dtype)
        self.grad_scale = self.grad_scale.to(device=w.device, dtype=w.dtype)

    @torch.no_grad()
    def cluster(self, w: torch.Tensor, generator: torch.Generator | None = None) -> int:
        """k-means of ``w`` (float64): sets centroids, labels and gradient factors; returns the iterations run."""
        k = min(2**self.bits, w.numel())
        g = generator if generator is not None else torch.Generator().manual_seed(self.seed)
        c0 = km.init_centroids(w, k, self.init, g)
        c, labels, it = km.kmeans_1d(w, c0, self.max_iter, self.tol)
        full = torch.zeros_like(self.centroids, dtype=torch.float64)
        full[:k] = c
        full[k:] = c[-1]  # fewer weights than centroids: the spare centroids hold no weight
        self.centroids.copy_(full)
        self.labels.copy_(labels)
        self.grad_scale.copy_(km.centroid_grad_scale(labels, self.centroids.numel(), self.centroid_grad))
        self.initialized.fill_(True)
        return it

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return km.shared_weights(self.centroids.to(w.dtype), self.labels, self.grad_scale)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, init={self.init}, centroid_grad={self.centroid_grad}, max_iter={self.max_iter}"


class KMeansInit(Hook):
    """Cluster every not yet initialised :class:`KMeansWeightQuantizer` on its layer's weights (training start)."""

    def on_train_start(self, ctx: Context) -> None:
        cluster_model(ctx.model)


@torch.no_grad()
def cluster_model(model: nn.Module) -> int:
    """Run the k-means of every uninitialised k-means quantizer of ``model``; returns how many ran."""
    n = 0
    for i, (_, layer) in enumerate(quantized_layers(model)):
        wq = layer.wq
        if isinstance(wq, KMeansWeightQuantizer) and not bool(wq.initialized):
            wq.cluster(layer.weight, torch.Generator().manual_seed(wq.seed + i))
            n += 1
    return n


@METHODS.register("dc")
def build_dc(
    w_bits: int,
    a_bits: int,
    *,
    init: str = "linear",
    centroid_grad: str = "sum",
    max_iter: int = 50,
    tol: float = 1e-4,
    first_last: str = "same",
    seed: int = 0,
) -> Method:
    """Deep Compression k-means weight sharing at ``w_bits`` for every layer; weight-only (``a_bits`` = 32)."""
    options = builder_options(locals())
    if w_bits not in SUPPORTED_W_BITS:
        raise QreproError(f"quantizer=dc supports 1..8 weight bits, got w_bits={w_bits}; e.g. precision=w4a32")
    if a_bits != FP_BITS:
        raise QreproError(f"quantizer=dc quantizes weights only (got a_bits={a_bits}); use precision=w{w_bits}a32")
    check_choice("first_last", first_last, FIRST_LAST, "dc")
    KMeansWeightQuantizer(w_bits, init, centroid_grad, max_iter, tol, seed)  # validates the options

    def quantize_layer(info: LayerInfo) -> tuple[nn.Module | None, nn.Module | None] | None:
        if first_last == "fp" and info.role in ("first", "last"):
            return None
        return KMeansWeightQuantizer(info.w_bits, init, centroid_grad, max_iter, tol, seed), None

    return Method(name="dc", quantize_layer=quantize_layer, hooks=[KMeansInit()], options=options)
