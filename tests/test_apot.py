"""APoT (papers/apot.md): level sets, projection, RCF gradients, WN, Eq. (14), cost model, method policy."""

from __future__ import annotations

import json
import math
from itertools import product
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf
from torch import nn

from qrepro.errors import QreproError
from qrepro.quant import apot as qa
from qrepro.quant import apot_levels, build_method, lloyd_max_levels, prepare, project
from qrepro.quant.layers import QConv2d, QLinear, quantized_layers
from qrepro.quant.methods import LayerInfo
from qrepro.quant.methods.apot import APoTActQuantizer, APoTWeightQuantizer, MaxScaledWeightQuantizer

D = torch.float64


def _sums(*terms: list[float]) -> torch.Tensor:
    s = torch.tensor(sorted({sum(c) for c in product(*terms)}), dtype=D)
    return s / s.max()


# ------------------------------------------------------------------------------------------ level sets
def test_levels_b4_k2_paper_example():
    lv = apot_levels(4, 2)
    # p0 in {0, 2^0, 2^-2, 2^-4}, p1 in {0, 2^-1, 2^-3, 2^-5}, gamma = 2 alpha / 3 (Sec. 2.2)
    p0, p1 = [0, 1, 2**-2, 2**-4], [0, 2**-1, 2**-3, 2**-5]
    expect = torch.tensor(sorted({2 / 3 * (a + b) for a in p0 for b in p1}), dtype=D)
    assert lv.numel() == 16
    torch.testing.assert_close(lv, expect, rtol=0, atol=1e-15)
    assert lv[1].item() == pytest.approx(2**-4 / 3, abs=1e-15)  # smallest positive level
    assert int(((lv > 0.5) & (lv < 1.0)).sum()) == 3  # three new levels between 2^-1 and 2^0


def test_levels_b3_eq6_paper_example():
    # every level is one p0 in {0, 2^-1, 2^-2, 2^-4} plus one p~ in {0, 2^-3} (Sec. 2.2, Eq. 6)
    expect = _sums([0, 2**-1, 2**-2, 2**-4], [0, 2**-3])
    torch.testing.assert_close(apot_levels(3), expect, rtol=0, atol=1e-15)
    torch.testing.assert_close(apot_levels(3), torch.tensor([0, 0.1, 0.2, 0.3, 0.4, 0.6, 0.8, 1.0], dtype=D))


@pytest.mark.parametrize(
    "bits,bases",
    [  # the authors' code builds the sets from bases half the paper's; normalising makes them identical
        (2, [[0, 2**-1, 2**-2, 2**-3]]),
        (4, [[0, 2**-1, 2**-3, 2**-5], [0, 2**-2, 2**-4, 2**-6]]),
        (5, [[0, 2**-1, 2**-3, 2**-6], [0, 2**-2, 2**-4, 2**-7], [0, 2**-5]]),
        (6, [[0, 2**-1, 2**-4, 2**-7], [0, 2**-2, 2**-5, 2**-8], [0, 2**-3, 2**-6, 2**-9]]),
    ],
)
def test_levels_equal_half_base_construction(bits, bases):
    torch.testing.assert_close(apot_levels(bits), _sums(*bases), rtol=0, atol=1e-15)


@pytest.mark.parametrize("bits", range(2, 9))
def test_levels_structure_and_special_cases(bits):
    lv = apot_levels(bits)
    assert lv.numel() == 2**bits and lv[0] == 0 and lv[-1] == 1
    assert torch.all(lv[1:] > lv[:-1])
    # k = 1: fixed point, uniform
    torch.testing.assert_close(apot_levels(bits, 1), torch.arange(2**bits, dtype=D) / (2**bits - 1))
    # k = b: powers of two {0, 2^-(2^b-2), ..., 2^-1, 1} (Eq. 3)
    pot = torch.tensor([0.0] + [2.0**-j for j in range(2**bits - 2, -1, -1)], dtype=D)
    torch.testing.assert_close(apot_levels(bits, bits), pot, rtol=0, atol=0)


def test_levels_bad_input():
    for bad in (1, 9, 0):
        with pytest.raises(QreproError, match="2..8"):
            apot_levels(bad)
    with pytest.raises(QreproError, match="divisible"):
        apot_levels(6, 4)
    with pytest.raises(QreproError):
        apot_levels(4, 0)


def test_magnitude_sets_signed_weights():
    torch.testing.assert_close(qa.magnitude_levels("apot", 2), torch.tensor([0.0, 1.0], dtype=D))  # ternary
    torch.testing.assert_close(qa.magnitude_levels("apot", 4), apot_levels(3))  # sign + 3-bit magnitude
    torch.testing.assert_close(qa.magnitude_levels("pot", 5), apot_levels(4, 4))
    torch.testing.assert_close(qa.magnitude_levels("uniform", 3), torch.tensor([0, 1 / 3, 2 / 3, 1], dtype=D))


