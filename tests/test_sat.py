"""SAT / CG-PACT against the paper's equations (papers/sat.md Eq. 5-13, supplement S3/S5/S6/S23), float64."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from qrepro.errors import QreproError
from qrepro.quant import build_method, dorefa_weight, pact, prepare, sat_rescale
from qrepro.quant.layers import quantized_layers
from qrepro.quant.methods.sat import (
    PACTQuantizer,
    SATWeightQuantizer,
    calibrate_structure,
    fold_sat_rescale,
    sat_kappas,
)
from qrepro.quant.sat import clamp_weight, quantize_unit, std_rescale

D = torch.float64
BITS = range(1, 9)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# ----------------------------------------------------------------------------------------- reference maths
def ref_level(u: float, b: int, scheme: str) -> float:
    """Independent scalar reference of the three weight level schemes (REFERENCE.md)."""
    if scheme == "original":
        a = 2**b - 1
        return math.floor(a * u + 0.5) / a  # inputs are chosen away from .5 ties
    k = min(math.floor(2**b * u), 2**b - 1)
    return (k + (0.5 if scheme == "centered" else 0.0)) / 2**b


def away_from_ties(u: torch.Tensor, b: int, eps: float = 1e-6) -> torch.Tensor:
    """Keep values of u in [0, 1] whose scaled value is not within eps of a rounding / floor boundary."""
    ya, yn = u * (2**b - 1), u * 2**b
    ok = ((ya - ya.floor() - 0.5).abs() > eps) & ((yn - yn.round()).abs() > eps)
    return u[ok | (u == 0) | (u == 1)]


# ------------------------------------------------------------------------------------------- weight levels
@pytest.mark.parametrize("scheme", ["original", "modified", "centered"])
@pytest.mark.parametrize("b", BITS)
def test_quantize_unit_matches_reference(scheme: str, b: int) -> None:
    g = torch.Generator().manual_seed(b)
    u = away_from_ties(torch.cat([torch.rand(400, generator=g, dtype=D), torch.tensor([0.0, 1.0], dtype=D)]), b)
    q = quantize_unit(u, b, scheme)
    exp = torch.tensor([ref_level(float(v), b, scheme) for v in u], dtype=D)
    torch.testing.assert_close(q, exp, rtol=0, atol=1e-12)


def test_known_levels_two_bits() -> None:
    u = torch.tensor([0.0, 0.1, 0.2, 0.4, 0.6, 0.9, 1.0], dtype=D)
    # original: a = 3, round(3u) = 0 0 1 1 2 3 3
    torch.testing.assert_close(quantize_unit(u, 2, "original"), torch.tensor([0, 0, 1, 1, 2, 3, 3], dtype=D) / 3)
    # modified: min(floor(4u), 3) = 0 0 0 1 2 3 3 over 4
    torch.testing.assert_close(quantize_unit(u, 2, "modified"), torch.tensor([0, 0, 0, 1, 2, 3, 3], dtype=D) / 4)
    torch.testing.assert_close(
        quantize_unit(u, 2, "centered"), (torch.tensor([0, 0, 0, 1, 2, 3, 3], dtype=D) + 0.5) / 4
    )


@pytest.mark.parametrize("scheme", ["original", "modified", "centered"])
@pytest.mark.parametrize("b", BITS)
def test_dorefa_weight_values(scheme: str, b: int) -> None:
    # W = atanh(t) with max|t| = 0.9, so the clamped weight is exactly t / 0.9 (Eq. 5-6)
    g = torch.Generator().manual_seed(100 + b)
    t = torch.cat([torch.rand(300, generator=g, dtype=D) * 1.8 - 0.9, torch.tensor([0.9, -0.9], dtype=D)])
    wc = t / 0.9
    u = (wc + 1) / 2
    keep = torch.isin(u, away_from_ties(u, b))
    w = torch.atanh(t[keep])
    q = dorefa_weight(w, b, scheme)
    exp = torch.tensor([2 * ref_level(float(v), b, scheme) - 1 for v in u[keep]], dtype=D)  # Eq. 9: Q = 2q - 1
    torch.testing.assert_close(q, exp, rtol=0, atol=1e-12)
    levels = torch.unique(q)
    if scheme == "original":  # symmetric, includes +-1
        assert levels.min() == -1 and levels.max() == 1
        assert len(levels) <= 2**b
    elif scheme == "modified":  # asymmetric: [-1, 1 - 2^(1-b)]
        assert levels.min() == -1 and abs(float(levels.max()) - (1 - 2 ** (1 - b))) < 1e-12
    else:  # centered: symmetric, never +-1
        assert abs(float(levels.min()) + 1 - 2**-b) < 1e-12 and abs(float(levels.max()) - 1 + 2**-b) < 1e-12


def test_dorefa_weight_32_bits_is_clamped_weight() -> None:
    w = torch.randn(7, 5, dtype=D)
    torch.testing.assert_close(dorefa_weight(w, 32), torch.tanh(w) / torch.tanh(w).abs().max())
    assert dorefa_weight(w, 32).abs().max() == 1


def test_dorefa_one_bit_is_binary() -> None:
    w = torch.randn(50, dtype=D)
    assert set(dorefa_weight(w, 1).tolist()) <= {-1.0, 1.0}


def test_dorefa_gradient_ste_on_rounding_only_and_max_not_detached() -> None:
    w = torch.randn(6, 4, dtype=D, requires_grad=True)
    c = torch.randn(6, 4, dtype=D)
    (g,) = torch.autograd.grad((dorefa_weight(w, 3) * c).sum(), w)
    # dQ/dW^ = 1 (Q = 2 q((W^+1)/2) - 1 with q' = 1), so the gradient is that of the clamped weight
    (g_ref,) = torch.autograd.grad((clamp_weight(w) * c).sum(), w)
    torch.testing.assert_close(g, g_ref)
    # ... with the max in the graph: differs from the detached-max gradient at the arg-max element only
    t = torch.tanh(w)
    (g_det,) = torch.autograd.grad((t / t.abs().max().detach() * c).sum(), w)
    diff = (g - g_det).abs() > 1e-12
    assert diff.sum() == 1 and diff.view(-1)[t.abs().argmax()]
    # finite differences of the STE surrogate (rounding residual frozen = the clamped weight up to a constant)
    h, fd = 1e-6, torch.zeros_like(w)
    wd = w.detach()
    for i in range(wd.numel()):
        e = torch.zeros_like(wd).view(-1)
        e[i] = h
        e = e.view_as(wd)
        fd.view(-1)[i] = ((clamp_weight(wd + e) - clamp_weight(wd - e)) * c).sum() / (2 * h)
    torch.testing.assert_close(g, fd, rtol=1e-6, atol=1e-8)


def test_unknown_scheme_and_bits_raise() -> None:
    with pytest.raises(QreproError):
        dorefa_weight(torch.randn(3), 4, "nearest")
    with pytest.raises(QreproError):
        dorefa_weight(torch.randn(3), 0)


# ------------------------------------------------------------------------------------------------ rescaling
@pytest.mark.parametrize("shape", [(10, 64), (1000, 1280), (32, 16, 3, 3), (8, 1, 3, 3)])
def test_sat_rescale_variance_is_one_over_n_out(shape: tuple[int, ...]) -> None:
    w = torch.randn(*shape, dtype=D, generator=torch.Generator().manual_seed(0)) * 0.1
    q = dorefa_weight(w, 4)
    n_out = shape[0] * math.prod(shape[2:])  # C_out k_h k_w for a conv, out_features for a linear
    qs = sat_rescale(q, n_out)
    assert abs(float(qs.square().mean()) * n_out - 1) < 1e-12  # VAR = mean of squares (Eq. 7 text)
    if w.numel() > 10_000:  # nearly the same with the centred variance (Q has mean ~ 0)
        assert abs(float(qs.var()) * n_out - 1) < 0.01


def test_no_gradient_through_rescale_factor() -> None:
    q = torch.randn(20, 30, dtype=D, requires_grad=True)
    c = torch.randn(20, 30, dtype=D)
    (g,) = torch.autograd.grad((sat_rescale(q, 20) * c).sum(), q)
    f = 1 / math.sqrt(20 * float(q.detach().square().mean()))
    torch.testing.assert_close(g, c * f)  # a constant factor: dQ*/dQ = f
    (g_live,) = torch.autograd.grad((q / torch.sqrt(20 * q.square().mean()) * c).sum(), q)
    assert not torch.allclose(g, g_live)  # the test can tell the difference


def test_std_rescale_eq_s23() -> None:
    w = torch.randn(16, 8, dtype=D) * 0.05
    q = dorefa_weight(w, 2)
    qs = std_rescale(q, w)
    torch.testing.assert_close(qs.square().mean(), w.square().mean())  # VAR[Q*] = VAR[W]
    qg = q.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(std_rescale(qg, w).sum(), qg)
    torch.testing.assert_close(g, torch.full_like(q, float((w.square().mean() / q.square().mean()).sqrt())))


# --------------------------------------------------------------------------------------------------- PACT
def pact_grads(x: torch.Tensor, alpha: float, b: int, calibrated: bool, signed: bool = False):
    """Per-element dq/dalpha (alpha broadcast to x's shape) and dq/dx."""
    xr = x.clone().requires_grad_(True)
    ar = torch.full_like(x, alpha).requires_grad_(True)
    q = pact(xr, ar, b, calibrated=calibrated, signed=signed)
    ga, gx = torch.autograd.grad(q.sum(), (ar, xr))
    return q.detach(), ga, gx


def grid_x(alpha: float, b: int, lo: float) -> torch.Tensor:
    """Points in [lo - 3, alpha + 3] away from rounding boundaries and from the clip points."""
    x = torch.linspace(lo - 3, alpha + 3, 2001, dtype=D)
    a = 2**b - 1
    y = (x - lo) / (alpha - lo) * a
    ok = ((y - y.floor() - 0.5).abs() > 1e-3) & ((x - alpha).abs() > 1e-3) & ((x - lo).abs() > 1e-3)
    return x[ok]


@pytest.mark.parametrize("b", [1, 2, 4, 8])
@pytest.mark.parametrize("alpha", [8.0, -8.0, 2.5])
def test_pact_values(b: int, alpha: float) -> None:
    a_abs = abs(alpha)
    x = grid_x(a_abs, b, 0.0)
    q = pact(x, torch.tensor(alpha, dtype=D), b)
    xc = x.clamp(0, a_abs)
    exp = a_abs * torch.round(xc / a_abs * (2**b - 1)) / (2**b - 1)  # Eq. 11: alpha q_k(x~/alpha), |alpha|
    torch.testing.assert_close(q, exp, rtol=0, atol=1e-12)
    assert len(torch.unique(pact(torch.linspace(-1, a_abs + 1, 5001, dtype=D), torch.tensor(alpha), b))) == 2**b


@pytest.mark.parametrize("b", [2, 4])
def test_cg_pact_gradient_equals_eq13_and_surrogate_fd(b: int) -> None:
    alpha = 6.0
    x = grid_x(alpha, b, 0.0)
    q, ga, gx = pact_grads(x, alpha, b, calibrated=True)
    xt = x.clamp(0, alpha)
    qk = torch.round(xt / alpha * (2**b - 1)) / (2**b - 1)
    eq13 = torch.where(x < alpha, qk - xt / alpha, torch.ones_like(x))
    torch.testing.assert_close(ga, eq13, rtol=0, atol=1e-12)
    torch.testing.assert_close(gx, ((x > 0) & (x < alpha)).to(D))
    assert (ga[(x > 0) & (x < alpha)] != 0).any()  # the calibration term is really there

    # finite differences of the STE surrogate: the rounding residual r = round(y) - y frozen at alpha0,
    # every other operation (clip, / alpha, * alpha) differentiated numerically
    a = 2**b - 1
    y0 = xt / alpha * a
    r0 = torch.round(y0) - y0

    def surrogate(al: float) -> torch.Tensor:
        xc = x.clamp(0, al)
        return al * ((xc / al * a) + r0) / a

    h = 1e-6
    fd = (surrogate(alpha + h) - surrogate(alpha - h)) / (2 * h)
    torch.testing.assert_close(ga, fd, rtol=0, atol=1e-7)
    # and the forward pass itself above alpha: q = alpha, so dq/dalpha = 1 numerically too
    hi = x > alpha + 1e-2
    fd_true = (pact(x, torch.tensor(alpha + h, dtype=D), b) - pact(x, torch.tensor(alpha - h, dtype=D), b)) / (2 * h)
    torch.testing.assert_close(fd_true[hi], torch.ones_like(fd_true[hi]))


@pytest.mark.parametrize("b", [2, 4])
def test_plain_pact_gradient(b: int) -> None:
    alpha = 6.0
    x = torch.cat([grid_x(alpha, b, 0.0), torch.tensor([alpha], dtype=D)])
    q, ga, gx = pact_grads(x, alpha, b, calibrated=False)
    torch.testing.assert_close(ga, (x >= alpha).to(D))  # original PACT: 1[x >= alpha]
    torch.testing.assert_close(gx, ((x > 0) & (x < alpha)).to(D))
    q_cg, _, _ = pact_grads(x, alpha, b, calibrated=True)
    torch.testing.assert_close(q, q_cg)  # same forward


def test_pact_alpha_is_abs() -> None:
    x = torch.linspace(-2, 12, 101, dtype=D)
    ap = torch.tensor(8.0, dtype=D, requires_grad=True)
    an = torch.tensor(-8.0, dtype=D, requires_grad=True)
    qp, qn = pact(x, ap, 3), pact(x, an, 3)
    torch.testing.assert_close(qp, qn)
    (gp,) = torch.autograd.grad(qp.sum(), ap)
    (gn,) = torch.autograd.grad(qn.sum(), an)
    torch.testing.assert_close(gn, -gp)  # d|alpha|/dalpha = sign(alpha)


@pytest.mark.parametrize("b", [2, 3, 4])
@pytest.mark.parametrize("calibrated", [True, False])
def test_signed_pact(b: int, calibrated: bool) -> None:
    alpha = 4.0
    x = grid_x(alpha, b, -alpha)
    q, ga, gx = pact_grads(x, alpha, b, calibrated=calibrated, signed=True)
    a = 2**b - 1
    xt = x.clamp(-alpha, alpha)
    qk_signed = 2 * torch.round((xt / alpha + 1) / 2 * a) / a - 1  # DoReFa grid on [-1, 1]
    torch.testing.assert_close(q, alpha * qk_signed, rtol=0, atol=1e-12)
    inside = (x > -alpha) & (x < alpha)
    if calibrated:  # Eq. 13 generalised: Q_k - x~/alpha inside, +1 above, -1 below
        exp = torch.where(inside, qk_signed - xt / alpha, torch.sign(x))
    else:
        exp = torch.where(inside, torch.zeros_like(x), torch.sign(x))
    torch.testing.assert_close(ga, exp, rtol=0, atol=1e-12)
    torch.testing.assert_close(gx, inside.to(D))
    levels = torch.unique(pact(torch.linspace(-6, 6, 4001, dtype=D), torch.tensor(alpha), b, signed=True))
    assert len(levels) == 2**b and levels.min() == -alpha and levels.max() == alpha
    # a 0/1 tensor flag (the quantizer's buffer) behaves like the bool
    torch.testing.assert_close(pact(x, torch.tensor(alpha, dtype=D), b, signed=torch.tensor(1.0)), q)


def test_pact_32_bits_clips_only() -> None:
    x = torch.linspace(-3, 12, 50, dtype=D)
    torch.testing.assert_close(pact(x, torch.tensor(8.0, dtype=D), 32), x.clamp(0, 8))


def test_half_precision_input_quantized_in_float32() -> None:
    aq = PACTQuantizer(8, alpha_init=6.0)
    x = torch.linspace(-1, 7, 999)
    q16 = aq(x.bfloat16())
    assert q16.dtype == torch.bfloat16
    torch.testing.assert_close(q16, aq(x.bfloat16().float()).bfloat16(), rtol=0, atol=0)


def test_quantizers_trace_without_graph_breaks() -> None:
    """No .item() / data-dependent Python branches: dynamo captures the full graph."""
    wq = SATWeightQuantizer(4, "modified", rescale="const")
    aq = PACTQuantizer(4, signed=True)

    def f(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return (wq(w).sum() + aq(x).sum()) * 1.0

    cf = torch.compile(f, fullgraph=True, backend="eager")
    w, x = torch.randn(8, 4), torch.randn(16)
    torch.testing.assert_close(cf(w, x), f(w, x))


# ------------------------------------------------------------------------------------------ method policy
def tiny_net(bn_after_last_conv: bool = True) -> nn.Module:
    torch.manual_seed(0)
    layers = [
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 1, bias=False),
    ]
    if bn_after_last_conv:
        layers += [nn.BatchNorm2d(16), nn.ReLU()]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)]
    return nn.Sequential(*layers)


