"""EWGS: the discretiser (forward and Eq. 4's element-wise gradient scaling), the interval quantizers, the
initialisation and the Hessian-trace δ, in float64."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from qrepro.errors import QreproError
from qrepro.quant import build_method, prepare, quantized_layers
from qrepro.quant import ewgs as F
from qrepro.quant.methods.ewgs import EWGSActQuantizer, EWGSWeightQuantizer, estimate_hessian_deltas, initialize

D = torch.float64


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_discretize_values(bits):
    n = 2**bits
    u = torch.linspace(0, 1, 101, dtype=D)
    q = F.discretize(u, n, 0.0)
    assert torch.equal(q, torch.round(u * (n - 1)) / (n - 1))
    assert set(torch.unique(q * (n - 1)).tolist()) <= set(range(n))


@pytest.mark.parametrize("delta", [0.0, 1e-3, 0.2, 1.0])
def test_discretize_gradient_is_eq4(delta):
    # g_u = g_q·(1 + δ·sign(g_q)·(u − u_q)), elementwise; δ = 0 is the straight-through estimator
    g = torch.Generator().manual_seed(0)
    u = torch.rand(200, dtype=D, generator=g).requires_grad_()
    g_up = torch.randn(200, dtype=D, generator=g)
    g_up[:5] = 0.0  # sign(0) = 0: no scaling, zero gradient
    q = F.discretize(u, 4, delta)
    (q * g_up).sum().backward()
    expected = g_up * (1 + delta * torch.sign(g_up) * (u.detach() - q.detach()))
    torch.testing.assert_close(u.grad, expected, rtol=0, atol=1e-15)
    # larger latent values than their level get larger updates when the gradient is positive (paper Fig. 2)
    if delta > 0:
        above = (u.detach() > q.detach()) & (g_up > 0)
        assert (u.grad[above] > g_up[above]).all()


def test_normalize_gradients_and_clipping_boundaries():
    x = torch.tensor([-2.0, -1.0, 0.0, 0.5, 3.0, 4.0], dtype=D, requires_grad=True)
    lo = torch.tensor(-1.0, dtype=D, requires_grad=True)
    hi = torch.tensor(3.0, dtype=D, requires_grad=True)
    y = F.normalize(x, lo, hi)
    torch.testing.assert_close(y.detach(), torch.tensor([0, 0, 0.25, 0.375, 1, 1], dtype=D))
    y.sum().backward()
    # 1/(u − l) strictly inside, 0 outside; at x = l, x = u exactly: torch.clamp's choice, as the authors' .clamp
    torch.testing.assert_close(x.grad[[0, 2, 3, 5]], torch.tensor([0, 0.25, 0.25, 0], dtype=D))
    x2 = x.detach().clone().requires_grad_()
    ((x2 + 1) / 4).clamp(min=0, max=1).sum().backward()
    assert torch.equal(x.grad, x2.grad)
    # d/dl ((x − l)/(u − l)) = (x − u)/(u − l)², d/du = −(x − l)/(u − l)², summed over the points passed through
    inside = x.detach()[x2.grad > 0]
    torch.testing.assert_close(lo.grad, ((inside - 3) / 16).sum())
    torch.testing.assert_close(hi.grad, (-(inside + 1) / 16).sum())


def test_weight_levels_symmetric_and_binary():
    w = torch.linspace(-1, 1, 41, dtype=D)
    lo, hi = torch.tensor(-0.5, dtype=D), torch.tensor(0.5, dtype=D)
    assert set(F.quantize_weight(w, lo, hi, 1, 0.0).tolist()) == {-1.0, 1.0}
    q2 = F.quantize_weight(w, lo, hi, 2, 0.0)
    torch.testing.assert_close(torch.unique(q2), torch.tensor([-1, -1 / 3, 1 / 3, 1], dtype=D))
    a = F.quantize_activation(w, torch.tensor(0.0, dtype=D), hi, 2, 0.0)
    assert a.min() == 0 and a.max() == 1


def test_bits_and_options_are_checked():
    with pytest.raises(QreproError):
        F.levels(9)
    with pytest.raises(QreproError, match="delta"):
        build_method("ewgs", 2, 2, delta=-1.0)
    with pytest.raises(QreproError, match="not supported"):
        build_method("ewgs", 9, 2)


def test_output_scale_multiplies_the_whole_output_bias_included():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, bias=True).double()
    model = nn.Sequential(nn.Conv2d(3, 3, 1), conv, nn.Flatten(), nn.Linear(4 * 6 * 6, 2)).double()
    prepare(model, build_method("ewgs", 2, 2, use_hessian=False))
    layer = model[1]
    assert isinstance(layer.wq, EWGSWeightQuantizer) and isinstance(layer.aq, EWGSActQuantizer)
    assert type(model[0]) is nn.Conv2d and type(model[3]) is nn.Linear  # first and last layers stay FP
    x = torch.randn(2, 3, 8, 8, dtype=D)
    assert initialize(model, x) == 1
    with torch.no_grad():
        layer.wq.output_scale.fill_(-1.7)  # |α| is used
        xin = model[0](x)
        ref = nn.functional.conv2d(layer.aq(xin), layer.wq.quantize(layer.weight), layer.bias) * 1.7
        torch.testing.assert_close(layer(xin), ref)


def test_initialisation_is_the_authors_and_restores_buffers():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, bias=False),
        nn.Flatten(),
        nn.Linear(64, 2),
    ).double()
    prepare(model, build_method("ewgs", 3, 3, use_hessian=False))
    x = torch.randn(4, 3, 8, 8, dtype=D)
    bn_before = model[1].running_mean.clone()
    initialize(model, x)
    assert torch.equal(model[1].running_mean, bn_before)
    layer = model[3]
    s = 3 * float(layer.weight.detach().std())
    assert float(layer.wq.lower) == pytest.approx(-s) and float(layer.wq.upper) == pytest.approx(s)
    with torch.no_grad():
        model.train()
        xin = model[2](model[1](model[0](x)))
        assert float(layer.aq.lower) == pytest.approx(float(xin.min()))
        assert float(layer.aq.upper) == pytest.approx(float(xin.std()) / math.sqrt(1 - 2 / math.pi) * 3)
        out = nn.functional.conv2d(xin, layer.weight)
        q_out = nn.functional.conv2d(layer.aq(xin), layer.wq.quantize(layer.weight))
        assert float(layer.wq.output_scale) == pytest.approx(float(out.abs().mean() / q_out.abs().mean()))
    assert initialize(model, x) == 0  # once only (resume keeps the checkpoint's values)


def test_hutchinson_is_exact_for_a_diagonal_hessian():
    a = torch.tensor([1.0, -2.0, 3.5, 0.25], dtype=D)
    p = torch.randn(4, dtype=D, requires_grad=True)
    (grad,) = torch.autograd.grad((0.5 * a * p**2).sum(), p, create_graph=True)
    samples = F.hutchinson_trace([grad], [p], generator=torch.Generator().manual_seed(0))
    assert samples[0] == pytest.approx(float(a.sum()))
    assert len(samples) == 2  # the running mean stopped changing (relative tol 1e-3)
    g = torch.tensor([1.0, -1.0, 2.0, 0.0], dtype=D)
    assert F.hessian_delta(2.75, 4, g) == pytest.approx(2.75 / 4 / (3 * float(g.std())))


def test_hessian_deltas_are_set_clipped_at_zero_and_leave_no_state():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 1),
        nn.Flatten(),
        nn.Linear(64, 3),
    ).double()
    prepare(model, build_method("ewgs", 2, 2))
    x, y = torch.randn(6, 3, 8, 8, dtype=D), torch.randint(0, 3, (6,))
    initialize(model, x)
    before = {k: v.clone() for k, v in model.named_buffers() if "running" in k}
    d = estimate_hessian_deltas(model, [(x, y), (x.flip(0), y.flip(0))], max_iter=8)
    layers = [lay for _, lay in quantized_layers(model) if lay.wq is not None]
    assert len(d["act"]) == len(d["weight"]) == len(layers) == 2
    assert all(v >= 0 for v in d["act"] + d["weight"])
    for lay, da, dw in zip(layers, d["act"], d["weight"]):
        assert float(lay.aq.delta) == pytest.approx(da) and float(lay.wq.delta) == pytest.approx(dw)
        assert not lay.aq.retain and lay.aq.captured is None
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, dict(model.named_buffers())[k]) for k, v in before.items())


def test_output_scale_of_a_degenerate_batch_stays_finite():
    # 1-bit inputs all below (l + u)/2 give a zero quantized output: α = 1 instead of mean|out|/0 = inf
    model = nn.Sequential(nn.Conv2d(1, 1, 1), nn.Conv2d(1, 1, 1, bias=False), nn.Flatten(), nn.Linear(4, 2)).double()
    prepare(model, build_method("ewgs", 1, 1, use_hessian=False))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[0].bias.fill_(0.0)
    x = torch.tensor([0.0, 0.0, 0.0, 0.01], dtype=D).view(1, 1, 2, 2)  # u = 3·std/0.6 > 2·max: all round to 0
    initialize(model, x)
    assert float(model[1].wq.output_scale) == 1.0


def test_degenerate_intervals_get_a_positive_width():
    assert F.init_activation_interval(torch.zeros(2, 3, dtype=D)) == (0.0, 1.0)
    assert F.init_weight_interval(torch.full((4,), 0.3, dtype=D)) == (0.0, 1.0)
    lo, hi = F.init_activation_interval(torch.tensor([0.0, 1.0, 2.0], dtype=D))
    assert lo == 0.0 and hi == pytest.approx(3.0 / math.sqrt(1 - 2 / math.pi))
