"""QNet (Yang et al., CVPR 2019): the sigmoid-sum quantization function (Eq. 3) in value and exact gradient
(finite differences, float64), its T -> inf limit (the hard quantizer used in evaluation), the temperature
schedule hook and the method's policy."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from qrepro.errors import QreproError
from qrepro.hooks import Context
from qrepro.quant import build_method, prepare
from qrepro.quant import qnet as qn
from qrepro.quant.layers import quantized_layers
from qrepro.quant.methods.qnet import QNetInit, QNetQuantizer, QNetTemperature

D = torch.float64


def _t(v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=D, requires_grad=True)


def test_steps_of_the_targets():
    h, b, o = qn.steps(1, True)
    assert h.tolist() == [2.0] and b.tolist() == [0.0] and o == 1.0  # binary weights: 2 sigmoid(T x) - 1
    h, b, o = qn.steps(2, False)
    assert h.tolist() == pytest.approx([1 / 3] * 3) and b.tolist() == pytest.approx([1 / 6, 1 / 2, 5 / 6]) and o == 0


def test_soft_function_matches_eq3():
    h, b, o = qn.steps(2, True)
    x = torch.linspace(-2, 2, 41, dtype=D)
    a, be, t = 0.7, 1.3, 5.0
    got = qn.soft_quantize(x, _t(a), _t(be), _t(t), h, b, o)
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    expect = [a * (sum(float(hi) * sig(t * (be * float(xi) - float(bi))) for hi, bi in zip(h, b)) - o) for xi in x]
    torch.testing.assert_close(got, torch.tensor(expect, dtype=D), rtol=1e-12, atol=1e-14)
    # binary case: alpha tanh(T beta x / 2)
    h1, b1, o1 = qn.steps(1, True)
    torch.testing.assert_close(qn.soft_quantize(x, _t(a), _t(be), _t(t), h1, b1, o1), a * torch.tanh(t * be * x / 2))


def test_gradients_finite_differences():
    h, b, o = qn.steps(2, False)
    x = torch.tensor([-0.3, 0.1, 0.45, 0.8, 1.4], dtype=D, requires_grad=True)
    f = lambda x, a, be, t: qn.soft_quantize(x, a, be, t, h, b, o)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, _t(0.9), _t(1.1), _t(4.0)))
    # parameters broadcast against x (alpha per row, T per column): each summed over its broadcast
    x2 = torch.tensor([[-0.3, 0.1, 0.45], [0.8, 1.4, 0.2]], dtype=D, requires_grad=True)
    a2 = torch.tensor([[0.9], [1.3]], dtype=D, requires_grad=True)
    t2 = torch.tensor([4.0, 2.0, 6.0], dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(f, (x2, a2, _t(1.1), t2))


def test_large_temperature_is_the_hard_quantizer():
    h, b, o = qn.steps(2, True)
    x = torch.tensor([-1.5, -0.5, -0.2, 0.1, 0.4, 0.9], dtype=D)
    hard = qn.hard_quantize(x, _t(2.0), _t(1.0), h, b, o)
    assert (hard / 2 * 3).tolist() == pytest.approx([-3, -1, -1, 1, 1, 3])
    soft = qn.soft_quantize(x, _t(2.0), _t(1.0), _t(1e4), h, b, o)
    torch.testing.assert_close(soft, hard, atol=1e-9, rtol=0)


def test_quantizer_train_soft_eval_hard_and_hooks():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16, 2))
    m = build_method("qnet", 1, 1, t_start=2.0, t_step=3.0)
    model = prepare(net, m)
    q = dict(quantized_layers(model))["2"]
    assert isinstance(q.wq, QNetQuantizer) and isinstance(q.aq, QNetQuantizer)
    init, temp = m.hooks
    assert isinstance(init, QNetInit) and isinstance(temp, QNetTemperature)
    ctx = Context(model=model, epoch=0)
    init.on_train_start(ctx)
    temp.on_train_start(ctx)
    mx = float(q.weight.detach().abs().max())
    assert q.wq.alpha.item() == pytest.approx(mx) and q.wq.beta.item() == pytest.approx(1 / mx)
    assert float(q.wq.temperature) == 2.0 and float(q.aq.temperature) == 2.0
    assert temp.on_epoch_end(ctx, 0) == {"qnet_temperature": 2.0}
    assert float(q.wq.temperature) == 5.0
    w = q.weight.detach()
    q.wq.train()
    assert len(torch.unique(q.wq(w))) > 2  # soft in training
    q.wq.eval()
    assert torch.unique(q.wq(w).detach()).tolist() == pytest.approx([-mx, mx])  # hard binary in evaluation
    with pytest.raises(QreproError, match="t_start"):
        build_method("qnet", 1, 1, t_start=0.0)