def q_layers(model: nn.Module) -> dict[str, nn.Module]:
    return dict(quantized_layers(model))


def rescaled(layer: nn.Module) -> bool:
    wq = layer.wq
    return wq.rescale is not None and (not wq.gated or bool(wq.rescale_on))


class PostAddBNUnit(nn.Module):
    """bn_out(x + conv2(relu(bn1(conv1(x))))): conv2 feeds an addition, yet in module order it is directly
    followed by a BN -- the case where next_module misleads and the data flow decides."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn_out = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn_out(x + self.conv2(torch.relu(self.bn1(self.conv1(x))))))


def test_no_bn_rescaling_follows_data_flow() -> None:
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        PostAddBNUnit(8),
        PostAddBNUnit(8),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    )
    m = prepare(net, build_method("sat", 2, 2, rescale="no_bn"))
    ls = q_layers(m)
    # initial guess from module order: conv2 is listed right before bn_out -> "followed by BN"
    assert not rescaled(ls["1.conv2"]) and not rescaled(ls["1.conv1"]) and rescaled(ls["0"])
    hooks = build_method("sat", 2, 2, rescale="no_bn").hooks
    assert any(type(h).__name__ == "StructureCalibration" for h in hooks)
    rep = calibrate_structure(m, torch.randn(2, 3, 8, 8))
    # the data flow: the stem and both conv2 outputs feed additions, the conv1 outputs feed BNs
    assert rep["rescaled"] == ["0", "1.conv2", "2.conv2"]
    assert not rescaled(ls["1.conv1"]) and rescaled(ls["5"])
    assert "1.conv2.wq.rescale_on" in m.state_dict()  # persisted with checkpoints
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(
        ls["1.conv2"].effective_weight(),
        sat_rescale(dorefa_weight(ls["1.conv2"].weight, 2, "modified"), 8 * 9, "sample"),
    )
    torch.testing.assert_close(ls["1.conv1"].effective_weight(), dorefa_weight(ls["1.conv1"].weight, 2, "modified"))
    m.eval()
    assert torch.isfinite(m(x)).all()


def test_policy_defaults() -> None:
    m = prepare(tiny_net(), build_method("sat", 4, 4))
    ls = q_layers(m)
    assert list(ls) == ["0", "3", "6", "11"]
    first, last = ls["0"], ls["11"]
    assert first.wq.bits == 8 and first.aq is None  # first conv: 8-bit weights, input not quantized
    assert last.wq.bits == 8 and last.aq.bits == 4  # last FC: 8-bit weights, input at network bits
    assert float(last.aq.alpha.detach()) == 10.0 and float(ls["3"].aq.alpha.detach()) == 8.0
    assert ls["3"].wq.bits == 4 and ls["3"].aq.bits == 4 and ls["3"].aq.calibrated
    assert [n for n, l in ls.items() if l.wq.rescale] == ["11"]  # rescale the last FC only
    # the authors' code: asymmetric "modified" levels, VAR = torch.std(Q)^2, inputs clipped at 0
    assert all(l.wq.scheme == "modified" and l.wq.variance == "sample" for l in ls.values())
    assert all(float(l.aq.signed) == 0 and not l.aq.auto_sign for l in ls.values() if l.aq is not None)
    assert build_method("sat", 4, 4).hooks == []
    assert PACTQuantizer.param_tags == {"alpha": "act_clip"}


def test_policy_switches() -> None:
    m = prepare(tiny_net(), build_method("sat", 3, 3, first_last="same", cg=False, scheme="centered"))
    ls = q_layers(m)
    assert ls["0"].wq.bits == 3 and ls["11"].wq.bits == 3
    assert not ls["3"].aq.calibrated and ls["3"].wq.scheme == "centered"
    m = prepare(tiny_net(), build_method("sat", 2, 32))  # weight-only
    assert all(l.aq is None for l in q_layers(m).values())
    m = prepare(tiny_net(bn_after_last_conv=False), build_method("sat", 2, 32, rescale="no_bn"))
    assert calibrate_structure(m, torch.randn(2, 3, 8, 8))["rescaled"] == ["6"]  # + the (ungated) last FC
    assert [n for n, l in q_layers(m).items() if rescaled(l)] == ["6", "9"]  # conv w/o BN + last FC
    m = prepare(tiny_net(), build_method("sat", 2, 2, rescale="all", rescale_method="std"))
    assert all(l.wq.rescale == "std" for l in q_layers(m).values())
    m = prepare(tiny_net(), build_method("sat", 2, 2, rescale="none"))
    assert not any(l.wq.rescale for l in q_layers(m).values())
    m = prepare(tiny_net(), build_method("pact", 4, 4))
    assert not any(l.wq.rescale for l in q_layers(m).values()) and not q_layers(m)["3"].aq.calibrated
    m = prepare(tiny_net(), build_method("dorefa", 32, 32))
    ls = q_layers(m)
    assert all(l.wq.bits == 32 and l.wq.rescale is None and l.aq is None for l in ls.values())


@pytest.mark.parametrize(
    "kw",
    [
        {"scheme": "bogus"},
        {"rescale": "some"},
        {"rescale_method": "l2"},
        {"first_last": "none"},  # 8bit | same | fp (PACT as published) are the options
        {"signed_act": "maybe"},
        {"weight_clamp": False},
        {"nonsense": 1},
    ],
)
def test_bad_options_raise(kw: dict) -> None:
    with pytest.raises(QreproError):
        build_method("sat", 4, 4, **kw)


def test_unsupported_bits_raise() -> None:
    with pytest.raises(QreproError):
        build_method("sat", 16, 4)


def test_fp_path_is_plain_layer_when_clamping_off() -> None:
    fp = tiny_net().double()
    q = prepare(copy.deepcopy(fp), build_method("sat", 32, 32, weight_clamp=False, rescale="none"))
    assert all(l.aq is None for l in q_layers(q).values())
    x = torch.randn(4, 3, 8, 8, dtype=D)
    fp.eval(), q.eval()
    torch.testing.assert_close(q(x), fp(x), rtol=0, atol=0)
    # the paper's FP model (clamped weights, no rounding) differs
    c = prepare(copy.deepcopy(fp), build_method("sat", 32, 32)).eval()
    assert not torch.allclose(c(x), fp(x))
    torch.testing.assert_close(q_layers(c)["3"].effective_weight(), clamp_weight(fp[3].weight))


def test_fp_checkpoint_loads_strictly_except_quantizer_state() -> None:
    fp = tiny_net()
    q = prepare(tiny_net(), build_method("sat", 4, 4))
    missing, unexpected = q.load_state_dict(fp.state_dict(), strict=False)
    assert not unexpected and all(k.split(".")[-2] in ("aq", "wq") for k in missing)


def _fc_input(m: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(input of the last FC, model output) of one forward pass."""
    seen = {}
    h = m[11].register_forward_pre_hook(lambda mod, args: seen.setdefault("x", args[0]))
    with torch.no_grad():
        out = m(x)
    h.remove()
    return seen["x"], out


