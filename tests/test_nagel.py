"""Nagel et al. (oscillations in QAT): the LSQ-style quantizer, the dampening loss, the oscillation-frequency EMA,
iterative freezing and the annealing schedules, in float64."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qrepro.errors import QreproError
from qrepro.hooks import Context
from qrepro.quant import build_method, prepare
from qrepro.quant import nagel as F
from qrepro.quant.methods.nagel import NagelQuantizer, NagelSchedule

D = torch.float64


def test_int_range():
    assert F.int_range(3, True) == (-4.0, 3.0)
    assert F.int_range(3, False) == (0.0, 7.0)
    with pytest.raises(QreproError):
        F.int_range(1, True)


def test_quantize_values_and_lsq_gradients():
    s = torch.tensor(0.5, dtype=D, requires_grad=True)
    x = torch.tensor([-3.0, -2.0, -0.7, 0.1, 0.74, 1.5, 2.4], dtype=D, requires_grad=True)
    n, p = F.int_range(3, True)  # grid -4..3, i.e. x_q in [-2, 1.5]
    q = F.quantize(x, s, n, p)
    torch.testing.assert_close(q.detach(), torch.tensor([-2.0, -2.0, -0.5, 0.0, 0.5, 1.5, 1.5], dtype=D))
    q.sum().backward()
    # STE inside the grid (clamp's gradient), 0 outside; x = -2.0 and 1.5 sit on the clip bounds
    assert x.grad.tolist()[2:5] == [1.0, 1.0, 1.0] and x.grad[0] == 0 and x.grad[-1] == 0
    # ∂x_q/∂s = round(x/s) − x/s inside, the clipped integer outside (LSQ without its gradient scale)
    xs = x.detach() / 0.5
    inside = (xs > n) & (xs < p)
    expected = torch.where(inside, torch.round(xs) - xs, torch.clamp(torch.round(xs), n, p))
    # at exactly the bounds torch.clamp passes the STE term (round(x/s) − x/s = 0 there): same value either way
    torch.testing.assert_close(s.grad, expected.sum())


def test_scale_floor():
    s = torch.tensor([-1.0, 0.0, 1e-9, 0.3], dtype=D, requires_grad=True)
    e = F.effective_scale(s)
    assert e.tolist() == [1e-8, 1e-8, 1e-8, 0.3]
    e.sum().backward()
    assert s.grad.tolist() == [0, 0, 0, 1]


@pytest.mark.parametrize("aggregation", ["sum", "mean", "kernel_mean"])
def test_dampening_term_and_gradients(aggregation):
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(4, 3, 2, 2, dtype=D, generator=g) * 0.4).requires_grad_()
    s = torch.tensor(0.1, dtype=D, requires_grad=True)
    n, p = F.int_range(3, True)
    wq = F.quantize(w, s, n, p)
    loss = F.dampening_term(w, wq, s, n, p, aggregation)
    w_clip = torch.clamp(w.detach(), n * 0.1, p * 0.1)
    sq = (wq.detach() - w_clip) ** 2
    ref = {"sum": sq.sum(), "mean": sq.mean(), "kernel_mean": sq.sum(0).mean()}[aggregation]
    torch.testing.assert_close(loss.detach(), ref)
    loss.backward()
    k = {"sum": 1.0, "mean": 1.0 / sq.numel(), "kernel_mean": 1.0 / sq[0].numel()}[aggregation]
    inside = (w.detach() > n * 0.1) & (w.detach() < p * 0.1)
    # target detached: ∂/∂w = −2k(w_q − w) inside the range, 0 outside
    torch.testing.assert_close(w.grad, torch.where(inside, -2 * k * (wq.detach() - w.detach()), torch.zeros_like(w)))
    # the clip bounds s·n, s·p carry the scale's gradient: −2k(w_q − s·bound)·bound for the clipped weights
    lo, hi = w.detach() < n * 0.1, w.detach() > p * 0.1
    exp_s = (-2 * k * (wq.detach() - n * 0.1) * n * lo).sum() + (-2 * k * (wq.detach() - p * 0.1) * p * hi).sum()
    torch.testing.assert_close(s.grad, exp_s)
    with pytest.raises(QreproError):
        F.dampening_term(w, wq, s, n, p, "max")


def test_cosine_anneal():
    assert F.cosine_anneal(10, 100, 0.0, 0.1, 0.25) == 0.0  # before the start: the start value
    assert F.cosine_anneal(25, 100, 0.0, 0.1, 0.25) == pytest.approx(0.0)
    assert F.cosine_anneal(62.5, 100, 0.0, 0.1, 0.25) == pytest.approx(0.05)
    assert F.cosine_anneal(100, 100, 0.1, 0.01, 0.25) == pytest.approx(0.01)


def test_oscillation_frequency_ema():
    m = 0.1
    seq = [torch.tensor([0.0, 0.0, 2.0], dtype=D)]
    seq += [torch.tensor(v, dtype=D) for v in ([1.0, 1.0, 2.0], [0.0, 2.0, 2.0], [1.0, 3.0, 1.0], [1.0, 2.0, 2.0])]
    prev, d, f = seq[0].clone(), torch.zeros(3, dtype=D), torch.zeros(3, dtype=D)
    oscs = [F.track_oscillations(x, prev, d, f, m) for x in seq[1:]]
    # weight 0: 0→1→0→1→1 oscillates at steps 2 and 3; weight 1: 0→1→2→3→2 only at step 4 (up, up, up, down);
    # weight 2: 2→2→2→1→2: the first change sets a direction, the change back is an oscillation
    assert [o.tolist() for o in oscs] == [[0, 0, 0], [1, 0, 0], [1, 0, 0], [0, 1, 1]]
    expected = torch.zeros(3, dtype=D)
    for o in oscs:
        expected = m * o + (1 - m) * expected
    torch.testing.assert_close(f, expected)
    assert d.tolist() == [-1.0, 1.0, -1.0]  # sign(prev − x): the direction of the last change (unchanged: kept)
    assert torch.equal(prev, seq[-1])


def test_freeze_threshold_behaviour():
    x = torch.tensor([1.0, 2.0, -1.0], dtype=D)
    freq = torch.tensor([0.05, 0.2, 0.11], dtype=D)
    frozen = torch.zeros(3, dtype=torch.bool)
    fint, ema = torch.zeros(3, dtype=D), torch.tensor([0.6, 1.4, -0.2], dtype=D)
    F.freeze_step(x, freq, frozen, fint, ema, 0.0, 0.01)  # threshold 0: nothing (warm start), EMA unchanged
    assert not frozen.any() and ema.tolist() == [0.6, 1.4, -0.2]
    F.freeze_step(x, freq, frozen, fint, ema, 0.1, 0.01)
    assert frozen.tolist() == [False, True, True]  # strictly above the threshold
    assert fint.tolist() == [0.0, 1.0, -0.0]  # round(EMA) before this step's update
    torch.testing.assert_close(ema, torch.tensor([0.6, 1.4, -0.2], dtype=D) * 0.99 + 0.01 * x)
    F.freeze_step(x, torch.zeros(3, dtype=D), frozen, fint, ema, 0.1, 0.01)
    assert frozen.tolist() == [False, True, True]  # frozen stays frozen


def test_mse_scale_is_the_grid_minimiser():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, dtype=D, generator=g)
    s, signed = F.mse_scale(x, 3, num_candidates=50)
    assert signed
    n, p = F.int_range(3, True)
    step = (max(abs(float(x.min())), float(x.max())) + 0.5) / 50
    losses = [float(((x - F.quantize(x, torch.tensor(step * c / p, dtype=D), n, p)) ** 2).sum()) for c in range(1, 51)]
    assert s == pytest.approx(step * (1 + losses.index(min(losses))) / p)
    s_relu, signed_relu = F.mse_scale(x.clamp(min=0), 3, num_candidates=50)
    assert not signed_relu and s_relu > 0


def _model():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))


def test_policy_first_last_8bit_and_tracking_only_low_bits():
    model = _model().double()
    prepare(model, build_method("nagel_freeze", 3, 3))
    first, mid, last = model[0], model[2], model[5]
    assert first.wq.bits == 8 and first.aq is None  # 8-bit weights, full-precision input
    assert last.wq.bits == 8 and last.aq.bits == 8
    assert mid.wq.bits == 3 and mid.aq.bits == 3
    assert mid.wq.track and not first.wq.track and not last.wq.track  # freeze_max_bits = 4
    with pytest.raises(QreproError):
        build_method("nagel_freeze", 3, 3, freeze_momentum=0.0)


def test_frozen_weights_keep_their_integer_and_get_no_gradient():
    q = NagelQuantizer(3, track=True).double()
    w = torch.tensor([0.12, -0.31, 0.07], dtype=D, requires_grad=True)
    q.scale.data.fill_(0.1)
    q.reset_tracking(q.integers(w.detach()))
    q.frozen[1] = True
    q.frozen_int[1] = -2.0
    out = q(w)
    torch.testing.assert_close(out.detach(), torch.tensor([0.1, -0.2, 0.1], dtype=D))
    out.sum().backward()
    assert w.grad.tolist() == [1.0, 0.0, 1.0]


def test_schedule_warm_start_then_freezes_oscillating_weights():
    torch.manual_seed(0)
    model = _model().double()
    method = build_method("nagel_freeze", 3, 3, freeze_momentum=0.5, freeze_threshold=0.3, freeze_threshold_final=0.3)
    prepare(model, method)
    x = torch.randn(4, 3, 8, 8, dtype=D)

    class Sched:
        total_steps = 16

    ctx = Context(model=model, scheduler=Sched(), sample_batch=(x, None))
    for h in method.hooks:
        h.on_train_start(ctx)
    sched = next(h for h in method.hooks if isinstance(h, NagelSchedule))
    wq, w = model[2].wq, model[2].weight
    s = float(wq.scale.detach())
    for step in range(1, 13):  # push one weight back and forth across a decision threshold
        with torch.no_grad():
            w[0, 0, 0, 0] = (0.4 if step % 2 else 0.6) * s
        sched.on_step_end(ctx, step)
        if step < 3:  # the next steps (2, 3) are before 25 % of 16 steps: threshold 0 (warm start), nothing frozen
            assert sched.threshold == 0.0 and not wq.frozen.any()
    assert sched.threshold == pytest.approx(0.3)
    assert bool(wq.frozen[0, 0, 0, 0]) and int(wq.frozen.sum()) == 1
    # once frozen it no longer oscillates (its integer is fixed), so its frequency decays
    assert float(wq.integers(w.detach())[0, 0, 0, 0]) == float(wq.frozen_int[0, 0, 0, 0])
    assert wq.freq[0, 0, 0, 0] < 0.3
    assert float(wq.frozen_int[0, 0, 0, 0]) in (0.0, 1.0)
    assert sched.on_epoch_end(ctx, 0)["frozen_frac"] == pytest.approx(1 / wq.frozen.numel())


def test_damp_regularizer_follows_its_schedule():
    torch.manual_seed(0)
    model = _model().double()
    method = build_method("nagel_damp", 3, 3)
    prepare(model, method)

    class Sched:
        total_steps = 100

    ctx = Context(model=model, scheduler=Sched(), sample_batch=(torch.randn(2, 3, 8, 8, dtype=D), None))
    for h in method.hooks:
        h.on_train_start(ctx)
    assert float(method.regularizer(model)) == 0.0  # λ_0 = 0
    method.hooks[1].on_step_end(ctx, 99)
    lam = float(method.regularizer.weight)
    assert lam == pytest.approx(0.1)
    terms = 0.0
    for layer in (model[0], model[2], model[5]):
        s = float(layer.wq.scale)
        n, p = layer.wq.grid()
        w = layer.weight.detach()
        terms += float(((layer.wq(w) - w.clamp(s * n, s * p)) ** 2).sum(0).mean())
    assert float(method.regularizer(model)) == pytest.approx(lam * terms)
