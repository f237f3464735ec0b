"""ABC-Net (Lin et al., NeurIPS 2017): binary weight bases and their shifts, the least-squares alpha (Eq. 3)
against torch.linalg.lstsq, the straight-through gradients (Eq. 4 and the activation indicator), degenerate
weights, and the method's policy."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qrepro.errors import QreproError
from qrepro.hooks import Context
from qrepro.quant import abcnet as ab
from qrepro.quant import build_method, prepare
from qrepro.quant.layers import quantized_layers
from qrepro.quant.methods.abcnet import ABCActQuantizer, ABCAlphaInit, ABCWeightQuantizer

D = torch.float64


def test_shifts_and_bases():
    assert ab.weight_shifts(1) == [0.0]
    assert ab.weight_shifts(3) == [-1.0, 0.0, 1.0]
    assert ab.weight_shifts(5) == pytest.approx([-1.0, -0.5, 0.0, 0.5, 1.0])
    torch.manual_seed(0)
    w = torch.randn(4, 3, 3, 3, dtype=D)
    b = ab.weight_bases(w, 3)
    mean, std = w.mean(), w.std(unbiased=False)
    for i, u in enumerate((-1.0, 0.0, 1.0)):
        expect = torch.where(w - mean + u * std >= 0, 1.0, -1.0).to(D)
        assert torch.equal(b[i], expect)


def test_alpha_is_the_least_squares_fit():
    torch.manual_seed(1)
    w = torch.randn(8, 4, 3, 3, dtype=D)
    b = ab.weight_bases(w, 3)
    a = ab.fit_alpha(w, b, ridge=0.0)
    ref = torch.linalg.lstsq(b.reshape(3, -1).T, w.reshape(-1, 1)).solution[:, 0]
    torch.testing.assert_close(a, ref, rtol=1e-10, atol=1e-12)
    # more bases approximate better (the fit is a projection onto a growing span here)
    errs = [
        float(((ab.combine(ab.weight_bases(w, m), ab.fit_alpha(w, ab.weight_bases(w, m))) - w) ** 2).sum())
        for m in (1, 3, 5)
    ]
    assert errs[0] > errs[1] > errs[2]


def test_weight_gradient_is_sum_of_alphas():
    """Eq. 4: dW = sum_i alpha_i dB_i with the straight-through sign (alpha fitted, no gradient)."""
    torch.manual_seed(2)
    w = torch.randn(4, 2, 3, 3, dtype=D, requires_grad=True)
    q = ABCWeightQuantizer(3).double()
    out = q(w)
    alpha = ab.fit_alpha(w, ab.weight_bases(w, 3))
    torch.testing.assert_close(out, ab.combine(ab.weight_bases(w, 3), alpha))
    g = torch.randn_like(out)
    out.backward(g)
    torch.testing.assert_close(w.grad, alpha.sum() * g)


def test_zero_weights_are_degenerate_but_finite():
    w = torch.zeros(2, 2, 3, 3, dtype=D, requires_grad=True)
    out = ABCWeightQuantizer(3).double()(w)
    assert torch.isfinite(out).all() and float(out.detach().abs().max()) == 0.0
    out.sum().backward()
    assert torch.isfinite(w.grad).all()


def test_binary_activation_values_and_gradient():
    x = torch.tensor([-0.8, -0.2, 0.0, 0.29, 0.3, 0.7, 1.2, 1.5], dtype=D, requires_grad=True)
    v = torch.tensor(0.2, dtype=D, requires_grad=True)
    h = ab.binary_activation(x, v)  # threshold at x = 0.3, linear region x + v in [0, 1] -> x in [-0.2, 0.8]
    assert h.tolist() == [-1, -1, -1, -1, 1, 1, 1, 1]
    h.sum().backward()
    assert x.grad.tolist() == [0, 1, 1, 1, 1, 1, 0, 0]
    assert float(v.grad) == 5.0
    shifts = torch.tensor([0.2, -0.3], dtype=D, requires_grad=True)
    betas = torch.tensor([0.5, 2.0], dtype=D, requires_grad=True)
    y = ab.quantize_act(x.detach(), shifts, betas)
    expect = 0.5 * ab.binary_activation(x.detach(), shifts[0]) + 2.0 * ab.binary_activation(x.detach(), shifts[1])
    torch.testing.assert_close(y, expect)
    y.sum().backward()
    torch.testing.assert_close(
        betas.grad, torch.stack([ab.binary_activation(x.detach(), s).sum() for s in shifts.detach()])
    )


def test_method_policy_and_learned_alpha():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16, 2))
    m = build_method("abcnet", 5, 3, alpha="learn")
    model = prepare(net, m)
    layers = dict(quantized_layers(model))
    assert set(layers) == {"2"}
    q = layers["2"]
    assert isinstance(q.wq, ABCWeightQuantizer) and q.wq.bases == 5
    assert isinstance(q.aq, ABCActQuantizer) and q.aq.shift.shape == (3,)
    assert isinstance(m.hooks[0], ABCAlphaInit)
    m.hooks[0].on_train_start(Context(model=model))
    w = q.weight.detach()
    torch.testing.assert_close(q.wq.alpha.detach(), ab.fit_alpha(w, ab.weight_bases(w, 5)).float())
    assert not build_method("abcnet", 3, 3).hooks
    with pytest.raises(QreproError, match="bit-width 6"):
        build_method("abcnet", 6, 6)
    with pytest.raises(QreproError, match="alpha"):
        build_method("abcnet", 3, 3, alpha="mean")


def test_quantize_act_gradients_are_the_bases_summed():
    """quantize_act's written-out gradients (x, shifts, betas) equal autograd through the sum of binary_activation,
    ends of the linear regions and thresholds included."""
    x0 = torch.tensor([-0.8, -0.2, 0.0, 0.29, 0.3, 0.5, 0.7, 0.8, 1.2, 1.5], dtype=D)
    g = torch.linspace(-1.0, 2.0, x0.numel(), dtype=D)
    grads = []
    for f in (ab.quantize_act, lambda x, s, b: sum(b[n] * ab.binary_activation(x, s[n]) for n in range(s.numel()))):
        x = x0.clone().requires_grad_(True)
        shifts = torch.tensor([0.2, -0.3, 0.5], dtype=D, requires_grad=True)
        betas = torch.tensor([0.5, 2.0, -1.0], dtype=D, requires_grad=True)
        (f(x, shifts, betas) * g).sum().backward()
        grads.append((x.grad, shifts.grad, betas.grad))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-15)