def test_last_fc_factor_in_training_bias_divided_in_eval() -> None:
    """Paper §3.3.2 and the authors' QLinear: the last FC's factor f scales its weight in training only; in eval
    mode the weight is Q and the bias b / f (logits / f, same arg-max). Other rescaled layers keep f in eval."""
    torch.manual_seed(1)
    m = prepare(tiny_net().double(), build_method("sat", 4, 4, rescale="all"))
    fc = m[11]
    with torch.no_grad():
        fc.bias.normal_(0, 0.5)
    x = torch.randn(64, 3, 8, 8, dtype=D)
    q = dorefa_weight(fc.weight, 8, "modified")
    f = 1 / (math.sqrt(10) * float(q.detach().std()))  # the authors' factor: 1 / (sqrt(n_out) torch.std(Q))
    m.train()
    xin, out = _fc_input(m, x)
    torch.testing.assert_close(out, nn.functional.linear(fc.aq(xin), f * q, fc.bias))
    m.eval()
    xin, out = _fc_input(m, x)
    torch.testing.assert_close(out, nn.functional.linear(fc.aq(xin), q, fc.bias / f))
    torch.testing.assert_close(out * f, nn.functional.linear(fc.aq(xin), f * q, fc.bias))
    conv = m[3]  # a rescaled conv: the same effective weight in both modes
    assert conv.wq.rescale == "const" and not conv.wq.foldable
    torch.testing.assert_close(conv.effective_weight(), conv.wq.train()(conv.weight))
    torch.testing.assert_close(conv.effective_bias(), conv.bias)  # None: convs have no bias


