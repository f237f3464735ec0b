"""SatNL / SymReg / KURE maths, the robust training methods and the ASAM optimizer."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from qrepro.errors import QreproError
from qrepro.optim.asam import ASAM
from qrepro.quant import build_method, prepare
from qrepro.quant.layers import QConv2d, QLinear
from qrepro.quant.methods.robust import SatNLWeight, robust_regularizer
from qrepro.quant.robust import SATNL_FUNCTIONS, kure_loss, kurtosis, satnl, symreg_loss

D = torch.float64


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 5)
    )


# ------------------------------------------------------------------------------------------------ SymReg
def test_symreg_zero_for_symmetric_tensor():
    w = torch.randn(500, dtype=D)
    sym = torch.cat([w, -w])[torch.randperm(1000)].reshape(10, 100)
    assert symreg_loss(sym).item() == pytest.approx(0.0, abs=1e-24)


def test_symreg_positive_for_asymmetric_tensor():
    v = torch.randn(500, dtype=D)
    w = torch.cat([v, -v])
    assert symreg_loss(w + 0.3).item() == pytest.approx(4 * 0.3**2, rel=1e-12)  # shift c of symmetric: (2c)²
    assert symreg_loss(torch.rand(1000, dtype=D)).item() > 0.1  # one-sided
    assert symreg_loss(torch.tensor([1.0, 2.0], dtype=D)).item() == pytest.approx(9.0)  # ((1+2)^2·2)/2


def test_symreg_is_squared_w2_between_w_and_minus_w():
    # optimal matching of {w_i} with {−w_j} (brute force over permutations) == sorted closed form
    w = torch.randn(6, dtype=D, generator=torch.Generator().manual_seed(3)) + 0.4
    best = min(sum((w[i] - (-w[j])) ** 2 for i, j in enumerate(p)).item() / 6 for p in itertools.permutations(range(6)))
    assert symreg_loss(w).item() == pytest.approx(best, rel=1e-12)


def test_symreg_gradient_step_reduces_asymmetry():
    w = (torch.randn(2000, dtype=D).exp() - 0.8).requires_grad_(True)  # skewed
    before = symreg_loss(w)
    before.backward()
    skew_before = w.detach().mean().abs()
    with torch.no_grad():
        w2 = w - 0.1 * w.grad * w.numel()
    assert symreg_loss(w2).item() < before.item()
    assert w2.mean().abs().item() < skew_before.item()


def test_symreg_gradient_matches_finite_differences():
    w = (torch.randn(7, dtype=D) + 0.2).requires_grad_(True)
    assert torch.autograd.gradcheck(symreg_loss, (w,))


# ------------------------------------------------------------------------------------------------ SatNL
@pytest.mark.parametrize("fn", sorted(SATNL_FUNCTIONS))
@pytest.mark.parametrize("d", [0.05, 1.0, 3.0])
def test_satnl_odd_bounded_unit_slope(fn, d):
    x = torch.linspace(-50, 50, 20001, dtype=D)
    y = satnl(x, d, fn)
    assert torch.allclose(satnl(-x, d, fn), -y, atol=0, rtol=0)  # odd
    assert y.abs().max().item() <= d  # bounded by d
    assert y.abs().max().item() > 0.9 * d  # and saturates towards d
    # slope 1 at 0, decreasing with |x|
    xs = torch.linspace(0, 5 * d, 101, dtype=D).requires_grad_(True)
    (g,) = torch.autograd.grad(satnl(xs, d, fn).sum(), xs)
    assert g[0].item() == pytest.approx(1.0, abs=1e-9)
    assert bool((g[1:] <= g[:-1] + 1e-15).all())


def test_satnl_tanh_closed_form_and_gradient():
    w = torch.randn(50, dtype=D).requires_grad_(True)
    d = 0.7
    y = satnl(w, d)
    assert torch.allclose(y, d * torch.tanh(w / d))
    (g,) = torch.autograd.grad(y.sum(), w)
    assert torch.allclose(g, 1 - torch.tanh(w / d) ** 2)


def test_satnl_unknown_function():
    with pytest.raises(QreproError, match="tanh"):
        satnl(torch.zeros(2), 1.0, "relu")


def test_satnl_weight_std_mode_bounds_by_multiple_of_std():
    w = torch.randn(4, 3, 3, 3, dtype=D) * 0.1
    m = SatNLWeight(d=2.0, d_mode="std")
    assert m(w).abs().max().item() < 2.0 * w.std().item()


# ------------------------------------------------------------------------------------------------ KURE
def test_kurtosis_reference_values():
    g = torch.Generator().manual_seed(0)
    n = 400_000
    assert kurtosis(torch.rand(n, dtype=D, generator=g)).item() == pytest.approx(1.8, abs=0.02)
    assert kurtosis(torch.randn(n, dtype=D, generator=g)).item() == pytest.approx(3.0, abs=0.05)
    lap = torch.distributions.Laplace(0.0, 1.0).sample((n,)).double()
    assert kurtosis(lap).item() == pytest.approx(6.0, abs=0.3)


def test_kure_loss_uniform_near_zero_gaussian_positive():
    g = torch.Generator().manual_seed(1)
    assert kure_loss(torch.rand(200_000, dtype=D, generator=g) * 2 - 1).item() < 1e-3
    assert kure_loss(torch.randn(200_000, dtype=D, generator=g)).item() == pytest.approx(1.44, abs=0.1)
    assert kure_loss(torch.randn(1000, dtype=D), target=3.0).item() < 0.2


# ------------------------------------------------------------------------------------------------ methods
def test_satnl_method_prepares_all_layers_and_rejects_bits():
    m = build_method("satnl", 32, 32, d=0.5, fn="erf")
    net = prepare(_net(), m)
    layers = [x for x in net.modules() if isinstance(x, (QConv2d, QLinear))]
    assert len(layers) == 3 and all(isinstance(x.wq, SatNLWeight) and x.aq is None for x in layers)
    assert torch.allclose(layers[0].effective_weight(), satnl(layers[0].weight, 0.5, "erf"))
    assert m.regularizer is None
    with pytest.raises(QreproError, match="precision"):
        build_method("satnl", 4, 4)
    with pytest.raises(QreproError):
        build_method("satnl", 32, 32, fn="nope")


def test_symreg_and_kure_methods_leave_layers_fp_and_add_losses():
    net = _net()
    ms = build_method("symreg", 32, 32, symreg_coef=0.5)
    assert prepare(net, ms) is net and not any(isinstance(x, QConv2d) for x in net.modules())
    ws = [net[0].weight, net[2].weight, net[5].weight]
    expect = 0.5 * sum(symreg_loss(w) for w in ws)
    assert torch.allclose(ms.regularizer(net), expect)
    mk = build_method("kure", 32, 32, kure_coef=2.0)
    # KURE: every conv except the first, averaged over layers; the linear layer is not included
    assert torch.allclose(mk.regularizer(net), 2.0 * kure_loss(net[2].weight))


@pytest.mark.parametrize("quantizer", ["kure", "satnl", "symreg", "robust_qat"])
def test_kure_term_is_added_once(quantizer):
    """KURE (paper and reference code) adds λ·mean (Kurt − 1.8)² to the loss once: the composed quantizer
    configs carry no switch that adds it a second time, and the experiment's loss term is exactly λ·KURE."""
    from qrepro.train import compose

    over = ["+experiment=symreg_digits_kure", f"quantizer={quantizer}", "quantizer.kure_coef=0.5"]
    if quantizer != "kure":
        over.append("quantizer.symreg_coef=0.0")
    if quantizer == "robust_qat":
        over.append("precision=w4a4")
    q = dict(compose(over).quantizer)
    assert not any("double" in k for k in q), q
    name = q.pop("name")
    m = build_method(name, 4 if name == "robust_qat" else 32, 4 if name == "robust_qat" else 32, **q)
    net = prepare(_net(), m)
    w = net[2].effective_weight() if hasattr(net[2], "effective_weight") else net[2].weight
    assert torch.allclose(m.regularizer(net).double(), 0.5 * kure_loss(w).double(), rtol=1e-12, atol=0)
    with pytest.raises(QreproError, match="kure_double_count"):
        build_method("kure", 32, 32, kure_coef=2.0, kure_double_count=True)


