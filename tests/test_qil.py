"""QIL (Jung et al., CVPR 2019): transformer (Eq. 2/4) and discretizer (Eq. 3) values, gradients of c, d and
gamma against finite differences (float64), pruning/clipping boundaries, the method's policy and init hook."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from qrepro.errors import QreproError
from qrepro.hooks import Context
from qrepro.quant import build_method, prepare, qil
from qrepro.quant.layers import quantized_layers
from qrepro.quant.methods.qil import QILActQuantizer, QILInit, QILWeightQuantizer

D = torch.float64


def _t(v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=D, requires_grad=True)


def _paper_weight(w: float, c: float, d: float, gamma: float) -> float:
    """Eq. 2 written out: 0 below c - d, sign(w) above c + d, sign(w) (alpha |w| + beta)^gamma inside."""
    a, b = 0.5 / d, -0.5 * c / d + 0.5
    if abs(w) < c - d:
        return 0.0
    if abs(w) > c + d:
        return math.copysign(1.0, w)
    return math.copysign((a * abs(w) + b) ** gamma, w) if w != 0 else 0.0


@pytest.mark.parametrize("gamma", [0.5, 1.0, 2.0])
def test_weight_transform_matches_eq2(gamma):
    c, d = 0.4, 0.25
    ws = torch.linspace(-1.0, 1.0, 201, dtype=D)
    got = qil.weight_transform(ws, _t(c), _t(d), _t(gamma))
    expect = torch.tensor([_paper_weight(float(w), c, d, gamma) for w in ws], dtype=D)
    torch.testing.assert_close(got, expect, rtol=1e-12, atol=1e-14)


def test_discretizer_and_levels():
    c, d, g = _t(0.5), _t(0.5), _t(1.0)  # interval [0, 1]: w_hat = w
    w = torch.tensor([-1.2, -0.6, -0.2, 0.0, 0.16, 0.5, 0.84, 1.0], dtype=D)
    # 3 bits: q_D = 3, levels {0, +-1/3, +-2/3, +-1}
    out = qil.quantize_weight(w, c, d, g, 3)
    assert (out * 3).tolist() == pytest.approx([-3, -2, -1, 0, 0, 2, 3, 3])
    # 2 bits: ternary
    assert set(qil.quantize_weight(torch.linspace(-2, 2, 41, dtype=D), c, d, g, 2).tolist()) == {-1.0, 0.0, 1.0}
    x = torch.tensor([-1.0, 0.0, 0.3, 0.5, 1.0, 3.0], dtype=D)
    ca, da = _t(1.0), _t(1.0)  # interval [0, 2]
    # 2-bit activations: q_D = 3 on x/2
    assert (qil.quantize_act(x, ca, da, 2) * 3).tolist() == pytest.approx([0, 0, 0, 1, 2, 3])


def test_gradients_of_c_d_gamma_finite_differences():
    """Inside the interval the transformer is smooth: autograd equals central differences for w, c, d, gamma."""
    w = torch.tensor([-0.55, -0.31, 0.22, 0.47, 0.6], dtype=D, requires_grad=True)
    c, d, g = _t(0.4), _t(0.25), _t(0.7)
    assert torch.autograd.gradcheck(lambda w, c, d, g: qil.weight_transform(w, c, d, g), (w, c, d, g))
    x = torch.tensor([0.1, 0.4, 0.9, 1.3], dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, c, d: qil.interval_position(x, c, d), (x, _t(0.7), _t(0.65)))


def test_discretizer_is_straight_through():
    w = torch.tensor([-0.55, 0.22, 0.47], dtype=D, requires_grad=True)
    c, d, g = _t(0.4), _t(0.25), _t(0.7)
    qil.quantize_weight(w, c, d, g, 3).sum().backward()
    w2 = w.detach().clone().requires_grad_(True)
    c2, d2, g2 = _t(0.4), _t(0.25), _t(0.7)
    qil.weight_transform(w2, c2, d2, g2).sum().backward()
    for a, b in ((w, w2), (c, c2), (d, d2), (g, g2)):
        torch.testing.assert_close(a.grad, b.grad)


def test_boundaries_prune_and_clip_have_no_gradient():
    c, d, g = _t(0.4), _t(0.25), _t(0.5)
    w = torch.tensor([0.0, 0.1, -0.1, 0.15, 0.9, -0.9], dtype=D, requires_grad=True)  # 0.15 = c - d exactly
    out = qil.weight_transform(w, c, d, g)
    assert out.tolist() == [0.0, 0.0, 0.0, 0.0, 1.0, -1.0]
    out.sum().backward()
    assert w.grad.tolist() == [0.0] * 6
    assert float(c.grad) == 0.0 and float(d.grad) == 0.0 and float(g.grad) == 0.0
    assert torch.isfinite(w.grad).all()


def test_negative_or_zero_half_width():
    w = torch.tensor([0.1, 0.3], dtype=D)
    torch.testing.assert_close(
        qil.weight_transform(w, _t(0.2), _t(-0.1), _t(1.0)), qil.weight_transform(w, _t(0.2), _t(0.1), _t(1.0))
    )
    out = qil.weight_transform(w, _t(0.2), _t(0.0), _t(1.0))  # degenerate interval: a hard threshold at c
    assert out.tolist() == [0.0, 1.0]


def test_method_policy_init_hook_and_tags():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 1))
    fc_net = nn.Sequential(net, nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    m = build_method("qil", 4, 4)
    model = prepare(fc_net, m)
    layers = dict(quantized_layers(model))
    assert set(layers) == {"0.2", "0.4"}
    q = layers["0.2"]
    assert isinstance(q.wq, QILWeightQuantizer) and isinstance(q.aq, QILActQuantizer)
    assert q.wq.param_tags["c"] == "interval" and q.aq.c.item() == 2.0 and q.aq.d.item() == 2.0
    QILInit().on_train_start(Context(model=model))
    half = 0.5 * float(q.weight.detach().abs().max())
    assert q.wq.c.item() == pytest.approx(half) and q.wq.d.item() == pytest.approx(half)
    with torch.no_grad():
        q.wq.c.fill_(0.123)
    QILInit().on_train_start(Context(model=model))  # already initialised (e.g. loaded from a QIL run): kept
    assert q.wq.c.item() == pytest.approx(0.123)
    with pytest.raises(QreproError, match="bit-width 1"):
        build_method("qil", 1, 1)
    with pytest.raises(QreproError, match="act_init"):
        build_method("qil", 2, 2, act_init=0.0)
