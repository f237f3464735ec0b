"""LSQ (Esser et al., ICLR 2020) and LSQ+ (Bhalgat et al., 2020): values and gradients in float64 against the papers'
equations, the initialisations, the boundary cases and the per-layer policy (qrepro/quant/lsq.py, methods/lsq.py)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from qrepro.errors import QreproError
from qrepro.quant import build_method, prepare
from qrepro.quant import lsq as F
from qrepro.quant.layers import QConv2d, QLinear
from qrepro.quant.methods.lsq import LSQActQuantizer, LSQWeightQuantizer, init_steps

D = torch.float64


def _eq3(u: float, qn: int, qp: int) -> float:
    """LSQ Eq. (3), d v^/d s at u = v/s."""
    if u <= -qn:
        return -qn
    if u >= qp:
        return qp
    return round(u) - u


def _grads(fn, *args):
    args = [a.clone().requires_grad_(True) for a in args]
    out = fn(*args)
    out.sum().backward()
    return out.detach(), [a.grad for a in args]


def test_bounds():
    assert F.bounds(2, signed=True) == (2, 1)
    assert F.bounds(4, signed=True) == (8, 7)
    assert F.bounds(2, signed=False) == (0, 3)
    with pytest.raises(QreproError):
        F.bounds(1, signed=True)


@pytest.mark.parametrize("bits,signed", [(2, True), (3, True), (2, False), (4, False)])
def test_lsq_values_and_gradients_match_eq3(bits, signed):
    qn, qp = F.bounds(bits, signed)
    s = 0.37
    # grid points, midpoints, exact bounds and values beyond both bounds
    u = torch.tensor([-qn - 1.3, -qn, -qn + 0.2, -0.5, 0.0, 0.49, 0.5, 1.51, qp - 0.3, qp, qp + 2.0], dtype=D)
    v = u * s
    u = v / s  # what the quantizer sees (u·s/s is not always u in floating point)
    out, (gv, gs) = _grads(lambda v, s: F.lsq_quantize(v, s, qn, qp), v, torch.tensor(s, dtype=D))
    want = torch.clamp(torch.round(u), -qn, qp) * s  # torch.round: half to even, as LSQ's round
    assert torch.allclose(out, want, atol=1e-15)
    assert gs.item() == pytest.approx(sum(_eq3(float(x), qn, qp) for x in v / s), abs=1e-12)
    inside = ((u > -qn) & (u < qp)).to(D)
    assert torch.equal(gv, inside)  # 1 strictly inside, 0 on a bound and beyond


def test_lsq_grad_scale_scales_only_the_step_gradient():
    v = torch.randn(50, dtype=D)
    s = torch.tensor(0.3, dtype=D)
    g = 1.0 / math.sqrt(50 * 7)
    out1, (gv1, gs1) = _grads(lambda v, s: F.lsq_quantize(v, s, 8, 7, 1.0), v, s)
    out2, (gv2, gs2) = _grads(lambda v, s: F.lsq_quantize(v, s, 8, 7, g), v, s)
    assert torch.equal(out1, out2) and torch.equal(gv1, gv2)
    assert gs2.item() == pytest.approx(g * gs1.item(), rel=1e-12)
    assert F.step_grad_scale(50, 7) == pytest.approx(g)


def test_lsq_step_gradient_finite_difference_where_smooth():
    """Beyond the bounds v^ = -Q_N·s or Q_P·s exactly: there Eq. (3) is the true derivative."""
    v = torch.tensor([-5.0, -3.0, 4.0, 9.0], dtype=D)  # all clipped at s ~ 0.5 with 2-bit signed (Q_N=2, Q_P=1)
    s = torch.tensor(0.5, dtype=D)
    _, (_, gs) = _grads(lambda v, s: F.lsq_quantize(v, s, 2, 1), v, s)
    h = 1e-6
    fd = (F.lsq_quantize(v, s + h, 2, 1).sum() - F.lsq_quantize(v, s - h, 2, 1).sum()) / (2 * h)
    assert gs.item() == pytest.approx(fd.item(), abs=1e-8)


def test_lsq_small_step_and_negative_inputs():
    v = torch.tensor([-1.0, -1e-3, 0.0, 1e-3, 1.0], dtype=D)
    s = torch.tensor(1e-12, dtype=D)
    out = F.lsq_quantize(v, s, 0, 3)  # unsigned: negative inputs go to 0, the rest saturate at Q_P·s
    assert torch.isfinite(out).all()
    assert torch.allclose(out, torch.tensor([0.0, 0.0, 0.0, 3e-12, 3e-12], dtype=D), atol=1e-24)


@pytest.mark.parametrize("beta", [-0.4, 0.0, 0.25])
def test_lsqplus_values_and_gradients(beta):
    qn, qp = 0, 3
    s = 0.3
    u = torch.tensor([-1.0, 0.0, 0.2, 0.5, 1.7, 2.9, 3.0, 4.5], dtype=D)
    x = u * s + beta
    u = (x - beta) / s
    out, (gx, gs, gb) = _grads(
        lambda x, s, b: F.lsqplus_quantize(x, s, b, qn, qp), x, torch.tensor(s, dtype=D), torch.tensor(beta, dtype=D)
    )
    want = torch.clamp(torch.round(u), -qn, qp) * s + beta
    assert torch.allclose(out, want, atol=1e-14)
    inside = (u > -qn) & (u < qp)
    assert torch.equal(gx, inside.to(D))
    assert gb.item() == pytest.approx(float((~inside).sum()))  # 0 inside, 1 on/beyond a bound
    assert gs.item() == pytest.approx(sum(_eq3(float(t), qn, qp) for t in (x - beta) / s), abs=1e-12)
    # the offset's gradient is exact where clipped: finite difference
    h = 1e-6
    xo = torch.tensor([-2.0, 5.0], dtype=D)
    fd = (
        F.lsqplus_quantize(xo, torch.tensor(s, dtype=D), torch.tensor(beta + h, dtype=D), qn, qp).sum()
        - F.lsqplus_quantize(xo, torch.tensor(s, dtype=D), torch.tensor(beta - h, dtype=D), qn, qp).sum()
    ) / (2 * h)
    assert fd.item() == pytest.approx(2.0, abs=1e-8)


def test_lsqplus_offset_represents_negative_inputs():
    x = torch.tensor([-0.3, -0.1, 0.0, 0.5], dtype=D)
    s, beta = F.lsqplus_act_init_minmax(x, 0, 3)
    out = F.lsqplus_quantize(x, s, beta, 0, 3)
    assert out[0].item() == pytest.approx(-0.3) and out[-1].item() == pytest.approx(0.5)  # min and max exact
    assert F.lsq_quantize(x, s, 0, 3)[0].item() == 0.0  # LSQ without offset clips negatives to 0


def test_initialisations():
    w = torch.tensor([-2.0, -1.0, 0.5, 1.5, 3.0], dtype=D)
    assert F.lsq_init_step(w, 7).item() == pytest.approx(2 * 1.6 / math.sqrt(7))
    mu, sd = w.mean().item(), w.std().item()
    assert F.lsqplus_weight_init(w, 3).item() == pytest.approx(max(abs(mu - 3 * sd), abs(mu + 3 * sd)) / 4)
    s, b = F.lsqplus_act_init_minmax(w, 0, 15)
    assert s.item() == pytest.approx(5.0 / 15) and b.item() == pytest.approx(-2.0)


def test_mse_init_beats_minmax_and_lsq_on_heavy_tails():
    g = torch.Generator().manual_seed(0)
    x = torch.distributions.Laplace(0.0, 1.0).sample((20000,)).to(D).relu() - 0.2  # shifted, heavy-tailed
    qn, qp = 0, 15

    def mse(s, b):
        return (F.lsqplus_quantize(x, s, b, qn, qp) - x).square().mean().item()

    s_mse, b_mse = F.lsqplus_act_init_mse(x, qn, qp)
    s_mm, b_mm = F.lsqplus_act_init_minmax(x, qn, qp)
    assert mse(s_mse, b_mse) < mse(s_mm, b_mm)
    assert mse(s_mse, b_mse) < mse(F.lsq_init_step(x, qp), torch.zeros((), dtype=D))
    del g


def _net():
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    )  # fmt: skip


@pytest.mark.parametrize("name", ["lsq", "lsqplus"])
def test_policy_init_and_resume(name):
    torch.manual_seed(0)
    model = prepare(_net(), build_method(name, 3, 3))
    first, mid, last = model[0], model[3], model[7]
    assert isinstance(first, QConv2d) and first.aq is None and first.wq.bits == 8
    assert mid.wq.bits == 3 and mid.aq.bits == 3 and last.wq.bits == 8 and last.aq.bits == 8
    assert (mid.aq.beta is not None) == (name == "lsqplus")
    assert isinstance(last, QLinear)
    x = torch.randn(8, 3, 6, 6)
    bn = model[1].running_mean.clone()
    assert init_steps(model, x) == 5
    assert torch.equal(model[1].running_mean, bn)  # BN statistics restored
    if name == "lsq":
        assert mid.wq.step.item() == pytest.approx(2 * mid.weight.abs().mean().item() / math.sqrt(3))
    with torch.no_grad():
        mid.wq.step.fill_(0.123)
    assert init_steps(model, x) == 0 and mid.wq.step.item() == pytest.approx(0.123)  # resume: kept
    fresh = prepare(_net(), build_method(name, 3, 3))
    fresh.load_state_dict(model.state_dict())
    assert init_steps(fresh, x) == 0


def test_module_applies_grad_scale():
    wq = LSQWeightQuantizer(4).double()
    w = torch.randn(6, 5, dtype=D)
    wq.init_from(w)
    wq(w).sum().backward()
    s = wq.step.detach().clone().requires_grad_(True)
    F.lsq_quantize(w, s, 8, 7).sum().backward()
    assert wq.step.grad.item() == pytest.approx(s.grad.item() / math.sqrt(30 * 7), rel=1e-12)
    aq = LSQActQuantizer(2, offset=True, init="minmax").double()
    x = torch.rand(3, 2, 4, dtype=D)
    aq.init_from(x)
    aq(x).sum().backward()
    s2, b2 = aq.step.detach().clone().requires_grad_(True), aq.beta.detach().clone().requires_grad_(True)
    F.lsqplus_quantize(x, s2, b2, 0, 3).sum().backward()
    g = 1 / math.sqrt(8 * 3)  # features per example x Q_P
    assert aq.step.grad.item() == pytest.approx(g * s2.grad.item(), rel=1e-12)
    assert aq.beta.grad.item() == pytest.approx(g * b2.grad.item(), rel=1e-12)


def test_bad_options():
    with pytest.raises(QreproError):
        build_method("lsq", 1, 4)
    with pytest.raises(QreproError):
        build_method("lsqplus", 4, 4, a_init="nope")