def test_ours_regularizes_the_satnl_weight():
    m = build_method("satnl", 32, 32, d=0.05, symreg_coef=1.0, kure_coef=1.0)
    net = prepare(_net(), m)
    r = robust_regularizer(net, symreg_coef=1.0, kure_coef=1.0)
    ws = [satnl(net[i].weight, 0.05) for i in (0, 2, 5)]
    expect = sum(symreg_loss(w) for w in ws) + kure_loss(ws[1])
    assert torch.allclose(m.regularizer(net), expect) and torch.allclose(r, expect)
    m.regularizer(net).backward()
    assert net[0].weight.grad is not None and net[2].weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------ ASAM
def _asam_problem():
    torch.manual_seed(0)
    lin = nn.Linear(3, 1).double()
    x, y = torch.randn(16, 3, dtype=D), torch.randn(16, 1, dtype=D)

    def loss_at(params):
        w, b = params
        return ((x @ w.T + b - y) ** 2).mean()

    return lin, loss_at


@pytest.mark.parametrize("adaptive,scope", [(True, "weights"), (True, "all"), (False, "weights")])
def test_asam_step_matches_equations(adaptive, scope):
    lin, loss_at = _asam_problem()
    rho, eta, lr = 0.5, 0.01, 0.1
    w0 = [p.detach().clone() for p in lin.parameters()]
    # ε = ρ T² g / ‖T g‖, T = |w| + η (I for SAM); w ← w − lr ∇L(w + ε). ASAM reference (scope "weights"):
    # T = |w| + η only for parameters named *weight*; the bias gets T = 1 but shares the norm.
    ps = [p.clone().requires_grad_(True) for p in w0]
    g = torch.autograd.grad(loss_at(ps), ps)
    names = [n for n, _ in lin.named_parameters()]
    t = [
        p.abs() + eta if adaptive and (scope == "all" or "weight" in n) else torch.ones_like(p)
        for n, p in zip(names, w0)
    ]
    norm = torch.sqrt(sum(((ti * gi) ** 2).sum() for ti, gi in zip(t, g)))
    eps = [rho * ti**2 * gi / norm for ti, gi in zip(t, g)]
    pe = [(p + e).requires_grad_(True) for p, e in zip(w0, eps)]
    g2 = torch.autograd.grad(loss_at(pe), pe)
    expect = [p - lr * gi for p, gi in zip(w0, g2)]

    sgd = torch.optim.SGD(lin.parameters(), lr=lr)
    opt = ASAM(sgd, rho=rho, eta=eta, adaptive=adaptive, scale_scope=scope, model=lin)
    calls, seen = [], []

    def closure():
        seen.append([p.detach().clone() for p in lin.parameters()])
        opt.zero_grad()
        loss = loss_at(list(lin.parameters()))
        loss.backward()
        calls.append(loss.detach())
        return loss

    # the training loop's contract: forward/backward at w first, then step(closure) re-evaluates at w + ε
    opt.zero_grad()
    loss_at(list(lin.parameters())).backward()
    loss = opt.step(closure)
    assert len(calls) == 1 and torch.equal(loss.detach(), calls[0])
    for p, e in zip(seen[0], [p + e for p, e in zip(w0, eps)]):
        assert torch.allclose(p, e, atol=1e-14, rtol=0)  # the perturbed point itself
    for p, e in zip(lin.parameters(), expect):
        assert torch.allclose(p.detach(), e, atol=1e-14)
    assert ASAM.needs_closure and opt.param_groups is opt.base.param_groups


