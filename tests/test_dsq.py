"""DSQ (Gong et al., ICCV 2019): the soft staircase Q_S (Eq. 3-5) and alpha <-> k (Eq. 6) in value, its exact
gradients for x, l, u and alpha against finite differences (float64), the hard staircase, clipping bounds, the
alpha projection hook and the method's policy."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from qrepro.errors import QreproError
from qrepro.hooks import Context
from qrepro.quant import build_method, dsq, prepare
from qrepro.quant.layers import quantized_layers
from qrepro.quant.methods.dsq import DSQAlpha, DSQInit, DSQQuantizer

D = torch.float64


def _t(v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=D, requires_grad=True)


def _paper(x: float, l: float, u: float, alpha: float, bits: int) -> float:
    """Eq. 3-6 written out for one value."""
    n = 2**bits - 1
    delta = (u - l) / n
    if x <= l:
        return l
    if x >= u:
        return u
    i = min(int(math.floor((x - l) / delta)), n - 1)
    m = l + (i + 0.5) * delta
    k = math.log(2 / alpha - 1) / delta
    s = 1 / math.tanh(0.5 * k * delta)
    phi = s * math.tanh(k * (x - m))
    return l + delta * (i + (phi + 1) / 2)


@pytest.mark.parametrize("bits,alpha", [(1, 0.2), (2, 0.2), (3, 0.05), (4, 0.45)])
def test_soft_staircase_matches_equations(bits, alpha):
    l, u = -0.7, 1.3
    xs = torch.linspace(-1.5, 2.0, 301, dtype=D)
    got = dsq.soft_quantize(xs, _t(l), _t(u), _t(alpha), bits)
    expect = torch.tensor([_paper(float(x), l, u, alpha, bits) for x in xs], dtype=D)
    torch.testing.assert_close(got, expect, rtol=1e-12, atol=1e-12)


def test_alpha_k_relation_and_limits():
    delta = 0.25
    for alpha in (0.01, 0.2, 0.5, 0.9):
        k = dsq.k_from_alpha(alpha, delta)
        assert 1 - math.tanh(0.5 * k * delta) == pytest.approx(alpha)
    # continuity at every interval edge and the ends; centres are fixed points
    l, u, bits = _t(0.0), _t(3.0), 2
    edges = torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=D)
    for eps in (1e-9, -1e-9):
        torch.testing.assert_close(dsq.soft_quantize(edges + eps, l, u, _t(0.3), bits), edges, atol=1e-7, rtol=0)
    centres = torch.tensor([0.5, 1.5, 2.5], dtype=D)
    torch.testing.assert_close(dsq.soft_quantize(centres, l, u, _t(0.3), bits), centres)
    # alpha -> 0: the hard staircase (round to the nearest level)
    x = torch.tensor([0.15, 0.85, 1.9, 2.8], dtype=D)  # >= 0.3 from a centre: k = ln(2e12) ~ 28.3
    torch.testing.assert_close(dsq.soft_quantize(x, l, u, _t(1e-12), bits), torch.round(x), atol=1e-6, rtol=0)


def test_gradients_finite_differences():
    """Exact gradients of Q_S for x, l, u, alpha (points inside intervals, away from edges)."""
    x = torch.tensor([-0.5, 0.13, 0.41, 0.77, 1.05], dtype=D, requires_grad=True)
    args = (x, _t(-0.6), _t(1.2), _t(0.3))
    assert torch.autograd.gradcheck(lambda x, l, u, a: dsq.soft_quantize(x, l, u, a, 2), args)
    # parameters broadcast against x (a range per row, alpha per column): each summed over its broadcast
    x2 = torch.tensor([[-0.5, 0.13, 0.41], [0.77, 1.05, 2.0]], dtype=D, requires_grad=True)
    lo, hi = torch.tensor([[-0.6], [0.1]], dtype=D), torch.tensor([[1.2], [1.5]], dtype=D)
    a2 = torch.tensor([0.3, 0.1, 0.45], dtype=D)
    args2 = (x2, lo.requires_grad_(), hi.requires_grad_(), a2.requires_grad_())
    assert torch.autograd.gradcheck(lambda x, l, u, a: dsq.soft_quantize(x, l, u, a, 2), args2)


def test_clipped_values_send_gradient_to_bounds():
    x = torch.tensor([-2.0, 3.0], dtype=D, requires_grad=True)
    l, u, a = _t(-1.0), _t(1.0), _t(0.2)
    y = dsq.soft_quantize(x, l, u, a, 2)
    # the clipped ends to float64 rounding (Q_S is written as l + Delta (...), not as a branch per region)
    torch.testing.assert_close(y, torch.tensor([-1.0, 1.0], dtype=D), rtol=0, atol=4e-16)
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 0.0]
    assert float(l.grad) == pytest.approx(1.0) and float(u.grad) == pytest.approx(1.0)


def test_hard_staircase_values_and_soft_gradient():
    l, u, a = _t(0.0), _t(3.0), _t(0.2)
    x = torch.tensor([-1.0, 0.2, 0.5, 0.51, 1.49, 2.9, 4.0], dtype=D, requires_grad=True)
    y = dsq.hard_quantize(x, l, u, a, 2)
    assert y.tolist() == [0.0, 0.0, 1.0, 1.0, 1.0, 3.0, 3.0]  # nearest level, a tie (0.5) goes up
    y.sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    l2, u2, a2 = _t(0.0), _t(3.0), _t(0.2)
    dsq.soft_quantize(x2, l2, u2, a2, 2).sum().backward()
    for p, q in ((x, x2), (l, l2), (u, u2), (a, a2)):
        torch.testing.assert_close(p.grad, q.grad)


def test_quantizer_soft_in_training_hard_in_eval():
    q = DSQQuantizer(2, lower=0.0, upper=3.0, alpha=0.4).double()
    x = torch.tensor([0.3, 1.2, 2.2], dtype=D)
    soft = q(x)
    assert not torch.equal(soft, torch.round(x))
    q.eval()
    assert torch.equal(q(x), torch.round(x))
    qh = DSQQuantizer(2, lower=0.0, upper=3.0, alpha=0.4, train_forward="hard").double()
    assert torch.equal(qh(x), torch.round(x))


def test_hooks_and_policy():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16, 2))
    m = build_method("dsq", 3, 4)
    model = prepare(net, m)
    layers = dict(quantized_layers(model))
    assert set(layers) == {"2"}
    layer = layers["2"]
    assert layer.aq.lower.item() == 0.0 and layer.aq.upper.item() == 4.0 and layer.aq.alpha.item() == pytest.approx(0.2)
    init, proj = m.hooks
    assert isinstance(init, DSQInit) and isinstance(proj, DSQAlpha)
    init.on_train_start(Context(model=model))
    mx = float(layer.weight.detach().abs().max())
    assert (layer.wq.lower.item(), layer.wq.upper.item()) == pytest.approx((-mx, mx))
    with torch.no_grad():
        layer.wq.alpha.fill_(0.9)
        layer.aq.alpha.fill_(-0.1)
    proj.on_step_end(Context(model=model), 1)
    assert layer.wq.alpha.item() == pytest.approx(0.5) and layer.aq.alpha.item() == pytest.approx(1e-3)
    assert proj.on_epoch_end(Context(model=model), 0)["dsq_alpha_mean"] == pytest.approx((0.5 + 1e-3) / 2)
    with pytest.raises(QreproError, match="alpha"):
        build_method("dsq", 2, 2, alpha_init=0.7)
    with pytest.raises(QreproError, match="train_forward"):
        build_method("dsq", 2, 2, train_forward="sign")