def test_folded_bias_same_argmax() -> None:
    torch.manual_seed(1)
    m = prepare(tiny_net().double(), build_method("sat", 4, 4)).eval()
    with torch.no_grad():
        m[11].bias.normal_(0, 0.5)
    x = torch.randn(64, 3, 8, 8, dtype=D)
    with torch.no_grad():
        logits = m(x)  # eval mode: already x Q + b / f
        f = m[11].wq.factor(m[11].weight)
        bias = m[11].bias.clone()
    assert fold_sat_rescale(m) == ["11"]
    assert m[11].wq.rescale is None
    torch.testing.assert_close(m[11].bias, bias / f)
    with torch.no_grad():
        folded = m(x)
    torch.testing.assert_close(folded, logits)  # folding freezes what eval mode computes
    m.train()
    with torch.no_grad():
        assert torch.equal(m[11].effective_bias(), m[11].bias)


def test_signed_auto_detection() -> None:
    net = tiny_net(bn_after_last_conv=False)  # the 1x1 conv's output (signed) feeds the last FC via the pool
    m = prepare(net, build_method("sat", 4, 4, signed_act="auto"))
    assert all(l.aq.auto_sign for l in q_layers(m).values() if l.aq is not None)
    rep = calibrate_structure(m, torch.randn(8, 3, 8, 8))
    assert rep == {"signed": ["9"], "rescaled": []}
    assert float(m[9].aq.signed) == 1 and float(m[3].aq.signed) == 0
    assert "aq.signed" in "".join(m.state_dict())  # persisted with checkpoints
    m2 = prepare(tiny_net(), build_method("sat", 4, 4, signed_act=["6"]))
    assert float(m2[6].aq.signed) == 1 and float(m2[3].aq.signed) == 0 and not m2[6].aq.auto_sign
    m3 = prepare(tiny_net(), build_method("sat", 4, 4, signed_act=False))
    assert build_method("sat", 4, 4, signed_act=False).hooks == []
    assert all(float(l.aq.signed) == 0 for l in q_layers(m3).values() if l.aq is not None)