# ------------------------------------------------------------------------------------------ projection
@settings(max_examples=60, deadline=None)
@given(
    bits=st.integers(2, 8),
    k=st.sampled_from(["apot", "pot", "uniform"]),
    xs=st.lists(st.floats(-0.5, 1.5, allow_nan=False), min_size=1, max_size=40),
    dtype=st.sampled_from([torch.float32, D]),
)
def test_project_returns_nearest_level(bits, k, xs, dtype):
    """Same decision as a brute-force argmin of |x - l| in the working dtype (the authors' projection)."""
    lv = qa.level_set(k, bits).to(dtype)
    x = torch.tensor(xs, dtype=dtype)
    q = project(x, lv)
    dist = (x[:, None] - lv[None, :]).abs()
    assert torch.isin(q, lv).all()
    torch.testing.assert_close((x - q).abs(), dist.min(dim=1).values, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, D])
@pytest.mark.parametrize("k", ["apot", "pot", "uniform"])
def test_compiled_projection_chain_equals_bucketize(k, dtype):
    """The compare-and-select chain used inside compiled graphs returns exactly the bucketize projection,
    also on the levels, on the midpoints and one float step either side of them, and outside the range."""
    for bits in (2, 3, 4, 5):
        lv = qa.level_set(k, bits).to(dtype)
        assert lv.numel() <= qa.CHAIN_MAX_LEVELS
        mid = (lv[1:] + lv[:-1]) / 2
        inf = torch.tensor(float("inf"), dtype=dtype)
        x = torch.cat([lv, mid, torch.nextafter(mid, inf), torch.nextafter(mid, -inf)])
        x = torch.cat([x, torch.linspace(-0.5, 1.5, 2001, dtype=dtype), -x])
        assert torch.equal(qa._project_chain(x, lv), project(x, lv)), (k, bits)
    compiled = torch.compile(lambda t: qa.project(t, qa.level_set(k, 4).to(dtype)), backend="aot_eager")
    x = torch.linspace(-0.3, 1.3, 777, dtype=dtype)
    assert torch.equal(compiled(x), project(x, qa.level_set(k, 4).to(dtype)))


def test_project_signed_is_symmetric():
    lv = apot_levels(3)
    x = torch.linspace(-1.2, 1.2, 101, dtype=D)
    q = qa.project_signed(x, lv)
    torch.testing.assert_close(q, -qa.project_signed(-x, lv))
    assert torch.isin(q.abs(), lv).all()


# -------------------------------------------------------------------------------------- RCF gradients
def _away_from_boundaries(x: torch.Tensor, alpha: float, lv: torch.Tensor, gap: float = 1e-3) -> torch.Tensor:
    u = x.abs() / alpha
    mids = (lv[1:] + lv[:-1]) / 2
    bad = ((u[:, None] - mids[None]).abs() < gap).any(1) | ((u - 1).abs() < gap)
    return x[~bad]