def test_asam_bias_is_perturbed_sam_style_as_in_the_reference():
    """ASAM reference (SamsungLabs/ASAM): biases are perturbed with T = 1, not with |b| + η; a small bias
    (|b| << 1) therefore moves much more than with the adaptive scale."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 1)).double()
    with torch.no_grad():
        for m in net:
            if getattr(m, "bias", None) is not None:
                m.bias.mul_(0.01)
    x, y = torch.randn(8, 4, dtype=D), torch.randn(8, 1, dtype=D)
    out = {}
    for scope in ("weights", "all"):
        n2 = __import__("copy").deepcopy(net)
        opt = ASAM(torch.optim.SGD(n2.parameters(), lr=0.1), rho=0.5, scale_scope=scope, model=n2)
        ((n2(x) - y) ** 2).mean().backward()
        opt._perturb()
        out[scope] = {k: opt._eps[p].clone() for k, p in n2.named_parameters()}
        grads = {k: p.grad for k, p in n2.named_parameters()}
        ps = dict(n2.named_parameters())
        opt._restore()
    eps, grads = out["weights"], grads
    t = {k: (ps[k].detach().abs() + 0.01) if "weight" in k else torch.ones_like(ps[k]) for k in ps}
    norm = torch.sqrt(sum(((t[k] * grads[k]) ** 2).sum() for k in ps))
    for k in ps:
        assert torch.allclose(eps[k], 0.5 * t[k] ** 2 * grads[k] / norm, rtol=1e-12, atol=0), k
    # BatchNorm weight ("1.weight") is scaled like the reference; biases are not
    b = [k for k in ps if k.endswith("bias")]
    assert sum(eps[k].norm() for k in b) > 5 * sum(out["all"][k].norm() for k in b)


def test_asam_needs_closure_and_checks_rho():
    lin, _ = _asam_problem()
    opt = ASAM(torch.optim.SGD(lin.parameters(), lr=0.1), model=lin)
    with pytest.raises(QreproError, match="closure"):
        opt.step()
    with pytest.raises(QreproError, match="parameter names"):
        ASAM(torch.optim.SGD(lin.parameters(), lr=0.1))  # scale_scope=weights needs the names
    with pytest.raises(QreproError, match="scale_scope"):
        ASAM(torch.optim.SGD(lin.parameters(), lr=0.1), scale_scope="bias")
    with pytest.raises(QreproError, match="rho"):
        ASAM(torch.optim.SGD(lin.parameters(), lr=0.1), rho=0.0)
    assert math.isclose(opt.param_groups[0]["lr"], 0.1)


def test_asam_registered_and_scheduled():
    from qrepro.optim import build_optimizer, build_scheduler

    net = _net()
    opt = build_optimizer(
        net, "asam_sgd", [{"tags": ["bias"], "weight_decay": 0.0}], lr=0.4, momentum=0.9, weight_decay=1e-5, rho=0.2
    )
    assert isinstance(opt, ASAM) and opt.rho == 0.2 and opt.needs_closure
    sch = build_scheduler(opt, "cosine", total_steps=10, steps_per_epoch=2, warmup_epochs=1)
    sch.step()
    assert opt.base.param_groups[0]["lr"] == pytest.approx(0.2)  # the scheduler drives the base optimizer
    sd = opt.state_dict()
    opt.load_state_dict(sd)
    with pytest.raises(QreproError, match="asam"):
        build_optimizer(net, "asam_sgd", None, lr=0.1, betas=(0.9, 0.99))


# ------------------------------------------------------------------------------------------------ QAT
def test_robust_qat_calibrates_once_and_quantizes_satnl_weights():
    from qrepro.hooks import Context
    from qrepro.quant.quantizers import TransformedQuantizer, UniformQuantizer

    m = build_method("robust_qat", 3, 4, d=0.2, symreg_coef=1.0, first_last_bits=None, init="aciq")
    net = prepare(_net(), m)
    x = torch.randn(8, 3, 8, 8)
    assert isinstance(net[2].wq, TransformedQuantizer) and isinstance(net[2].aq, UniformQuantizer)
    assert net[0].aq is None  # the network input is not quantized
    m.hooks[0].on_train_start(Context(model=net, sample_batch=(x, None)))
    qs = [q for q in net.modules() if isinstance(q, UniformQuantizer)]
    assert all(q.initialized for q in qs) and net[2].aq.signed is False  # post-ReLU input
    w = net[2].effective_weight()
    assert w.unique().numel() <= 8 and w.abs().max().item() < 0.2
    steps = [q.step.detach().clone() for q in qs]
    net[2].wq.quant.step.data.mul_(2)
    m.hooks[0].on_train_start(Context(model=net, sample_batch=(x, None)))  # resume: no re-calibration
    assert net[2].wq.quant.step.item() == pytest.approx(2 * steps[1].item())
    # state (including the signedness of each input quantizer) survives a state_dict round trip
    net2 = prepare(_net(), build_method("robust_qat", 3, 4, d=0.2, first_last_bits=None))
    net2.load_state_dict(net.state_dict())
    assert torch.equal(net2(x), net(x))
    loss = net(x).square().mean() + m.regularizer(net)
    loss.backward()
    assert net[2].wq.quant.step.grad is not None and net[2].weight.grad.abs().sum() > 0
    with pytest.raises(QreproError):
        build_method("robust_qat", 1, 4)


def test_robust_qat_with_ema_starts_from_calibrated_quantizers(tmp_path):
    from qrepro.train import compose, train

    over = ["+experiment=symreg_qat_digits_ours", "logger=none", "trainer.progress=false", "model.width=8"]
    over += ["trainer.epochs=1", "trainer.ema=0.99", "trainer.batch_size=256", f"out_root={tmp_path}"]
    res = train(compose(over), run_dir=tmp_path / "qat", experiment="unit", overrides=[])
    assert res.record["complete"] and res.record["method"] == "robust_qat"
    st = torch.load(tmp_path / "qat" / "checkpoints" / "last.pt", weights_only=True)
    steps = {k: v for k, v in st["ema"].items() if k.endswith(".step")}
    assert steps and all(float(v) < 0.5 for v in steps.values())  # calibrated, not the 1.0 placeholder
    assert all(bool(v) for k, v in st["ema"].items() if k.endswith("initialized_flag"))


@pytest.mark.parametrize("name,bits", [("satnl", 32), ("robust_qat", 4)])
def test_methods_trace_without_graph_breaks(name, bits):
    from qrepro.hooks import Context

    torch._dynamo.reset()
    m = build_method(name, bits, bits, symreg_coef=1.0, kure_coef=1.0, d_mode="std", d=2.0)
    net = prepare(_net(), m)
    x = torch.randn(4, 3, 8, 8)
    for h in m.hooks:
        h.on_train_start(Context(model=net, sample_batch=(x, None)))

    def step(inp):
        return net(inp).square().mean() + m.regularizer(net)

    compiled = torch.compile(step, backend="eager", fullgraph=True)  # fullgraph: any graph break raises
    assert torch.allclose(compiled(x), step(x))


def test_robust_qat_per_channel_steps():
    from qrepro.hooks import Context

    m = build_method("robust_qat", 4, 4, first_last_bits=None, weight_granularity="channel", init="minmax")
    net = prepare(_net(), m)
    m.hooks[0].on_train_start(Context(model=net, sample_batch=(torch.randn(8, 3, 8, 8), None)))
    q = net[2].wq.quant
    assert q.step.shape == (6, 1, 1, 1) and net[5].wq.quant.step.shape == (5, 1)
    w = satnl(net[2].weight, 1.0).detach()
    assert torch.allclose(q.alpha.flatten(), w.abs().flatten(1).amax(1))  # per-channel min-max
    with pytest.raises(QreproError, match="granularity"):
        build_method("robust_qat", 4, 4, weight_granularity="group")