def test_kappa_diagnostics() -> None:
    m = prepare(tiny_net(), build_method("sat", 4, 4, diagnostics=True))
    m.train()
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    out = sat_kappas(m, x, y)
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN statistics untouched
    assert all(p.grad is None for p in m.parameters())
    fc = m[11]
    k0 = fc.in_features * float(fc.effective_weight().detach().square().mean()) / 8**2  # pool over the 8x8 map
    assert abs(out["sat_kappa0"] - k0) < 1e-6
    assert {"sat_kappa1/0", "sat_kappa1/3", "sat_kappa1/6", "sat_kappa1_median"} <= set(out)
    assert all(math.isfinite(v) and v > 0 for v in out.values())


# --------------------------------------------------------------------------- the authors' code (SAT experiments)
@pytest.mark.parametrize("scheme, bits, lo, hi", [("modified", 2, 0.05, 1.0), ("original", 2, 0.0, 0.01)])
def test_rescale_variance_is_the_authors_torch_std(scheme: str, bits: int, lo: float, hi: float) -> None:
    """The authors divide by torch.std(Q) (mean removed, N - 1); the paper's text averages the squares. With
    the asymmetric modified levels at 2 bits the two factors differ by several % (mean(Q) != 0), with the
    symmetric original levels by < 1 %; ``variance: mean_square`` keeps the paper's reading."""
    conv = nn.Conv2d(16, 32, 3, bias=False).double()
    torch.nn.init.normal_(conv.weight, 0, 0.1)
    n_out = 32 * 9
    q = dorefa_weight(conv.weight, bits, scheme)
    wq = SATWeightQuantizer(bits, scheme, rescale="const")  # the method's default: variance="sample"
    torch.testing.assert_close(wq(conv.weight), q / (math.sqrt(n_out) * q.std()))
    assert abs(float(n_out * wq(conv.weight).detach().var()) - 1) < 1e-12
    paper = SATWeightQuantizer(bits, scheme, rescale="const", variance="mean_square")
    torch.testing.assert_close(paper(conv.weight), sat_rescale(q, n_out))
    ratio = float(wq.factor(conv.weight) / paper.factor(conv.weight))
    assert lo < abs(ratio - 1) < hi
    # Eq. S23 (the authors' rescale_type: stddev): torch.std(W) / torch.std(Q)
    s23 = SATWeightQuantizer(bits, scheme, rescale="std")
    torch.testing.assert_close(s23(conv.weight), q * conv.weight.std() / q.std())
    m = prepare(tiny_net(), build_method("sat", bits, bits, scheme=scheme, variance="mean_square"))
    assert q_layers(m)["11"].wq.variance == "mean_square"
    with pytest.raises(QreproError):
        build_method("sat", 4, 4, variance="unbiased")


