"""TR scheduling: quantizer maths (Eqs. 13, S4–S6), Algorithm 1 and the T-optimizers, TR monitoring."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from qrepro.errors import QreproError
from qrepro.hooks import Context
from qrepro.quant import build_method, prepare, quantized_layers
from qrepro.quant import tr as F
from qrepro.quant.methods.tr import TRActQuantizer, TRWeightQuantizer, calibrate_scales

optim_tr = pytest.importorskip("qrepro.optim.tr")
from qrepro.optim.tr import (  # noqa: E402
    SGDT,
    AdagradT,
    AdamaxT,
    AdamT,
    AdamWT,
    NAdamT,
    RMSpropT,
    TRMonitor,
    talr_additive,
    talr_momentum,
    talr_multiplicative,
)

D = torch.float64


# ------------------------------------------------------------------------------------------------ quantizer
@pytest.mark.parametrize(
    "bits,expected",
    [(1, (-1.0, 1.0, 1.0)), (2, (-2.0, 1.0, 2.0)), (3, (-4.0, 3.0, 4.0)), (4, (-8.0, 7.0, 8.0))],
)
def test_weight_constants(bits, expected):
    assert F.weight_constants(bits) == expected


def test_bad_bits_raise():
    with pytest.raises(QreproError):
        F.weight_constants(0)
    with pytest.raises(QreproError):
        build_method("tr", 9, 9)


def test_supplement_s5_examples():
    # Sec. S5 / Fig. S7: with s = 0.3 a latent weight of -0.2 is on the second 2-bit level (w_d = -1),
    # with s = 0.2 on the first (w_d = -2); w_q = w_d/γ with γ = 2 (δ = 0.5).
    w = torch.tensor([-0.2], dtype=D)
    assert F.discrete_weight(w, torch.tensor(0.3, dtype=D), 2).item() == -1.0
    assert F.discrete_weight(w, torch.tensor(0.2, dtype=D), 2).item() == -2.0
    assert F.quantize_weight(w, torch.tensor(0.3, dtype=D), 2).item() == -0.5
    assert F.level_spacing(2) == 0.5


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_weight_values_and_gradients(bits):
    torch.manual_seed(bits)
    alpha, beta, gamma = F.weight_constants(bits)
    s = torch.tensor(0.37, dtype=D, requires_grad=True)
    w = torch.randn(4000, dtype=D) * 0.3
    u = gamma * w / 0.37  # keep away from the clipping points (finite differences below)
    w = w[((u - alpha).abs() > 1e-3) & ((u - beta).abs() > 1e-3)].requires_grad_(True)
    wq = F.quantize_weight(w, s, bits)
    # values: closed form and level set
    wn = torch.clamp(gamma * w.detach() / s.detach(), alpha, beta)
    if bits == 1:
        ref = torch.where(wn >= 0, 1.0, -1.0).to(D)
        levels = {-1.0, 1.0}
    else:
        ref = torch.round(wn) / gamma
        levels = {k / gamma for k in range(int(alpha), int(beta) + 1)}
    assert torch.equal(wq.detach(), ref)
    assert set(wq.detach().unique().tolist()) <= levels
    assert len(set(wq.detach().unique().tolist())) == len(levels)  # every level used
    wd = F.discrete_weight(w, s, bits)
    assert torch.equal(wd, torch.round(wd)) and torch.equal(wd / gamma, wq.detach())
    # gradients (STE on round/sign): ∂w_q/∂w = 1/s inside the clip range, ∂w_q/∂s = −w/s²; 0 outside
    up = torch.randn_like(w)
    gw, gs = torch.autograd.grad(wq, (w, s), up)
    inside = (gamma * w.detach() / s.detach() > alpha) & (gamma * w.detach() / s.detach() < beta)
    assert inside.any() and (~inside).any()
    assert torch.allclose(gw, torch.where(inside, up / s.detach(), 0.0))
    assert torch.allclose(gs, (up * torch.where(inside, -w.detach() / s.detach() ** 2, 0.0)).sum())
    # the same gradient by finite differences of the STE surrogate clip(γw/s, α, β)/γ
    sur = lambda ss: (up * torch.clamp(gamma * w.detach() / ss, alpha, beta) / gamma).sum()  # noqa: E731
    eps = 1e-6
    fd = (sur(s.detach() + eps) - sur(s.detach() - eps)) / (2 * eps)
    assert torch.allclose(gs, fd, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_activation_values_and_gradients(bits):
    torch.manual_seed(10 + bits)
    n = 2.0**bits
    s = torch.tensor(1.3, dtype=D, requires_grad=True)
    x = (torch.randn(4000, dtype=D) * 1.2).relu().requires_grad_(True)
    xq = F.quantize_activation(x, s, bits)
    u = torch.clamp(x.detach() / s.detach() * n, 0, n - 1)
    assert torch.equal(xq.detach(), torch.round(u) / n)
    assert set((xq.detach() * n).unique().tolist()) == set(float(k) for k in range(int(n)))
    assert xq.max().item() == (n - 1) / n
    up = torch.randn_like(x)
    gx, gs = torch.autograd.grad(xq, (x, s), up)
    inside = (x.detach() * n / s.detach() > 0) & (x.detach() * n / s.detach() < n - 1)  # x = 0 (ReLU): 0
    assert (~inside).any()
    assert torch.allclose(gx, torch.where(inside, up / s.detach(), 0.0))
    assert torch.allclose(gs, (up * torch.where(inside, -x.detach() / s.detach() ** 2, 0.0)).sum())


def test_binary_activation_follows_authors():
    # authors' custom_modules.QConv.act_quantization at 1 bit: round(clamp(x/s_a, 0, 1)) -> {0, 1}, threshold
    # s_a/2 (the b >= 2 formula round(clip(2x/s_a, 0, 1))/2 would give {0, 1/2} with the threshold at s_a/4)
    s = torch.tensor(0.8, dtype=D, requires_grad=True)
    x = torch.tensor([0.0, 0.1, 0.19, 0.21, 0.39, 0.41, 0.79, 0.81, 2.0, -0.3], dtype=D, requires_grad=True)
    xq = F.quantize_activation(x, s, 1)
    assert xq.tolist() == [0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0]
    up = torch.arange(1.0, 11.0, dtype=D)
    gx, gs = torch.autograd.grad(xq, (x, s), up)
    inside = (x.detach() > 0) & (x.detach() < 0.8)  # the clamp's range; the STE passes the rounding
    assert torch.allclose(gx, torch.where(inside, up / 0.8, 0.0), rtol=1e-15, atol=0)
    assert gs.item() == pytest.approx((up * torch.where(inside, -x.detach() / 0.64, 0.0)).sum().item(), rel=1e-14)
    # with the authors' denominator |s| + 1e-6 (their exact expression, float64)
    s2 = torch.tensor(0.8, dtype=D, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    ref = torch.round(torch.clamp(x2.detach() / (0.8 + 1e-6), 0, 1))
    xq2 = F.quantize_activation(x2, s2, 1, eps=1e-6)
    assert torch.equal(xq2.detach(), ref)
    gx2, gs2 = torch.autograd.grad(xq2, (x2, s2), up)
    assert torch.allclose(gx2, torch.where(inside, up / (0.8 + 1e-6), 0.0), rtol=1e-15, atol=0)
    want = (up * torch.where(inside, -x.detach() / (0.8 + 1e-6) ** 2, 0.0)).sum().item()
    assert gs2.item() == pytest.approx(want, rel=1e-14)


def test_scale_eps_denominator():
    # quantizer.scale_eps: divide by |s| + eps (authors: 1e-6) instead of s; a value just above a rounding point
    # of x/s falls below it with the eps, and a negative s acts through |s|
    n = 4.0
    x = torch.tensor([0.125 * (1 + 5e-7)], dtype=D)
    assert F.quantize_activation(x, torch.tensor(1.0, dtype=D), 2).item() == 1 / n
    assert F.quantize_activation(x, torch.tensor(1.0, dtype=D), 2, eps=1e-6).item() == 0.0
    assert F.quantize_activation(x, torch.tensor(-1.0, dtype=D), 2, eps=1e-6).item() == 0.0
    w = torch.tensor([0.25 * (1 + 5e-7), -0.3], dtype=D)  # 2 bits: γw/s = 0.5000003 -> 1 (plain), 0 (eps)
    assert F.discrete_weight(w, torch.tensor(1.0, dtype=D), 2).tolist() == [1.0, -1.0]
    assert F.discrete_weight(w, torch.tensor(1.0, dtype=D), 2, eps=1e-6).tolist() == [0.0, -1.0]
    # gradient with respect to s through |s| + eps, exactly the authors' expression
    s = torch.tensor(0.37, dtype=D, requires_grad=True)
    ww = (torch.randn(500, generator=torch.Generator().manual_seed(0), dtype=D) * 0.3).requires_grad_(True)
    s_ref = s.detach().clone().requires_grad_(True)
    ref = torch.clamp(ww.detach() / (torch.abs(s_ref) + 1e-6) * 2, -2, 1)
    ref = (ref + (torch.round(ref) - ref).detach()) / 2
    ours = F.quantize_weight(ww.detach(), s, 2, eps=1e-6)
    assert torch.equal(ours.detach(), ref.detach())
    up = torch.randn(500, generator=torch.Generator().manual_seed(1), dtype=D)
    (g_ours,) = torch.autograd.grad(ours, s, up)
    (g_ref,) = torch.autograd.grad(ref, s_ref, up)
    assert g_ours.item() == g_ref.item() != 0.0
    # the config switch reaches the quantizer modules (default None: the paper's s)
    m, _ = _tiny_model(scale_eps=1e-6)
    assert m[3].wq.eps == 1e-6 and m[3].aq.eps == 1e-6
    m, _ = _tiny_model()
    assert m[3].wq.eps is None and m[3].aq.eps is None
    with pytest.raises(QreproError, match="scale_eps"):
        _tiny_model(scale_eps=-1.0)


def test_binary_sign_of_zero_is_plus_one():
    w = torch.tensor([-0.1, 0.0, 0.1], dtype=D)
    assert F.quantize_weight(w, torch.tensor(1.0, dtype=D), 1).tolist() == [-1.0, 1.0, 1.0]


def test_scale_initialisation():
    torch.manual_seed(0)
    w = torch.randn(100000, dtype=D) * 0.05
    assert math.isclose(F.init_weight_scale(w).item(), 3 * w.std().item(), rel_tol=1e-12)
    x = (torch.randn(400000, dtype=D) * 0.7).abs()  # half-normal with σ = 0.7
    assert math.isclose(F.init_activation_scale(x).item(), 3 * 0.7, rel_tol=0.01)


def _tiny_model(w_bits=2, a_bits=2, **opts):
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1, bias=False),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1, bias=False),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 5),
    ).to(D)
    method = build_method("tr", w_bits, a_bits, **opts)
    prepare(m, method)
    return m.to(D), method


def test_policy_first_last_fp_and_tags():
    m, method = _tiny_model()
    names = [n for n, _ in quantized_layers(m)]
    assert names == ["3", "6"]  # first conv and last linear stay full precision (Table S8)
    assert isinstance(m[3].wq, TRWeightQuantizer) and isinstance(m[3].aq, TRActQuantizer)
    assert m[3].wq.param_tags == {"scale": "w_scale"} and m[3].aq.param_tags == {"scale": "a_scale"}
    assert m[3].wq.scale.requires_grad
    m2, _ = _tiny_model(learn_weight_scale=False)
    assert not m2[3].wq.scale.requires_grad
    m3, _ = _tiny_model(w_bits=32, a_bits=2)
    assert m3[3].wq is None and isinstance(m3[3].aq, TRActQuantizer)


def test_calibration_sets_scales_and_restores_bn():
    m, _ = _tiny_model()
    x = torch.randn(8, 3, 8, 8, dtype=D)
    before = {k: v.clone() for k, v in m.state_dict().items() if "running" in k or "num_batches" in k}
    inputs = {}
    hs = [m[i].register_forward_pre_hook(lambda mod, a, i=i: inputs.__setitem__(i, a[0].detach())) for i in (3, 6)]
    assert calibrate_scales(m, x) == 4
    for h in hs:
        h.remove()
    after = m.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    for i in (3, 6):
        assert math.isclose(m[i].wq.scale.item(), 3 * m[i].weight.std().item(), rel_tol=1e-12)
        # layer 6's input comes from the already-quantized layer 3 (progressive, as in a first iteration)
        assert math.isclose(m[i].aq.scale.item(), 3 * inputs[i].std().item() / F.HALF_NORMAL_STD, rel_tol=1e-12)
    s = m[3].aq.scale.item()
    assert calibrate_scales(m, 10 * x) == 0 and m[3].aq.scale.item() == s  # initialised: left alone (resume)


# --------------------------------------------------------------------------------------------- Algorithm 1
def _one_layer(w0, scale=2.0, bits=2):
    """A single quantized linear layer (quantize_first_last) with latent weights w0 and weight scale."""
    lin = nn.Linear(len(w0), 1, bias=False)
    m = nn.Sequential(lin).to(D)
    prepare(m, build_method("tr", bits, 32, quantize_first_last=True, monitor_tr=False))
    with torch.no_grad():
        m[0].weight.copy_(torch.tensor(w0, dtype=D).view(1, -1))
        m[0].wq.scale.fill_(scale)
    return m


def _run_constant_grad(rule, steps, lam=0.25 / math.sqrt(2), **tr):
    # s = 2 and γ = 2 make w_n = clip(w, −2, 1), so w_d = round(w) can be read off by hand
    m = _one_layer([0.45, 0.35, -0.4, 0.0])
    opt = SGDT(
        m.parameters(),
        model=m,
        lr=0.1,
        tr=dict(factor=lam, momentum=0.5, rule=rule, target_schedule="constant", **tr),
    )
    w = m[0].weight
    hist = []
    for _ in range(steps):
        w.grad = torch.tensor([[-1.0, -1.0, 0.0, 0.0]], dtype=D)
        opt.step()
        hist.append((opt.tr_last.get("k"), opt.tr_last["K"][0], opt.tr_last["U"][0], w.detach().clone()))
    return hist


# Hand computation (R^0 = λ·sqrt(2) = 0.25, m = 0.5, K^0 = R^0, U^0 = η = 0.1, g = [−1, −1, 0, 0]):
#  t=0: w_d=[0,0,0,0]; U=0.1                     -> w=[0.55,0.45,−0.4,0]
#  t=1: w_d=[1,0,0,0] k=1/4; K=0.25; U=0.1       -> w=[0.65,0.55,...]     (K = R: U unchanged)
#  t=2: w_d=[1,1,0,0] k=1/4; K=0.25; U=0.1       -> w=[0.75,0.65,...]
#  t=3: k=0; K=0.125;  additive U = 0.1 + 0.1·(0.25−0.125) = 0.1125;  S1 U = 0.1·0.25/0.125 = 0.2;
#       S2 U = 0.5·0.1 + 0.5·0.2 = 0.15
#  t=4: k=0; K=0.0625; additive U = 0.1125 + 0.1·0.1875 = 0.13125; S1 U = 0.2·4 = 0.8;
#       S2 U = 0.5·0.15 + 0.5·0.15·4 = 0.375
HAND = {
    "additive": [0.1, 0.1, 0.1, 0.1125, 0.13125],
    "multiplicative": [0.1, 0.1, 0.1, 0.2, 0.8],
    "momentum": [0.1, 0.1, 0.1, 0.15, 0.375],
}


@pytest.mark.parametrize("rule", ["additive", "multiplicative", "momentum"])
def test_algorithm1_hand_computation(rule):
    hist = _run_constant_grad(rule, 5)
    ks = [h[0] for h in hist]
    assert ks == [None, 0.25, 0.25, 0.0, 0.0]
    assert [h[1] for h in hist] == pytest.approx([0.25, 0.25, 0.25, 0.125, 0.0625], abs=1e-15)
    assert [h[2] for h in hist] == pytest.approx(HAND[rule], abs=1e-14)
    # w^{t+1} = w^t − U^t g^t (plain SGD: g^t is the gradient)
    w = torch.tensor([0.45, 0.35, -0.4, 0.0], dtype=D)
    for _, _, u, w_after in hist:
        w = w - u * torch.tensor([-1.0, -1.0, 0.0, 0.0], dtype=D)
        assert torch.allclose(w_after.view(-1), w, atol=1e-14)


def test_talr_falls_and_clamps_at_zero():
    # R = 0: K > R after a transition, the additive TALR falls; a large η hits max(0, ·)
    hist = _run_constant_grad("additive", 3, lam=0.0, running_init="zero")
    assert hist[1][1] == pytest.approx(0.125) and hist[1][2] == pytest.approx(0.1 - 0.1 * 0.125)
    hist = _run_constant_grad("additive", 3, lam=0.0, running_init="zero", eta=10.0)
    assert hist[1][2] == 0.0 and hist[2][2] == 0.0


@pytest.mark.parametrize("rule", ["additive", "multiplicative", "momentum"])
@pytest.mark.parametrize("u,r", [(0.1, 1e-2), (1e-3, 5e-3), (0.5, 2e-4)])
def test_talr_criteria_s32(rule, u, r):
    # Sec. S3.2: rise when K < R, fall when K > R, unchanged when K = R
    f = {
        "additive": lambda K: talr_additive(u, K, r, eta=u),
        "multiplicative": lambda K: talr_multiplicative(u, K, r),
        "momentum": lambda K: talr_momentum(u, K, r, 0.99),
    }[rule]
    assert f(0.5 * r) > u
    assert f(1.5 * r) < u
    assert f(r) == pytest.approx(u, rel=1e-15)


def test_bad_tr_options_raise_one_line_errors():
    m = _one_layer([0.1, 0.2])
    for tr in ({"rule": "bogus"}, {"scope": "net"}, {"momentum": 1.0}, {"factr": 1e-3}, {"factor": -1.0}):
        with pytest.raises(QreproError, match="optimizer.tr"):
            SGDT(m.parameters(), model=m, lr=0.1, tr=tr)
    with pytest.raises(QreproError, match="does not take"):
        optim_tr.OPTIMIZERS.get("adamt")([{"params": list(m.parameters())}], model=m, lr=1e-3, momentum=0.9)
    fp = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(QreproError, match="quantizer=tr"):
        SGDT(fp.parameters(), model=fp, lr=0.1)


def test_target_follows_schedule_and_final_target():
    m = _one_layer([0.1, 0.2, 0.3, 0.4], bits=3)
    opt = SGDT(m.parameters(), model=m, lr=0.1, tr=dict(factor=1e-2, final_target=1e-4))
    with pytest.raises(QreproError):  # unbound: the target TR must follow a scheduler
        opt.step()
    opt.set_target_schedule(lambda t: 0.5**t)
    r0 = 1e-2 * math.sqrt(3)
    for t in range(4):
        m[0].weight.grad = torch.zeros_like(m[0].weight)
        opt.step()
        assert opt.tr_last["R"][0] == pytest.approx(1e-4 + (r0 - 1e-4) * 0.5**t, rel=1e-14)


def test_t_optimizer_groups_and_frozen_weight_scale():
    m, _ = _tiny_model()
    opt = AdamT(m.parameters(), model=m, lr=1e-3, tr=dict(scope="layer"))
    talr = [g for g in opt.param_groups if g.get("talr")]
    assert [g["params"][0] is m[i].weight for g, i in zip(talr, (3, 6))] == [True, True]
    assert all(g["fixed_lr"] for g in talr)
    assert not m[3].wq.scale.requires_grad and not m[6].wq.scale.requires_grad
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(m[3].wq.scale) not in ids and id(m[3].aq.scale) in ids and id(m[0].weight) in ids
    with pytest.raises(QreproError):
        SGDT(nn.Linear(2, 2).parameters(), model=nn.Linear(2, 2), lr=0.1)  # nothing quantized


def _batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 8, 8, generator=g, dtype=D), torch.randint(0, 5, (8,), generator=g)) for _ in range(n)]


def _train(model, opt, batches, extra_forward=False, lr_fn=None, base_lr=None):
    calibrate_scales(model, batches[0][0])
    out = []
    for t, (x, y) in enumerate(batches):
        if lr_fn is not None:  # emulate the trainer's scheduler (it skips fixed_lr groups)
            for g in opt.param_groups:
                if not g.get("fixed_lr"):
                    g["lr"] = base_lr * lr_fn(t)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if extra_forward:  # e.g. SAM's second training-mode forward: must not change the counts
            model(x + 0.1)
        opt.step()
        out.append(dict(opt.tr_last) if hasattr(opt, "tr_last") else None)
    return out


PLAIN_AND_T = [
    (torch.optim.SGD, SGDT, dict(lr=0.05, momentum=0.9, weight_decay=1e-4)),
    (torch.optim.SGD, SGDT, dict(lr=0.05, momentum=0.9, nesterov=True)),
    (torch.optim.Adam, AdamT, dict(lr=1e-2, weight_decay=1e-4)),
    (torch.optim.AdamW, AdamWT, dict(lr=1e-2, weight_decay=1e-2)),
    (torch.optim.NAdam, NAdamT, dict(lr=1e-2)),
    (torch.optim.Adamax, AdamaxT, dict(lr=1e-2)),
    (torch.optim.RMSprop, RMSpropT, dict(lr=1e-3, momentum=0.9)),
    (torch.optim.Adagrad, AdagradT, dict(lr=1e-2)),
]


@pytest.mark.parametrize("plain_cls,t_cls,kw", PLAIN_AND_T, ids=lambda v: getattr(v, "__name__", ""))
def test_frozen_talr_equals_plain_optimizer(plain_cls, t_cls, kw):
    # rule "lr": U^t = the scheduled LR -> the T-optimizer must be the plain optimizer step for step
    m1, _ = _tiny_model(learn_weight_scale=False)
    m2 = copy.deepcopy(m1)
    batches = _batches(8)
    sched = lambda t: 0.5 * (1 + math.cos(math.pi * t / 8))  # noqa: E731
    p1 = plain_cls(m1.parameters(), **kw)
    p2 = t_cls(m2.parameters(), model=m2, tr=dict(rule="lr"), **kw)
    p2.set_target_schedule(sched)
    _train(m1, p1, batches, lr_fn=sched, base_lr=kw["lr"])
    _train(m2, p2, batches, lr_fn=sched, base_lr=kw["lr"])
    for (n, a), b in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("t_cls,kw", [(SGDT, dict(lr=0.05, momentum=0.9)), (AdamT, dict(lr=1e-2))])
def test_update_uses_talr_times_optimizer_gradient_term(t_cls, kw):
    # Eq. (12): w^{t+1} = w^t − U^t·g^t with g^t the optimizer's own term (momentum buffer; Adam m̂/(√v̂+ε))
    m, _ = _tiny_model()
    opt = t_cls(m.parameters(), model=m, tr=dict(factor=0.05, scope="layer"), **kw)
    opt.set_target_schedule(lambda t: 1.0)
    batches = _batches(6)
    calibrate_scales(m, batches[0][0])
    w = m[3].weight
    buf = mom = v = None
    for t, (x, y) in enumerate(batches, start=1):
        opt.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        g, w0 = w.grad.clone(), w.detach().clone()
        opt.step()
        u = opt.tr_last["U"][0]
        if t_cls is SGDT:
            buf = g if buf is None else 0.9 * buf + g
            step = buf
        else:
            mom = 0.1 * g if mom is None else 0.9 * mom + 0.1 * g
            v = 0.001 * g * g if v is None else 0.999 * v + 0.001 * g * g
            step = (mom / (1 - 0.9**t)) / ((v / (1 - 0.999**t)).sqrt() + 1e-8)
        assert torch.allclose(w.detach(), w0 - u * step, rtol=1e-10, atol=1e-14)
    assert opt.tr_last["U"][0] != kw["lr"]  # the TALR did move


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_counting_unaffected_by_extra_forward(scope):
    m1, _ = _tiny_model()
    m2 = copy.deepcopy(m1)
    batches = _batches(10)
    o1 = SGDT(m1.parameters(), model=m1, lr=0.5, momentum=0.9, tr=dict(factor=0.05, scope=scope))
    o2 = SGDT(m2.parameters(), model=m2, lr=0.5, momentum=0.9, tr=dict(factor=0.05, scope=scope))
    for o in (o1, o2):
        o.set_target_schedule(lambda t: 1.0)
    h1 = _train(m1, o1, batches)
    h2 = _train(m2, o2, batches, extra_forward=True)
    assert sum(h["k"] for h in h1[1:]) > 0  # transitions happened
    for a, b in zip(h1, h2):
        assert a.get("k") == b.get("k") and a["K"] == b["K"] and a["U"] == b["U"]


def test_global_vs_layer_scope_and_step_size_measure():
    m, _ = _tiny_model()
    batches = _batches(6)
    hist = {}
    for scope, measure in (("global", "transitions"), ("layer", "transitions"), ("global", "step_size")):
        mm = copy.deepcopy(m)
        o = SGDT(mm.parameters(), model=mm, lr=0.5, tr=dict(factor=0.05, scope=scope, measure=measure, rule="lr"))
        o.set_target_schedule(lambda t: 1.0)
        hist[scope, measure] = _train(mm, o, batches)
    n = [m[3].weight.numel(), m[6].weight.numel()]
    for g, lay, st in zip(hist["global", "transitions"], hist["layer", "transitions"], hist["global", "step_size"]):
        assert len(g["K"]) == 1 and len(lay["K"]) == 2
        if "k" in g:
            # global k^t (Eq. 5 over all N weights) = numel-weighted mean of the per-layer rates
            assert g["k"] == pytest.approx(sum(k * c for k, c in zip(g["k_layers"], n)) / sum(n), rel=1e-12)
            # Eq. (S3): mean |Δw_q|; 2-bit moves between adjacent levels -> δ·k with δ = 1/γ = 0.5
            assert st["step_size"] <= 1.5 * g["k"] + 1e-15 and st["step_size"] >= 0.5 * g["k"] - 1e-15
    # with rule "lr" the weights are identical, so per-layer K averages to the global K
    g, lay = hist["global", "transitions"][-1], hist["layer", "transitions"][-1]
    assert g["K"][0] == pytest.approx(sum(k * c for k, c in zip(lay["K"], n)) / sum(n), rel=1e-12)


def test_state_dict_resume_is_exact():
    m1, _ = _tiny_model()
    batches = _batches(8)
    o1 = AdamT(m1.parameters(), model=m1, lr=1e-2, tr=dict(factor=0.05, scope="layer"))
    o1.set_target_schedule(lambda t: 1.0 - t / 8)
    _train(m1, o1, batches[:4])
    m2 = copy.deepcopy(m1)
    o2 = AdamT(m2.parameters(), model=m2, lr=1e-2, tr=dict(factor=0.05, scope="layer"))
    o2.set_target_schedule(lambda t: 1.0 - t / 8)
    o2.load_state_dict(copy.deepcopy(o1.state_dict()))
    h1 = _train(m1, o1, batches[4:])
    h2 = _train(m2, o2, batches[4:])
    assert h1 == h2 and h1[0]["step"] == 4


class _Logger:
    def __init__(self):
        self.rows = []

    def log(self, metrics, step=None):
        self.rows.append((step, metrics))


def test_monitor_plain_and_t_count_the_same():
    # For a plain optimizer the monitor counts after each step; for a T-optimizer it reads the optimizer's
    # count, made before the next step. With rule "lr" both runs are the same training, so the T run with
    # one batch more sees exactly the transitions the plain monitor saw.
    m, _ = _tiny_model()
    batches = _batches(9)
    res = {}
    for kind in ("plain", "t"):
        mm = copy.deepcopy(m)
        if kind == "plain":
            for _, layer in quantized_layers(mm):
                layer.wq.scale.requires_grad_(False)
            opt = torch.optim.SGD(mm.parameters(), lr=0.5)
        else:
            opt = SGDT(mm.parameters(), model=mm, lr=0.5, tr=dict(rule="lr"))
            opt.set_target_schedule(lambda t: 1.0)
        calibrate_scales(mm, batches[0][0])
        log = _Logger()
        ctx = Context(model=mm, optimizer=opt, logger=log)
        mon = TRMonitor(every=4)
        mon.on_train_start(ctx)
        for step, (x, y) in enumerate(batches[: 8 if kind == "plain" else 9], start=1):
            opt.zero_grad()
            nn.functional.cross_entropy(mm(x), y).backward()
            opt.step()
            mon.on_step_end(ctx, step)
        res[kind] = mon.on_epoch_end(ctx, 0)
        assert [r[0] for r in log.rows] == ([4, 8] if kind == "plain" else [4, 8])
        assert {"tr/3", "tr/6", "tr_running/3"} <= set(log.rows[0][1])
    p, t = res["plain"], res["t"]
    assert set(p) == {"tr", "tr_step_size", "tr_running", "talr"}
    assert set(t) == {"tr", "tr_step_size", "tr_running", "tr_target", "talr"}
    assert p["tr"] > 0 and p["tr"] == pytest.approx(t["tr"], rel=1e-12)
    assert p["tr_step_size"] == pytest.approx(t["tr_step_size"], rel=1e-12)
    assert p["talr"] == 0.5 and t["talr"] == 0.5


def test_only_one_monitor_active():
    m, _ = _tiny_model()
    opt = SGDT(m.parameters(), model=m, lr=0.1)
    ctx = Context(model=m, optimizer=opt)
    a, b = TRMonitor(), opt.hooks[-1]
    a.on_train_start(ctx)
    b.on_train_start(ctx)
    assert a.active and not b.active


# ----------------------------------------------------------------------------------------- end to end
FAST = ["logger=none", "trainer.progress=false", "model.width=8", "trainer.log_every=5"]


def _train_digits(tmp_path, extra, sub="run"):
    from qrepro.train import compose, train

    cfg = compose([*FAST, "quantizer=tr", "precision=w2a2", *extra])
    return json.loads(train(cfg, run_dir=tmp_path / sub, experiment="unit", overrides=extra).record_path.read_text())


def test_digits_sgdt_records_tr_curves_and_follows_constant_target(tmp_path):
    # Constant target R = λ·sqrt(2) with λ = 0.01. Two settings make 180 steps enough to settle: the running
    # TR momentum m = 0.9 (time constant 10 steps instead of 100) and η = 1.0 = 20·U^0 (with the paper's
    # η = U^0 the TALR needs thousands of steps to move by its own size).
    extra = [
        "optimizer=sgdt",
        "optimizer.lr=0.05",
        "scheduler=constant",
        "optimizer.tr.factor=0.01",
        "optimizer.tr.momentum=0.9",
        "optimizer.tr.eta=1.0",
        "trainer.epochs=4",
        "trainer.batch_size=32",
    ]
    rec = _train_digits(tmp_path, extra)
    c = rec["curves"]
    for key in ("tr", "tr_running", "tr_target", "talr", "tr_step_size"):
        assert len(c[key]) == 4, key
    target = 0.01 * math.sqrt(2)
    assert c["tr_target"] == pytest.approx([target] * 4, rel=1e-12)
    # tolerance: the last epoch's mean TR and the final running TR within 25% of the target
    assert c["tr"][-1] == pytest.approx(target, rel=0.25)
    assert c["tr_running"][-1] == pytest.approx(target, rel=0.25)
    assert c["talr"][-1] > 0.05  # the TALR rose from U^0 = lr to reach the target
    assert c["lr"][-1] == pytest.approx(0.05)  # non-quantized parameters keep the scheduled LR
    assert rec["metrics"]["best_top1"] > 50
    # the Fig. S3/S4-style plot script reads such records
    import runpy

    plot = runpy.run_path(str(Path(__file__).resolve().parents[1] / "scripts" / "plot_tr.py"))
    plot["main"]([str(tmp_path / "run" / "record.json"), "-o", str(tmp_path / "tr.png")])
    assert (tmp_path / "tr.png").stat().st_size > 1000


def test_digits_plain_sgd_is_monitored(tmp_path):
    extra = ["optimizer=sgd", "optimizer.lr=0.05", "scheduler=constant", "trainer.epochs=1", "trainer.batch_size=128"]
    c = _train_digits(tmp_path, extra)["curves"]
    assert {"tr", "tr_running", "talr", "tr_step_size"} <= set(c) and "tr_target" not in c
    assert 0 < c["tr"][0] < 1 and c["talr"] == [0.05]  # the LR that updates the latent weights


def test_digits_sgdt_resume_matches_uninterrupted(tmp_path, monkeypatch):
    import qrepro.engine.trainer as trainer_mod

    extra = ["optimizer=adamt", "optimizer.lr=1e-2", "trainer.epochs=2", "trainer.batch_size=128"]
    ref = _train_digits(tmp_path, extra, "ref")
    real, calls = trainer_mod.evaluate, {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # killed in epoch 2, after epoch 1 was checkpointed
        return real(*a, **k)

    monkeypatch.setattr(trainer_mod, "evaluate", flaky)
    with pytest.raises(KeyboardInterrupt):
        _train_digits(tmp_path, extra, "int")
    monkeypatch.setattr(trainer_mod, "evaluate", real)
    rec = _train_digits(tmp_path, [*extra, "resume=true"], "int")
    for key in ("tr", "tr_running", "tr_target", "talr", "test_top1"):
        assert rec["curves"][key] == pytest.approx(ref["curves"][key], rel=1e-6, abs=1e-9), key


T_OPTIMIZERS = ("sgdt", "adamt", "adamwt", "nadamt", "adamaxt", "rmspropt", "adagradt")
TABLES = sorted(Path(__file__).resolve().parents[1].joinpath("configs", "table").glob("tr_*.yaml"))


def _experiment_view(name, overrides):
    """The fields a cell is checked against: the experiment (a recipe plus its cell lines) composed with Hydra."""
    from qrepro.train import compose

    return compose([f"+experiment={name}", *overrides])


@pytest.mark.parametrize("path", TABLES, ids=lambda p: p.stem)
def test_table_cells_match_their_recipe(path):
    import yaml

    table = yaml.safe_load(path.read_text())
    ids = [c["id"] for c in table["cells"]]
    assert len(ids) == len(set(ids))
    for cell in table["cells"]:
        if not cell["experiment"].startswith("tr_") or cell.get("why"):
            continue  # the compared methods' rows (their own recipes) and paper-only rows (e.g. detection)
        cfg = _experiment_view(cell["experiment"], cell.get("overrides", []))
        assert cfg.name == cell["experiment"]
        assert (cfg.model.name, cfg.dataset.name) == (cell["model"], cell["dataset"])
        assert (cfg.precision.w_bits, cfg.precision.a_bits) == (cell["w_bits"], cell["a_bits"])
        assert cfg.optimizer.name == cell["optimizer"]
        assert cfg.quantizer.name == ("fp" if cell["w_bits"] == 32 else "tr")
        for ref in ("fp_cell", "init_from_cell"):
            assert cell.get(ref) in (None, *ids)
        if cell["dataset"].startswith("cifar"):  # Table S8 CIFAR recipe
            assert (cfg.trainer.epochs, cfg.trainer.batch_size) == (400, 256)
            assert cfg.model.shortcut == "A" and cfg.model.bn_before_fc is True
        else:
            assert (cfg.trainer.epochs, cfg.trainer.batch_size) == (120, 256)
        if cell["optimizer"] in T_OPTIMIZERS:
            assert cfg.optimizer.tr.momentum == 0.99
            assert cfg.optimizer.tr.factor == (5e-3 if cell["dataset"].startswith("cifar") else 1e-3) or any(
                o.startswith("optimizer.tr.factor=") for o in cell.get("overrides", [])
            )
        if any(o.startswith("scheduler=multistep") for o in cell.get("overrides", [])):
            assert cfg.scheduler.name == "multistep" and list(cfg.scheduler.milestones) == [100, 200, 300]
            assert cfg.scheduler.gamma == 0.2
        else:
            assert cfg.scheduler.name == "cosine"


# ------------------------------------------------------------------- the authors' code as named switches
def test_initial_target_direct_or_sqrt_bits():
    # optimizer.tr.target_init: sqrt_bits = paper (R^0 = λ·sqrt(b_w), 7.07e-3 at 2 bits); direct = the
    # authors' run.sh, which passes the initial target itself (--initial_tr 5e-3)
    for init, r0 in (("sqrt_bits", 5e-3 * math.sqrt(2)), ("direct", 5e-3)):
        m = _one_layer([0.1, 0.2, 0.3, 0.4], bits=2)
        opt = SGDT(m.parameters(), model=m, lr=0.1, tr=dict(target_init=init, target_schedule="constant"))
        m[0].weight.grad = torch.zeros_like(m[0].weight)
        opt.step()
        assert opt.tr_last["R"] == [r0] and opt.tr_last["K"] == [r0]  # K^0 = R^0 (running_init: target)
    with pytest.raises(QreproError, match="target_init"):
        SGDT(m.parameters(), model=m, lr=0.1, tr=dict(target_init="lambda"))


def test_running_eps_is_the_authors_denominator():
    # authors' custom_optims: lr_scale <- m·lr_scale + (1 − m)·lr_scale·R/(K + 1e-8); U = α·lr_scale
    u, big_k, r, m = 0.1, 3e-3, 5e-3, 0.99
    assert talr_momentum(u, big_k, r, m, 1e-8) == m * u + (1 - m) * (u * r / (big_k + 1e-8))
    assert talr_momentum(u, big_k, r, m, 1e-8) != talr_momentum(u, big_k, r, m)
    assert talr_multiplicative(u, 0.0, 0.0, 1e-8) == 0.0 and talr_multiplicative(u, 0.0, r, 1e-8) == u * r / 1e-8
    hist = _run_constant_grad("momentum", 5, running_eps=1e-8)
    u = 0.1
    for big_k in (0.25, 0.25, 0.125):  # t = 1, 2, 3 of the hand computation above
        u = 0.5 * u + 0.5 * (u * 0.25 / (big_k + 1e-8))
    assert hist[3][2] == pytest.approx(u, rel=1e-14)
    assert hist[3][2] != pytest.approx(0.15, rel=1e-9)  # the eps moves it (0.15 without)


@pytest.mark.parametrize("name,kw", [("cosine", {}), ("multistep", {"milestones": [2, 3], "gamma": 0.2})])
def test_scheduler_per_epoch_matches_torch_epoch_stepping(name, kw):
    # scheduler.per_epoch: the factor of an epoch is that of its first step, as a torch lr_scheduler stepped
    # once per epoch (the authors' train_quant.py: CosineAnnealingLR(T_max=epochs), scheduler.step() per epoch)
    from qrepro.optim import build_scheduler

    epochs, spe = 5, 3
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    sch = build_scheduler(opt, name, total_steps=epochs * spe, steps_per_epoch=spe, per_epoch=True, **kw)
    ref_opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    if name == "cosine":
        ref = torch.optim.lr_scheduler.CosineAnnealingLR(ref_opt, T_max=epochs, eta_min=0)
    else:
        ref = torch.optim.lr_scheduler.MultiStepLR(ref_opt, milestones=kw["milestones"], gamma=kw["gamma"])
    for e in range(epochs):
        for i in range(spe):
            assert opt.param_groups[0]["lr"] == pytest.approx(ref_opt.param_groups[0]["lr"], rel=1e-12, abs=1e-15)
            assert sch.factor(e * spe + i) == sch.factor(e * spe)
            sch.step()
        ref_opt.step()
        ref.step()
    # per iteration (default) the factor changes inside an epoch
    p2 = nn.Parameter(torch.zeros(1))
    it = build_scheduler(torch.optim.SGD([p2], lr=0.1), "cosine", total_steps=epochs * spe, steps_per_epoch=spe)
    assert it.factor(1) < it.factor(0) == 1.0
    with pytest.raises(QreproError, match="per_epoch"):
        build_scheduler(opt, name, total_steps=10, steps_per_epoch=2, per_epoch="yes", **kw)


@pytest.mark.parametrize("opt_name", ["sgdt", "adamt", "sgd", "adam"])
def test_cifar_experiments_follow_the_authors(opt_name):
    # the CIFAR TR experiments as the authors' train_quant.py/run.sh set them up: scales at lr 0.01 (run.sh
    # --scale_lr default, SGD and Adam alike) without momentum/weight decay, BatchNorm without momentum/weight
    # decay, everything else with the optimizer's defaults; R^0 = 5e-3 given directly; the schedule stepped per
    # epoch; |s| + 1e-6; CIFAR std (0.2023, 0.1994, 0.2010)
    from qrepro.api import build

    exp = f"tr_resnet20_cifar10_w2a2_{opt_name}"
    run = build(
        [f"+experiment={exp}", "trainer.device=cpu", "trainer.epochs=2"],
        load_data=False,
        num_classes=10,
        steps_per_epoch=4,
    )
    cfg, model, opt = run.cfg, run.model, run.optimizer
    assert list(cfg.dataset.std) == [0.2023, 0.1994, 0.2010] and list(cfg.dataset.mean) == [0.4914, 0.4822, 0.4465]
    assert cfg.scheduler.per_epoch is True  # 2 epochs of 4 steps: the cosine factor changes at step 4 only
    assert [run.scheduler.factor(t) for t in (0, 3, 4, 7)] == pytest.approx([1.0, 1.0, 0.5, 0.5], abs=1e-15)
    sgd = opt_name.startswith("sgd")
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    a_scale = model.layer1[0].conv1.aq.scale
    for p in (a_scale, model.bn1.weight, model.layer2[1].bn2.bias, model.bn_fc.weight):
        g = group_of[id(p)]
        assert g["weight_decay"] == 0.0 and g.get("momentum", 0.0) == 0.0
        assert g["lr"] == pytest.approx(0.01 if p is a_scale else (0.1 if sgd else 1e-3))
    for p in (model.conv1.weight, model.fc.weight, model.fc.bias, model.layer3[2].conv2.weight):
        g = group_of[id(p)]
        assert g["weight_decay"] == 1e-4 and g.get("momentum", 0.9) == 0.9
    w_scale = model.layer1[0].conv1.wq.scale
    if opt_name.endswith("t"):
        assert id(w_scale) not in group_of and cfg.optimizer.tr.target_init == "direct"
        # the authors' TALR (talr: authors): one TR and TALR per quantized weight tensor, R^0 = K^0 = 5e-3
        assert (cfg.optimizer.tr.rule, cfg.optimizer.tr.scope) == ("momentum", "layer")
        assert len(opt._tr_r0) == 18 and set(opt._tr_r0) == {5e-3} and set(opt._tr_K) == {5e-3}
    else:
        assert group_of[id(w_scale)]["lr"] == pytest.approx(0.01) and group_of[id(w_scale)]["weight_decay"] == 0.0
    assert model.layer1[0].conv1.aq.eps == 1e-6 and model.layer1[0].conv1.wq.eps == 1e-6
