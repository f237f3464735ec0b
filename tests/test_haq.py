"""Deep Compression k-means weight sharing and HAQ (quantizers, policies), in float64 against the equations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from qrepro.errors import QreproError
from qrepro.models import build_model
from qrepro.quant import build_method, prepare
from qrepro.quant import kmeans as km
from qrepro.quant.haq_policies import POLICIES
from qrepro.quant.layers import quantized_layers
from qrepro.quant.methods.dc import KMeansWeightQuantizer, cluster_model
from qrepro.quant.methods.haq import HAQActQuantizer, HAQWeightQuantizer, calibrate_model

D = torch.float64


def _w(n=4000, seed=0):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=D) * 0.05


# ------------------------------------------------------------------------------------------------ k-means
def test_linear_init_spans_min_to_max_and_density_init_follows_the_quantiles():
    w = _w()
    c = km.init_centroids(w, 8, "linear")
    assert torch.allclose(c, torch.linspace(float(w.min()), float(w.max()), 8, dtype=D), rtol=0, atol=0)
    d = km.init_centroids(w, 4, "density")
    assert torch.allclose(d, torch.quantile(w, torch.tensor([0.125, 0.375, 0.625, 0.875], dtype=D)), atol=1e-15)
    r = km.init_centroids(w, 8, "random", torch.Generator().manual_seed(1))
    assert all(bool((w == v).any()) for v in r)  # Forgy: centroids are weights
    p = km.init_centroids(w, 8, "kmeans++", torch.Generator().manual_seed(1))
    assert all(bool((w == v).any()) for v in p) and p.unique().numel() == 8


def test_kmeans_is_a_lloyd_fixed_point_and_assigns_the_nearest_centroid():
    w = _w().reshape(40, 100)
    c, labels, it = km.kmeans_1d(w, km.init_centroids(w, 8, "linear"), max_iter=300, tol=0.0)
    assert labels.shape == w.shape and it < 300
    dist = (w.reshape(-1, 1) - c.reshape(1, -1)).abs()
    assert torch.equal(labels.reshape(-1), dist.argmin(1))
    for k in range(8):  # each centroid is the mean of its members (Lloyd converged)
        assert torch.allclose(c[k], w[labels == k].mean(), rtol=1e-13, atol=0)


def test_kmeans_matches_scikit_learn_from_the_same_init():
    cluster = pytest.importorskip("sklearn.cluster")
    w = _w(5000, seed=3)
    c0 = km.init_centroids(w, 16, "linear")
    c, labels, it = km.kmeans_1d(w, c0, max_iter=50, tol=1e-4)
    ref = cluster.KMeans(16, init=c0.numpy().reshape(-1, 1), n_init=1, max_iter=50, tol=1e-4).fit(
        w.numpy().reshape(-1, 1)
    )
    assert it == ref.n_iter_
    assert torch.equal(labels, torch.from_numpy(ref.labels_).long())
    assert torch.allclose(c, torch.from_numpy(ref.cluster_centers_.ravel()), rtol=0, atol=1e-14)


def test_kmeans_edge_cases_constant_weights_and_fewer_values_than_centroids():
    const = torch.full((10, 10), 0.3, dtype=D)
    for init in km.KMEANS_INITS:
        c, labels, _ = km.kmeans_1d(const, km.init_centroids(const, 4, init))
        assert torch.equal(c[labels], const)
    three = torch.tensor([-1.0, 0.0, 2.0] * 5, dtype=D)
    c, labels, _ = km.kmeans_1d(three, km.init_centroids(three, 8, "linear"))
    assert torch.equal(c[labels], three)  # exact: every distinct value is its own cluster
    assert labels.unique().numel() == 3  # the other 5 clusters stay empty (and keep their centroids)
    # fewer weights than centroids (a 1x1 conv with 2 weights at 2 bits): k is capped, spare centroids unused
    q = KMeansWeightQuantizer(2)
    lin = nn.Linear(2, 1, bias=False).double()
    q.bind(lin)
    q.double()
    q.cluster(lin.weight)
    assert torch.equal(q(lin.weight), lin.weight.detach())


def test_centroid_gradient_is_the_sum_of_its_members_gradients_or_their_mean():
    w = _w(600).reshape(20, 30)
    c, labels, _ = km.kmeans_1d(w, km.init_centroids(w, 4, "linear"))
    g = torch.randn(w.shape, dtype=D, generator=torch.Generator().manual_seed(5))
    for mode in km.CENTROID_GRADS:
        cc = c.clone().requires_grad_(True)
        out = km.shared_weights(cc, labels, km.centroid_grad_scale(labels, 4, mode))
        assert torch.equal(out.detach(), c[labels])
        (out * g).sum().backward()
        for k in range(4):
            member = g[labels == k]
            want = member.sum() if mode == "sum" else member.mean()
            assert torch.allclose(cc.grad[k], want, rtol=1e-13, atol=1e-15), (mode, k)


def test_finetuning_keeps_assignments_and_mean_mode_equals_the_authors_average_after_step():
    """HAQ's code steps every weight with SGD (momentum, weight decay) and then replaces each cluster by its mean;
    that equals SGD on the centroids with the mean of the member gradients (centroid_grad=mean)."""
    torch.manual_seed(0)
    lin = nn.Linear(12, 5).double()
    x = torch.randn(16, 12, dtype=D)
    y = torch.randn(16, 5, dtype=D)
    q = KMeansWeightQuantizer(2, init="linear", centroid_grad="mean")
    q.bind(lin)
    q.double()
    q.cluster(lin.weight)
    labels0 = q.labels.clone()
    # the authors' way on a copy: weights start at their centroids, SGD step, then the cluster means
    w_ref = q.centroids.detach()[q.labels].clone().requires_grad_(True)
    b_ref = lin.bias.detach().clone().requires_grad_(True)
    opt_ref = torch.optim.SGD([w_ref, b_ref], lr=0.1, momentum=0.9, weight_decay=1e-2)
    opt = torch.optim.SGD([q.centroids, lin.bias], lr=0.1, momentum=0.9, weight_decay=1e-2)
    for _ in range(5):
        opt.zero_grad()
        nn.functional.mse_loss(nn.functional.linear(x, q(lin.weight), lin.bias), y).backward()
        opt.step()
        opt_ref.zero_grad()
        nn.functional.mse_loss(nn.functional.linear(x, w_ref, b_ref), y).backward()
        opt_ref.step()
        with torch.no_grad():
            for k in range(4):
                m = (labels0 == k).to(D)
                w_ref.copy_(torch.where(m > 0, (w_ref * m).sum() / m.sum(), w_ref))
    assert torch.equal(q.labels, labels0)  # assignments fixed
    assert lin.weight.grad is None  # the FP weight is not trained while the quantizer is in place
    eff = q(lin.weight).detach()
    assert eff.unique().numel() <= 4
    assert torch.allclose(eff, w_ref.detach(), rtol=0, atol=1e-14)
    assert torch.allclose(lin.bias, b_ref, rtol=0, atol=1e-14)


# ------------------------------------------------------------------------------------------- HAQ linear
def test_haq_weight_quantizer_values_and_straight_through_gradient():
    w = torch.tensor([-0.9, -0.5, -0.26, 0.0, 0.1, 0.24, 0.26, 0.49, 0.8], dtype=D, requires_grad=True)
    t = torch.tensor(0.5, dtype=D)
    out = km.linear_weight(w, t, 3)  # s = 0.5/3
    s = 0.5 / 3
    want = torch.round(w.detach().clamp(-0.5, 0.5) / s) * s
    assert torch.allclose(out, want, rtol=0, atol=1e-15)
    assert out.detach().abs().max() <= 0.5 + 1e-15
    out.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))  # no clip mask (the authors' STE)


@pytest.mark.parametrize("signed", [False, True])
def test_haq_activation_quantizer_values_and_gradients(signed):
    a = torch.tensor(2.0, dtype=D, requires_grad=True)
    x = torch.tensor([-3.0, -2.0, -0.7, 0.0, 0.3, 1.1, 2.0, 2.5], dtype=D, requires_grad=True)
    bits = 3
    levels = torch.tensor(float(2 ** (bits - 1) - 1 if signed else 2**bits - 1), dtype=D)
    out = km.linear_act(x, a, levels, torch.tensor(float(signed), dtype=D))
    lo = -2.0 if signed else 0.0
    s = 2.0 / float(levels)
    assert torch.allclose(out, torch.round(x.detach().clamp(lo, 2.0) / s) * s, rtol=0, atol=1e-15)
    out.sum().backward()
    # d out/dx: 1 strictly inside, 1/2 on a clip point, 0 outside; d out/da: 1 above a (and -1 below -a when
    # signed), 1/2 at x = a (and -1/2 at x = -a)
    xv = x.detach()
    inside = ((xv > lo) & (xv < 2.0)).to(D) + 0.5 * ((xv == lo) | (xv == 2.0)).to(D)
    assert torch.equal(x.grad, inside)
    da = float((xv > 2).sum()) + 0.5 * float((xv == 2).sum())
    if signed:
        da -= float((xv < -2).sum()) + 0.5 * float((xv == -2).sum())
    assert float(a.grad) == pytest.approx(da, abs=1e-15)


def test_kl_threshold_is_a_bin_edge_inside_the_range():
    x = torch.randn(10000, generator=torch.Generator().manual_seed(0), dtype=D)
    t = km.kl_threshold(x, 3)
    mx = float(x.abs().max())
    assert 0 < t <= mx
    edges = np.histogram(x.abs().numpy(), bins="sqrt", range=(0.0, mx))[1]
    width = edges[1] - edges[0]
    assert ((t / width) - 0.5) == pytest.approx(round(t / width - 0.5), abs=1e-6)  # (i + 1/2) bin widths
    assert km.kl_threshold(torch.zeros(10), 3) == 0.0
    assert km.weight_threshold(x, 5) == mx and km.act_range(x, 6) == min(6.0, mx)


# ------------------------------------------------------------------------------------------------ policies
def test_mobilenet_v2_latency_policy_is_applied_layer_by_layer():
    pol = POLICIES["mobilenet_v2_latency_ratio060"]["bits"]
    model = build_model("mobilenet_v2", num_classes=1000)
    convs = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(convs) == len(pol) == 53
    prepare(model, build_method("haq", 32, 32, policy="mobilenet_v2_latency_ratio060"))
    layers = list(quantized_layers(model))
    assert len(layers) == 53
    for (name, layer), (wb, ab) in zip(layers, pol):
        assert isinstance(layer.wq, HAQWeightQuantizer) and layer.wq.bits == wb, name
        if ab < 0:
            assert layer.aq is None, name
        else:
            assert isinstance(layer.aq, HAQActQuantizer) and layer.aq.bits == ab, name
    assert layers[0][1].aq is None and layers[0][1].wq.bits == 8  # first layer: 8-bit weights, input as is
    assert isinstance(layers[-1][1], nn.Linear) and layers[-1][1].wq.bits == 8


def test_calibration_sets_ranges_and_sign_as_the_authors_structure():
    model = build_model("mobilenet_v2", num_classes=10, width_mult=0.25).double()
    prepare(model, build_method("haq", 32, 32, policy="mobilenet_v2_latency_ratio060"))
    model.train()
    x = torch.randn(4, 3, 32, 32, dtype=D)
    assert calibrate_model(model, x) == 53 + 52
    names = {n: m for n, m in quantized_layers(model)}
    # signed inputs: the expansion 1x1 convs of blocks 2..17 and the last 1x1 conv (linear bottleneck outputs)
    signed = sorted(n for n, m in names.items() if m.aq is not None and bool(m.aq.signed))
    assert signed == sorted([f"features.{i}.conv.0.0" for i in range(2, 18)] + ["features.18.0"])
    for m in names.values():
        assert m.wq.threshold.dtype == D and float(m.wq.threshold) == km.weight_threshold(m.weight, m.wq.bits)
        if m.aq is not None:
            assert 0 < float(m.aq.alpha.detach()) <= 6.0
    assert calibrate_model(model, x) == 0  # initialised: a resumed run is not calibrated again
    out = model(x)
    assert torch.isfinite(out).all()


def test_resnet50_kmeans_policy_bits_and_wrong_models_are_refused():
    pol = POLICIES["resnet50_size_ratio010"]["bits"]
    model = build_model("resnet50", num_classes=1000)
    prepare(model, build_method("haq", 32, 32, policy="resnet50_size_ratio010"))
    layers = list(quantized_layers(model))
    assert [layer.wq.bits for _, layer in layers] == pol
    assert all(isinstance(layer.wq, KMeansWeightQuantizer) and layer.aq is None for _, layer in layers)
    assert layers[0][1].wq.centroid_grad == "mean" and layers[0][1].wq.init == "kmeans++"
    with pytest.raises(QreproError, match="published for model=resnet50"):
        prepare(
            build_model("mobilenet_v2", num_classes=1000), build_method("haq", 32, 32, policy="resnet50_size_ratio010")
        )
    with pytest.raises(QreproError, match="unknown HAQ policy"):
        build_method("haq", 32, 32, policy="mobilenet_v1_latency_4bit")


def test_dc_method_is_weight_only_and_quantizes_every_layer():
    with pytest.raises(QreproError, match="precision=w2a32"):
        build_method("dc", 2, 2)
    model = build_model("resnet20", num_classes=10).double()
    prepare(model, build_method("dc", 2, 32))
    layers = list(quantized_layers(model))
    n = sum(1 for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert len(layers) == n and all(layer.aq is None for _, layer in layers)
    assert cluster_model(model) == n
    for _, layer in layers:
        assert layer.effective_weight().unique().numel() <= 4
    fl = build_model("resnet20", num_classes=10)
    prepare(fl, build_method("dc", 3, 32, first_last="fp"))
    assert len(list(quantized_layers(fl))) == n - 2