def test_sat_quantizer_configs_follow_the_authors_code() -> None:
    from qrepro.builders import compose

    for exp in ("sat_mbv2_4bit", "sat_mbv1_4bit", "sat_cifar_resnet20_4bit_sat", "sat_cifar_resnet20_4bit_pact"):
        q = compose([f"+experiment={exp}"]).quantizer
        assert (q.scheme, q.variance, q.signed_act) == ("modified", "sample", False), exp


def _sat_model(exp: str, *extra: str) -> nn.Module:
    from qrepro.builders import build_model_and_method, compose

    torch.manual_seed(0)
    return build_model_and_method(compose([f"+experiment={exp}", *extra]), 10)[0]


@pytest.mark.parametrize("exp", ["sat_mbv2_4bit", "sat_mbv1_4bit", "sat_cifar_mbv2_4bit_sat"])
def test_sat_mobilenets_are_the_authors_networks(exp: str) -> None:
    """ReLU (not ReLU6), no dropout, the authors' module names, block inputs clipped at 0 (one-sided PACT)."""
    m = _sat_model(exp)
    kinds = {type(x) for x in m.modules()}
    assert nn.ReLU in kinds and nn.ReLU6 not in kinds and nn.Dropout not in kinds
    keys = set(m.state_dict())
    assert {"head.0.weight", "head.1.running_var", "classifier.0.weight", "classifier.0.aq.alpha"} <= keys
    assert "stage_1_layer_0.body.3.weight" in keys  # second stage, first block, depthwise (V2) conv
    ls = q_layers(m)
    assert ls["head.0"].aq is None and ls["head.0"].wq.bits == 8 and ls["classifier.0"].wq.bits == 8
    assert all(float(l.aq.signed) == 0 for l in ls.values() if l.aq is not None)
    fc = m.classifier[0]
    assert float(fc.weight.detach().std()) < 0.02 and not fc.bias.any()  # linear init N(0, 0.01), zero bias
    if "mbv2" in exp:
        expand = ls["stage_1_layer_1.body.0"]  # its input is the previous block's linear bottleneck output
        x = torch.randn(4, 24, 8, 8)
        assert (x < 0).any() and (expand.aq(x) >= 0).all()
        assert "tail.0.weight" in keys
    # the alternatives stay switches: torchvision's MobileNet-V2 and two-sided PACT
    if exp == "sat_mbv2_4bit":
        tv = _sat_model(exp, "model=mobilenet_v2", "quantizer.signed_act=auto")
        assert nn.ReLU6 in {type(x) for x in tv.modules()} and nn.Dropout in {type(x) for x in tv.modules()}