@pytest.mark.parametrize("bits", [2, 3, 4, 5])
def test_rcf_weight_alpha_gradient_eq8(bits):
    g = torch.Generator().manual_seed(bits)
    lv = qa.magnitude_levels("apot", bits)
    alpha0 = 1.3
    w = _away_from_boundaries(torch.randn(4000, generator=g, dtype=D) * 1.2, alpha0, lv)
    up = torch.randn(w.shape, generator=g, dtype=D)  # upstream gradient
    alpha = torch.tensor(alpha0, dtype=D, requires_grad=True)
    wr = w.clone().requires_grad_(True)
    out = qa.rcf_weight(wr, alpha, lv)
    (out * up).sum().backward()
    inside = w.abs() <= alpha0
    # Eq. (8) / (13c): sign(W) outside, Pi(W/alpha) - W/alpha inside
    eq8 = torch.where(inside, qa.project_signed(w / alpha0, lv) - w / alpha0, torch.sign(w))
    torch.testing.assert_close(alpha.grad, (up * eq8).sum(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(wr.grad, up)  # STE: dW^/dW = 1 everywhere (CIFAR code, paper Sec. 2.5)
    # forward value: alpha * Pi(clip(W/alpha))
    torch.testing.assert_close(out.detach(), alpha0 * qa.project_signed(torch.clamp(w / alpha0, -1, 1), lv))


@pytest.mark.parametrize("clip", ["rcf", "pact"])
@pytest.mark.parametrize("alpha0", [-0.8, -2.5, 0.0])
def test_ste_weight_gradient_is_straight_through_for_nonpositive_alpha(clip, alpha0):
    """A learned alpha_w can reach 0 or go negative (2-bit CIFAR runs do). The straight-through weight gradient
    (authors' CIFAR code: the upstream gradient, returned unchanged) must stay 1 everywhere whatever alpha is."""
    g = torch.Generator().manual_seed(7)
    lv = qa.magnitude_levels("apot", 3)
    w = torch.randn(3000, generator=g, dtype=D) * 1.5
    if alpha0 != 0.0:
        w = _away_from_boundaries(w, abs(alpha0), lv)
    up = torch.randn(w.shape, generator=g, dtype=D)
    wr = w.clone().requires_grad_(True)
    alpha = torch.tensor(alpha0, dtype=D, requires_grad=True)
    fn = qa.rcf_weight if clip == "rcf" else qa.pact_weight
    out = fn(wr, alpha, lv, grad="ste")
    (out * up).sum().backward()
    assert torch.equal(wr.grad, up)  # exactly the upstream gradient, inside and outside the clip range
    if alpha0 == 0.0 or clip == "pact":
        return
    # alpha < 0, RCF: forward alpha * sign(c) Pi(|c|), c = clip(W/alpha, -1, 1); alpha gradient of the authors'
    # backward: sign(W/alpha) where |W/alpha| > 1, Pi(W/alpha) - W/alpha inside
    u = w / alpha0
    c = torch.clamp(u, -1.0, 1.0)
    torch.testing.assert_close(out.detach(), alpha0 * qa.project_signed(c, lv), rtol=1e-14, atol=1e-14)
    eq8 = torch.where(u.abs() > 1, torch.sign(u), qa.project_signed(c, lv) - u)
    torch.testing.assert_close(alpha.grad, (up * eq8).sum(), rtol=1e-12, atol=1e-12)


def test_rcf_weight_gradient_finite_differences():
    """Eq. (13a): dW^/dalpha = (1/c) Pi(...) [exact derivative of the forward, checked by finite differences]
    + (alpha/c) dPi/d[.] d[.]/dalpha with the STE (= -W/alpha inside, 0 outside)."""
    g = torch.Generator().manual_seed(0)
    lv = qa.magnitude_levels("apot", 4)
    alpha0, h = 1.1, 1e-6
    w = _away_from_boundaries(torch.randn(3000, generator=g, dtype=D), alpha0, lv, gap=1e-2)
    fwd = lambda a: qa.rcf_weight(w, torch.tensor(a, dtype=D), lv)  # noqa: E731
    fd = (fwd(alpha0 + h) - fwd(alpha0 - h)) / (2 * h)  # per element; the projection is locally constant
    ste_term = torch.where(w.abs() <= alpha0, -w / alpha0, torch.zeros_like(w))
    # per-element autograd derivative dW^_i/dalpha
    auto = torch.autograd.functional.jacobian(lambda a: qa.rcf_weight(w, a, lv), torch.tensor(alpha0, dtype=D))
    torch.testing.assert_close(auto, fd + ste_term, rtol=1e-6, atol=1e-6)


def test_rcf_weight_clipped_gradient_variant():
    lv = qa.magnitude_levels("apot", 3)
    w = torch.tensor([-2.0, -0.3, 0.05, 0.7, 1.9], dtype=D, requires_grad=True)
    alpha = torch.tensor(1.0, dtype=D, requires_grad=True)
    qa.rcf_weight(w, alpha, lv, grad="clipped").sum().backward()
    torch.testing.assert_close(w.grad, torch.tensor([0.0, 1, 1, 1, 0], dtype=D))


def test_rcf_act_gradients():
    lv = apot_levels(4)
    x = torch.tensor([-0.4, 0.0, 0.3, 1.0, 2.2, 3.5], dtype=D, requires_grad=True)
    alpha = torch.tensor(2.0, dtype=D, requires_grad=True)
    out = qa.rcf_act(x, alpha, lv)
    out.sum().backward()
    u = x.detach() / 2.0
    q = project(torch.clamp(u, max=1.0), lv)
    torch.testing.assert_close(out.detach(), 2.0 * q)
    above = x.detach() > 2.0
    torch.testing.assert_close(alpha.grad, torch.where(above, torch.ones_like(u), q - u).sum())
    # gradient zeroed above alpha only; negative inputs (no lower clamp) still get gradient 1
    torch.testing.assert_close(x.grad, (~above).to(D))


def test_pact_gradients_eq11():
    lv = qa.magnitude_levels("apot", 4)
    w = torch.tensor([-2.0, -0.3, 0.05, 0.7, 1.9], dtype=D, requires_grad=True)
    alpha = torch.tensor(1.0, dtype=D, requires_grad=True)
    out = qa.pact_weight(w, alpha, lv)
    out.sum().backward()
    torch.testing.assert_close(out.detach(), qa.rcf_weight(w.detach(), alpha.detach(), lv))  # same forward
    torch.testing.assert_close(alpha.grad, torch.tensor(-1.0 + 1.0, dtype=D))  # sign(W) 1[|W| > alpha]
    torch.testing.assert_close(w.grad, torch.ones(5, dtype=D))
    x = torch.tensor([0.2, 1.5, 3.0], dtype=D, requires_grad=True)
    a = torch.tensor(1.0, dtype=D, requires_grad=True)
    qa.pact_act(x, a, apot_levels(3)).sum().backward()
    assert a.grad.item() == 2.0 and x.grad.tolist() == [1.0, 0.0, 0.0]


# ----------------------------------------------------------------------------------------------- WN
def test_weight_norm_zero_mean_unit_variance():
    w = torch.randn(16, 8, 3, 3, dtype=D) * 0.07 + 0.02
    wn = qa.weight_norm(w, eps=0.0)
    assert abs(wn.mean().item()) < 1e-12
    assert wn.var(correction=0).item() == pytest.approx(1.0, abs=1e-12)
    wn_u = qa.weight_norm(w, eps=0.0, unbiased=True)  # the authors' torch.std
    assert wn_u.var(correction=1).item() == pytest.approx(1.0, abs=1e-12)
    wn_eps = qa.weight_norm(w)  # Eq. (9) with eps = 1e-5
    assert wn_eps.std(correction=0).item() == pytest.approx(
        w.std(correction=0).item() / (w.std(correction=0).item() + 1e-5)
    )


def test_weight_norm_gradient_attached_vs_detached():
    w = (torch.randn(200, dtype=D) * 0.1 + 0.3).requires_grad_(True)
    qa.weight_norm(w, eps=0.0).sum().backward()  # attached: the mean subtraction kills a constant gradient
    torch.testing.assert_close(w.grad, torch.zeros_like(w), atol=1e-10, rtol=0)
    w.grad = None
    qa.weight_norm(w, eps=0.0, detach=True).sum().backward()  # detached (CIFAR code): 1/sigma
    torch.testing.assert_close(w.grad, torch.full_like(w, 1 / w.detach().std(correction=0).item()))


# ------------------------------------------------------------------------------------------ Eq. (14)
@pytest.mark.parametrize("bits,alpha", [(3, 1.0), (4, 2.0), (5, 3.5)])
def test_quantization_error_decomposition_eq14(bits, alpha):
    w = torch.randn(5000, generator=torch.Generator().manual_seed(bits), dtype=D)
    lv = qa.magnitude_levels("apot", bits)
    e = qa.quantization_error(w, alpha, lv)
    w_hat = alpha * qa.project_signed(torch.clamp(w / alpha, -1, 1), lv)
    torch.testing.assert_close(e.total, ((w - w_hat) ** 2).mean())
    torch.testing.assert_close(e.clip + e.proj, e.total, rtol=1e-12, atol=1e-15)
    out = w.abs() > alpha
    torch.testing.assert_close(e.clip, ((w.abs() - alpha)[out] ** 2).sum() / w.numel())
    assert e.clip > 0 and e.proj > 0


# ------------------------------------------------------------------------------------------ Lloyd-Max
def test_lloyd_max_levels_recovers_clusters_and_beats_uniform():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([0.0, 0.2, 0.5, 0.9], dtype=D)
    x = centers[torch.randint(0, 4, (4000,), generator=g)] + 0.01 * torch.randn(4000, generator=g, dtype=D)
    lv = lloyd_max_levels(x, 4, fix_zero=False, init=torch.tensor([0.1, 0.3, 0.6, 0.8], dtype=D))
    torch.testing.assert_close(lv, centers, atol=2e-3, rtol=0)
    u = torch.randn(20000, generator=g, dtype=D).abs().clamp(max=3) / 3
    fit = lloyd_max_levels(u, 8)
    assert fit[0] == 0 and torch.all(fit[1:] > fit[:-1])
    mse = lambda lv: ((u - project(u, lv)) ** 2).mean()  # noqa: E731
    assert mse(fit) < mse(qa.uniform_levels(3))


# ------------------------------------------------------------------------------------ FixOPs / size
def test_model_cost_reproduces_paper_table1_resnet18():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    m = torchvision.models.resnet18(num_classes=1000)
    fp = qa.model_cost(m, 32, 32, scheme="fp")
    assert fp.size_mb == pytest.approx(46.8, abs=0.05)
    # conv/linear MACs are 1.814G; the paper's 1.82G also counts some element-wise operations
    assert fp.fixops / 1e9 == pytest.approx(1.82, abs=0.01)
    # Table 1 model sizes: APoT (8-bit first/last) and the other methods (32-bit first/last), in MiB
    for b, apot_mb, other_mb, uni_fixops in [
        (5, 7.22, 8.72, 781),
        (4, 5.89, 7.39, 542),
        (3, 4.56, 6.06, 357),
    ]:
        ours = qa.model_cost(m, b, b, scheme="apot")
        assert ours.size_mib == pytest.approx(apot_mb, abs=0.005)
        other = qa.model_cost(m, b, b, scheme="uniform", first_last_bits=None)
        assert other.size_mib == pytest.approx(other_mb, abs=0.005)
        uni = qa.model_cost(m, b, b, scheme="uniform")  # uniform with 8-bit first/last layers
        assert uni.fixops / 1e6 == pytest.approx(uni_fixops, abs=1.0)
        assert ours.fixops < uni.fixops


# ------------------------------------------------------------------------------------- quantizers
def test_weight_quantizer_values_on_level_set():
    torch.manual_seed(0)
    for bits in (2, 3, 4, 5):
        q = APoTWeightQuantizer(bits, init_alpha=1.7).double()
        w = torch.randn(32, 16, 3, 3, dtype=D) * 0.05
        out = q(w).detach() / q.alpha.detach()
        mags = qa.magnitude_levels("apot", bits)
        assert (out.abs().reshape(-1, 1) - mags).abs().min(-1).values.max() < 1e-6
        if bits == 2:
            assert set(out.unique().tolist()) <= {-1.0, 0.0, 1.0}


def test_act_quantizer_values_and_tags():
    q = APoTActQuantizer(3, init_alpha=2.0).double()
    x = torch.rand(1000, dtype=D) * 3
    out = q(x).detach() / 2.0
    assert (out[:, None] - apot_levels(3)).abs().min(-1).values.max() < 1e-7
    assert APoTActQuantizer.param_tags == {"alpha": "act_clip"}
    assert APoTWeightQuantizer.param_tags == {"alpha": "weight_clip"}


def test_max_scaled_first_last_weights():
    w = torch.tensor([[-0.9, -0.1, 0.0, 0.25, 0.5]], dtype=D, requires_grad=True)
    out = MaxScaledWeightQuantizer(8)(w)
    s = 0.5  # the largest positive weight, not max|W| = 0.9
    torch.testing.assert_close(out.detach(), torch.round(w.detach() / s * 127) / 127 * s)
    assert out[0, 0].item() < -s  # no clamp: -0.9 lands beyond -127 steps
    out.sum().backward()
    torch.testing.assert_close(w.grad, torch.ones_like(w))


def _net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
        nn.Conv2d(4, 4, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    )  # fmt: skip


def test_method_policy_and_fp_baseline():
    net = prepare(_net(), build_method("apot", 4, 4))
    assert isinstance(net[0], QConv2d) and isinstance(net[0].wq, MaxScaledWeightQuantizer) and net[0].aq is None
    assert isinstance(net[8], QLinear) and isinstance(net[8].wq, MaxScaledWeightQuantizer) and net[8].aq is None
    for i in (2, 4):
        assert isinstance(net[i].wq, APoTWeightQuantizer) and isinstance(net[i].aq, APoTActQuantizer)
        assert net[i].wq.alpha.item() == 3.0 and net[i].aq.alpha.item() == 8.0
    # the authors' 32-bit baseline: only first conv / last FC are (8-bit, weight-only) quantized
    fp = prepare(_net(), build_method("apot", 32, 32))
    assert isinstance(fp[0], QConv2d) and isinstance(fp[8], QLinear) and type(fp[2]) is nn.Conv2d
    # level sets per option
    pot = prepare(_net(), build_method("apot", 5, 5, levels="pot"))
    torch.testing.assert_close(pot[2].wq.levels.double(), apot_levels(4, 4))
    torch.testing.assert_close(pot[2].aq.levels.double(), apot_levels(5, 5))


def test_method_bad_options():
    with pytest.raises(QreproError, match="bit-width"):
        build_method("apot", 9, 4)
    with pytest.raises(QreproError, match="levels"):
        build_method("apot", 4, 4, levels="log")
    with pytest.raises(QreproError, match="act_levels"):
        build_method("apot", 4, 4, act_levels="lloyd")
    with pytest.raises(QreproError, match="bad options"):
        build_method("apot", 4, 4, nonsense=1)


def test_method_lloyd_refit_hook_and_max_clip():
    net = prepare(_net(), build_method("apot", 3, 3, levels="lloyd", w_clip="max"))
    method = build_method("apot", 3, 3, levels="lloyd", w_clip="max")
    assert len(method.hooks) == 1 and not hasattr(net[2].wq, "alpha")
    before = net[2].wq.levels.clone()

    class Ctx:
        model = net

    method.hooks[0].on_train_start(Ctx)
    after = net[2].wq.levels
    assert not torch.equal(before, after) and after[0] == 0 and "wq.levels" in " ".join(net.state_dict())
    net(torch.randn(2, 3, 8, 8)).sum().backward()


def test_quantizers_capture_without_graph_breaks():
    wq, aq = APoTWeightQuantizer(4), APoTActQuantizer(4)
    w, x = torch.randn(8, 4, 3, 3), torch.rand(2, 4, 5, 5) * 9
    for mod, inp in ((wq, w), (aq, x)):
        compiled = torch.compile(mod, backend="eager", fullgraph=True)
        torch.testing.assert_close(compiled(inp), mod(inp))


# --------------------------------------------------------------------------- tables and experiments
TABLES = Path(__file__).resolve().parents[1] / "configs" / "table"


def test_table_cost_columns_match_the_utility():
    """cost.ours_* in apot_table1/3 are what model_cost computes; model sizes equal the paper's."""
    torchvision = pytest.importorskip("torchvision")
    cache: dict[str, tuple[nn.Module, dict]] = {}
    for name in ("apot_table1", "apot_table3"):
        for c in yaml.safe_load((TABLES / f"{name}.yaml").read_text())["cells"]:
            if "cost" not in c:  # the compared methods' rows carry no cost columns
                continue
            if c["model"] not in cache:
                m = getattr(torchvision.models, c["model"])(num_classes=1000)
                cache[c["model"]] = (m, qa.layer_macs(m))
            m, macs = cache[c["model"]]
            fam = {"FP": "fp", "APoT": "apot", "PoT": "pot", "Uniform": "uniform", "Lloyd": "lloyd"}[c["method"]]
            cost = qa.model_cost(m, c["w_bits"], c["a_bits"], scheme=fam, macs=macs)
            assert round(cost.fixops / 1e6) == c["cost"]["ours_fixops_m"], c["id"]
            if fam == "fp":
                assert round(cost.size_mb, 2) == c["cost"]["ours_size_mb"], c["id"]
            else:
                assert round(cost.size_mib, 2) == c["cost"]["ours_size_mib"], c["id"]
                assert c["cost"]["ours_size_mib"] == pytest.approx(c["cost"]["paper_size_mb"], abs=0.051), c["id"]


def _experiment_weight_grad(overrides: list[str]) -> torch.Tensor:
    """Weight gradient of one quantized layer's weight quantizer as an experiment builds it (upstream ones)."""
    from qrepro.builders import _plain
    from qrepro.train import compose

    cfg = compose(overrides)
    q = _plain(cfg.quantizer)
    method = build_method(q.pop("name"), int(cfg.precision.w_bits), int(cfg.precision.a_bits), **q)
    wq, _ = method.quantize_layer(
        LayerInfo("c", nn.Conv2d(4, 4, 3), "middle", 1, False, None, cfg.precision.w_bits, cfg.precision.a_bits)
    )
    wq = wq.double()
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 4, 3, 3, generator=g, dtype=D).requires_grad_(True)
    wq.wn = False  # the gradient of the quantizer itself (attached WN statistics would mix the elements)
    wq.alpha.data.fill_(0.5)
    (wq(w) * torch.randn(w.shape, generator=g, dtype=D)).sum().backward()
    return w.grad


@pytest.mark.parametrize("model", ["resnet18", "resnet34", "resnet50"])
def test_imagenet_weight_gradient_clipped_only_above_2_bits(model):
    """The authors' ImageNet code zeroes the weight gradient outside +-alpha for more than 2 bits; at 2 bits
    (their ternary path) it passes unclipped. ``quantizer.w_grad=clipped`` keeps the clipped reading."""
    w2 = _experiment_weight_grad([f"+experiment=apot_{model}_imagenet_w2a2"])
    assert (w2 != 0).all()  # |W~| > alpha = 0.5 for some weights: a clipped gradient would have zeros
    w3 = _experiment_weight_grad([f"+experiment=apot_{model}_imagenet_w3a3"])
    assert (w3 == 0).any() and (w3 != 0).any()
    w2c = _experiment_weight_grad([f"+experiment=apot_{model}_imagenet_w2a2", "quantizer.w_grad=clipped"])
    assert (w2c == 0).any()


EXPERIMENTS = Path(__file__).resolve().parents[1] / "configs" / "experiment"


def _alpha_groups(experiment: str) -> dict[str, tuple[float, float]]:
    """(lr, weight decay) of the optimizer groups holding alpha_a / alpha_w, as the trainer builds them."""
    from qrepro.api import build

    run = build([f"+experiment={experiment}", "trainer.device=cpu"], load_data=False, num_classes=10, steps_per_epoch=1)
    names = {id(p): n for n, p in run.model.named_parameters()}
    out = {}
    for g in run.optimizer.param_groups:
        for p in g["params"]:
            kind = "act" if names[id(p)].endswith("aq.alpha") else "wgt" if names[id(p)].endswith("wq.alpha") else None
            if kind:
                assert out.setdefault(kind, (g["lr"], g["weight_decay"])) == (g["lr"], g["weight_decay"])
    return out


def test_cifar_paper_recipe_clip_thresholds_follow_appendix_c2():
    """App. C.2 (CIFAR): alpha lr 0.03 (activations) / 0.01 (weights), alpha weight decay 1e-5. The ``_script``
    experiments keep the authors' main.py values (0.1 / 0.02, weight decay 1e-4)."""
    paper = [
        p.stem
        for p in sorted(EXPERIMENTS.glob("apot_resnet*_cifar10_*.yaml"))
        if "paper recipe (App. C.2)" in p.read_text().splitlines()[1]
    ]
    assert len(paper) == 10  # ResNet-20/56 x FP, 5, 4, 3, 2 bits
    from qrepro.train import compose

    for name in paper:
        cfg = compose([f"+experiment={name}"])
        groups = {tuple(g["tags"]): g for g in OmegaConf.to_container(cfg.optimizer.groups)}
        assert groups[("act_clip",)] == {"tags": ["act_clip"], "lr": 0.03, "weight_decay": 1e-5}, name
        assert groups[("weight_clip",)] == {"tags": ["weight_clip"], "lr": 0.01, "weight_decay": 1e-5}, name
    assert _alpha_groups("apot_resnet20_cifar10_w2a2") == {"act": (0.03, 1e-5), "wgt": (0.01, 1e-5)}
    for bits in (4, 3, 2):
        script = _alpha_groups(f"apot_resnet20_cifar10_w{bits}a{bits}_script")
        assert script == {"act": (0.1, 1e-4), "wgt": (0.02, 1e-4)}


def test_table_cells_compose_to_their_bits():
    """Cells with overrides compose (experiments alone are composed by test_configs) to the cell's bits/model."""
    from hydra import compose, initialize_config_dir

    from qrepro.cli import CONFIG_DIR, register_resolvers

    register_resolvers()
    cells = [c for p in sorted(TABLES.glob("apot_*.yaml")) for c in yaml.safe_load(p.read_text())["cells"]]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        for c in cells:
            if not c.get("overrides"):
                continue
            cfg = compose(config_name="train", overrides=[f"+experiment={c['experiment']}", *c["overrides"]])
            assert (cfg.precision.w_bits, cfg.precision.a_bits) == (c["w_bits"], c["a_bits"]), c["id"]
            assert cfg.model.name == c["model"] and cfg.dataset.name == c["dataset"], c["id"]
            for o in c["overrides"]:
                key, value = o.split("=")
                assert str(OmegaConf.select(cfg, key)).lower() == value.lower(), (c["id"], o)


def test_digits_smoke_training_with_apot(tmp_path):
    from qrepro.train import compose, train

    over = ["quantizer=apot", "precision=w3a3", "quantizer.levels=lloyd", "trainer.epochs=1"]
    fast = ["logger=none", "trainer.progress=false", "trainer.batch_size=128", "model.width=8", "trainer.log_every=5"]
    cfg = compose([*fast, *over, "optimizer.groups=[{tags: [act_clip], lr: 0.1}, {tags: [weight_clip], lr: 0.02}]"])
    res = train(cfg, run_dir=tmp_path / "run", experiment="unit", overrides=over)
    rec = json.loads(res.record_path.read_text())
    assert rec["complete"] and math.isfinite(rec["curves"]["train_loss"][0])
    sd = torch.load(res.record_path.parent / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert any(k.endswith("wq.levels") for k in sd) and any(k.endswith("aq.alpha") for k in sd)


# ------------------------------------------------------------------- the authors' released checkpoints
RELEASE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "apot-cifar10-release"
needs_release = pytest.mark.skipif(not RELEASE.is_dir(), reason="../shared/data/apot-cifar10-release not present")


def _authors_reference_forward(sd: dict, bits: int, x: torch.Tensor) -> torch.Tensor:
    """The authors' CIFAR ResNet-20 forward, restated independently (brute-force argmin projection onto their
    half-base level sets, torch.std normalisation, max-positive 8-bit first/last layers)."""
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    bases = {
        2: [[0, 2**-1, 2**-2, 2**-3]],
        3: [[0, 2**-1, 2**-2, 2**-4], [0, 2**-3]],
        4: [[0, 2**-1, 2**-3, 2**-5], [0, 2**-2, 2**-4, 2**-6]],
    }

    def nearest(u, b):
        g = _sums(*bases[b]).float()
        return g[(u.reshape(-1, 1) - g).abs().argmin(1)].reshape(u.shape)

    def fl(w):
        s = w.max()
        return (torch.round(w / s * 127) / 127 * s - w) + w

    def conv(x, name, stride, pad):
        w = sd[name + ".weight"]
        if bits != 32:
            a, aw = sd[name + ".act_alpha"], sd[name + ".weight_quant.wgt_alpha"]
            x = nearest((x / a).clamp(max=1), bits) * a
            u = ((w - w.mean()) / w.std() / aw).clamp(-1, 1)
            w = (u.abs().round() if bits == 2 else nearest(u.abs(), bits - 1)) * u.sign() * aw
        return torch.nn.functional.conv2d(x, w, None, stride, pad)

    def bn(x, n):
        return torch.nn.functional.batch_norm(
            x, sd[n + ".running_mean"], sd[n + ".running_var"], sd[n + ".weight"], sd[n + ".bias"], False, 0.0, 1e-5
        )

    x = torch.relu(bn(torch.nn.functional.conv2d(x, fl(sd["conv1.weight"]), None, 1, 1), "bn1"))
    for s in (1, 2, 3):
        for b in range(3):
            p, st = f"layer{s}.{b}", (2 if s > 1 and b == 0 else 1)
            o = bn(conv(torch.relu(bn(conv(x, p + ".conv1", st, 1), p + ".bn1")), p + ".conv2", 1, 1), p + ".bn2")
            ds = p + ".downsample"
            r = bn(conv(x, ds + ".0", st, 0), ds + ".1") if ds + ".0.weight" in sd else x
            x = torch.relu(o + r)
    return torch.nn.functional.linear(x.mean((2, 3)), fl(sd["fc.weight"]), sd["fc.bias"])


@needs_release
@pytest.mark.parametrize("bits", [4, 3, 2, 32])
def test_authors_checkpoint_loads_strictly_and_matches_their_model(bits):
    from qrepro.engine.checkpoint import extract_state_dict, load_model_state, read_checkpoint
    from qrepro.train import build_model_and_method, compose

    exp = "fp" if bits == 32 else f"w{bits}a{bits}"
    cfg = compose([f"+experiment=apot_resnet20_cifar10_{exp}"])
    model, _ = build_model_and_method(cfg, 10)
    raw = read_checkpoint(RELEASE / f"res20_{bits}bit.pth.tar")
    sd, fmt = extract_state_dict(raw)
    assert fmt == "apot-authors-cifar"
    assert load_model_state(model, sd, strict=True) == []  # every tensor of our model comes from their file
    assert set(sd) == set(model.state_dict())
    model.eval()
    theirs = {k.removeprefix("module."): v for k, v in raw["state_dict"].items()}
    n_quant = 0
    for name, layer in quantized_layers(model):
        w_hat = layer.effective_weight().detach()
        if isinstance(layer.wq, MaxScaledWeightQuantizer):  # 8-bit, scale = max positive weight, no clamp
            steps = w_hat / layer.weight.detach().max() * 127
            assert torch.allclose(steps, steps.round(), atol=1e-3), name
            continue
        n_quant += 1
        key = name.replace("shortcut", "downsample")
        # clip parameters are used as the authors use them: alpha_w after WN, alpha_a on the layer input
        assert layer.wq.alpha.item() == theirs[key + ".weight_quant.wgt_alpha"].item()
        assert layer.aq.alpha.item() == theirs[key + ".act_alpha"].item()
        u = w_hat / layer.wq.alpha.detach()
        mags = qa.magnitude_levels("apot", bits).float()
        assert (u.abs().reshape(-1, 1) - mags).abs().min(1).values.max() < 1e-5, name
        assert u.abs().max() == pytest.approx(1.0, abs=1e-6)  # outliers clipped to +-alpha_w
        with torch.no_grad():
            a_out = layer.aq(torch.linspace(0, 3 * layer.aq.alpha.item(), 301)) / layer.aq.alpha
        assert (a_out.reshape(-1, 1) - apot_levels(bits).float()).abs().min(1).values.max() < 1e-5
        assert a_out.max() == pytest.approx(1.0, abs=1e-6)
    assert n_quant == (0 if bits == 32 else 20)  # 18 3x3 convs + 2 quantized 1x1 shortcut convs
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(bits))
    with torch.no_grad():
        ours, ref = model(x), _authors_reference_forward(raw["state_dict"], bits, x)
    assert torch.equal(ours.argmax(1), ref.argmax(1))
    torch.testing.assert_close(ours, ref, rtol=1e-3, atol=1e-3)


def test_converter_ignores_other_formats():
    from qrepro.quant.methods.apot import convert_authors_cifar_checkpoint

    ours = prepare(_net(), build_method("apot", 4, 4)).state_dict()
    assert convert_authors_cifar_checkpoint(ours) is None
    assert convert_authors_cifar_checkpoint({"module.fc.weight": torch.zeros(2, 2)}) is None
    sd = {
        "module.layer1.0.conv1.act_alpha": torch.tensor(1.0),
        "module.layer1.0.conv1.weight_quant.wgt_alpha": torch.tensor(2.0),
    }
    assert convert_authors_cifar_checkpoint(sd) == {
        "layer1.0.conv1.aq.alpha": torch.tensor(1.0),
        "layer1.0.conv1.wq.alpha": torch.tensor(2.0),
    }