def test_sat_cifar_resnet20_is_the_authors_model_and_recipe() -> None:
    """models/q_resnet_cifar.py + apps/cifar10/*.yml: quantized 1x1 conv + BN shortcuts, every conv and the FC
    rescaled (rescale_conv), first conv / last FC at the network bit-width, ReLU after the addition."""
    m = _sat_model("sat_cifar_resnet20_4bit_sat")
    ls = q_layers(m)
    assert len(ls) == 22  # 19 3x3 convs + 2 1x1 shortcut convs + the FC
    shortcuts = [n for n in ls if n.endswith("shortcut.0")]
    assert shortcuts == ["stage_1_layer_0.shortcut.0", "stage_2_layer_0.shortcut.0"]
    assert all(ls[n].aq is not None and ls[n].wq.bits == 4 for n in shortcuts)
    assert all(l.wq.rescale == "const" and l.wq.bits == 4 for l in ls.values())
    assert ls["head.0"].aq is None and ls["classifier.0"].aq.bits == 4
    alphas = (float(ls["classifier.0"].aq.alpha.detach()), float(ls["stage_0_layer_0.body.0"].aq.alpha.detach()))
    assert alphas == (10.0, 8.0)
    assert sum(p.numel() for n, p in m.named_parameters() if not n.endswith("alpha")) == 272_474
    for n, conv in ls.items():  # conv init N(0, 2 / (k k C_out))
        if n != "classifier.0":
            k = conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels
            assert abs(float(conv.weight.detach().std()) * math.sqrt(k / 2) - 1) < 0.35, n
    fp = _sat_model("sat_cifar_resnet20_fp")
    assert all(l.wq.bits == 32 and l.wq.rescale == "const" and l.aq is None for l in q_layers(fp).values())


def test_adabits_state_dict_mapping() -> None:
    from qrepro.models.sat_nets import adabits_key, adabits_state_dict

    m = _sat_model("sat_cifar_resnet20_4bit_sat")
    ours = m.state_dict()
    theirs = {}
    for k, v in ours.items():  # the authors' layout: switchable BN (two bit-widths), alpha per bit-width
        if k.endswith(".aq.signed"):
            continue
        if k.endswith(".aq.alpha"):
            theirs["module." + k.replace("aq.alpha", "alpha")] = torch.stack([v + 1, v])
            continue
        parent, _, leaf = k.rpartition(".")
        if isinstance(m.get_submodule(parent), nn.BatchNorm2d):
            theirs[f"module.{parent}.bn.0.{leaf}"] = v + 7
            theirs[f"module.{parent}.bn.1.{leaf}"] = v
        else:
            theirs["module." + k] = v
    theirs["module.head.0.alpha"] = torch.tensor([8.0, 8.0])  # their weight-only first conv has an unused clip
    conv = adabits_state_dict(theirs, ours, bits_index=1)
    assert set(conv) == set(ours) and all(torch.equal(conv[k], v) for k, v in ours.items())
    assert adabits_key("module.head.1.bn.0.running_mean") == "head.1.running_mean"
    assert adabits_key("head.1.bn.1.weight") is None
    with pytest.raises(KeyError):
        adabits_state_dict({}, ours)
