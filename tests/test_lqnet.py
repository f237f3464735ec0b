"""LQ-Net (Zhang et al., ECCV 2018): levels v^T e, nearest-level encoding, QEM against a least-squares solver,
the moving-average update, straight-through gradients, degenerate cases, the method's policy and hook."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from qrepro.errors import QreproError
from qrepro.hooks import Context
from qrepro.quant import build_method, prepare
from qrepro.quant import lqnet as lq
from qrepro.quant.layers import QConv2d, QLinear, quantized_layers
from qrepro.quant.methods.lqnet import LQNetActQuantizer, LQNetQEM, LQNetWeightQuantizer
from qrepro.train import compose

D = torch.float64


def _brute_nearest(x: torch.Tensor, basis: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest v^T e over every code e (ties to the lower level), and the chosen codes [N, K]."""
    vals = [-1.0, 1.0] if signed else [0.0, 1.0]
    cands = torch.tensor(list(itertools.product(vals, repeat=basis.numel())), dtype=D)
    lv = cands @ basis
    order = torch.argsort(lv, stable=True)
    lv, cands = lv[order], cands[order]
    dist = (x[:, None] - lv[None]).abs()
    # nearest; on an exact tie the lower level (the authors' strict ``x > threshold``)
    idx = torch.argmin(dist + 1e-12 * torch.arange(lv.numel(), dtype=D)[None], 1)
    return lv[idx], cands[idx]


def test_codes_and_levels():
    e = lq.codes(2, True, D)
    assert e.tolist() == [[-1, -1], [1, -1], [-1, 1], [1, 1]]
    assert lq.codes(2, False, D).tolist() == [[0, 0], [1, 0], [0, 1], [1, 1]]
    v = torch.tensor([0.3, 1.0], dtype=D)
    levels, order = lq.sorted_levels(v, e)
    assert levels.tolist() == pytest.approx([-1.3, -0.7, 0.7, 1.3])
    assert levels.tolist() == pytest.approx(lq.all_code_levels(v, True))
    torch.testing.assert_close(e[order] @ v, levels)


def test_init_basis_is_the_authors():
    w = lq.init_basis(3, True, fan=9 * 64)
    b = 0.6745 * (2 / (9 * 64)) ** 0.5 / 4
    assert w.tolist() == pytest.approx([b, 2 * b, 4 * b])
    a = lq.init_basis(2, False)
    assert a.tolist() == pytest.approx([0.6745 * 2 / 3, 0.6745 * 4 / 3])
    with pytest.raises(ValueError):
        lq.init_basis(2, True)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("bits", [1, 2, 3])
def test_quantize_is_nearest_level(signed, bits):
    g = torch.Generator().manual_seed(bits)
    basis = torch.rand(bits, generator=g, dtype=D) + 0.1
    x = torch.randn(500, generator=g, dtype=D) * 2
    levels, _ = lq.sorted_levels(basis, lq.codes(bits, signed, D))
    x = torch.cat([x, lq.thresholds(levels)])  # values exactly on a threshold go to the lower level
    q = lq.quantize(x[None], levels[None])[0]
    expect, _ = _brute_nearest(x, basis, signed)
    torch.testing.assert_close(q, expect, rtol=0, atol=0)


def test_level_stats_count_and_sum_per_level():
    g = torch.Generator().manual_seed(0)
    basis = torch.tensor([[0.2, 0.5], [0.1, 0.9]], dtype=D)
    x = torch.randn(2, 300, generator=g, dtype=D)
    levels, _ = lq.sorted_levels(basis, lq.codes(2, True, D))
    n, s = lq.level_stats(x, levels)
    q = lq.quantize(x, levels)
    for c in range(2):
        for j in range(4):
            on = q[c] == levels[c, j]
            assert n[c, j] == on.sum()
            torch.testing.assert_close(s[c, j], x[c][on].sum())


@pytest.mark.parametrize("signed", [True, False])
def test_qem_solution_equals_least_squares(signed):
    """Eq. 6 from the per-level statistics equals torch.linalg.lstsq of B^T v = x on the brute-force codes."""
    g = torch.Generator().manual_seed(1)
    basis = torch.tensor([0.3, 0.7, 1.6], dtype=D)
    x = torch.randn(2000, generator=g, dtype=D) * (1.5 if signed else 1.0) + (0 if signed else 1.2)
    code_table = lq.codes(3, signed, D)
    levels, order = lq.sorted_levels(basis, code_table)
    n, s = lq.level_stats(x[None], levels[None])
    btb, bx = lq.normal_equations(n[0], s[0], order, code_table)
    _, b = _brute_nearest(x, basis, signed)
    torch.testing.assert_close(btb, b.T @ b)
    torch.testing.assert_close(bx, b.T @ x)
    v = lq.qem_basis(btb, bx, basis, ridge=0.0)
    ref = torch.linalg.lstsq(b, x[:, None]).solution[:, 0]
    torch.testing.assert_close(v, ref, rtol=1e-10, atol=1e-12)
    # the fitted basis does not increase the quantization error of the fixed codes (it minimises it)
    assert ((b @ v - x) ** 2).sum() <= ((b @ basis - x) ** 2).sum()
    # with the ridge: the minimiser of ||B^T v - x||^2 + eps ||v - v_old||^2
    eps = 5.0
    vr = lq.qem_basis(btb, bx, basis, ridge=eps)
    aug = torch.cat([b, eps**0.5 * torch.eye(3, dtype=D)])
    rhs = torch.cat([x, eps**0.5 * basis])
    torch.testing.assert_close(vr, torch.linalg.lstsq(aug, rhs[:, None]).solution[:, 0], rtol=1e-10, atol=1e-12)


def test_qem_degenerate_codes_keep_the_basis():
    """All values on one level: B B^T is singular; the ridge keeps the unused directions at the old basis."""
    basis = torch.tensor([0.5, 1.0], dtype=D)
    code_table = lq.codes(2, False, D)
    x = torch.zeros(1, 50, dtype=D)  # every activation is 0 -> code (0, 0): B = 0
    levels, order = lq.sorted_levels(basis[None], code_table)
    n, s = lq.level_stats(x, levels)
    btb, bx = lq.normal_equations(n[0], s[0], order[0], code_table)
    assert torch.count_nonzero(btb) == 0
    torch.testing.assert_close(lq.qem_basis(btb, bx, basis, 1e-4), basis)
    with pytest.raises(torch.linalg.LinAlgError):
        lq.qem_basis(btb, bx, basis, 0.0)
    # zero weights sit on the threshold 0 and take the level -b (code (1, -1)); QEM zeroes the basis along
    # (1, -1) (that level becomes 0: no error) and keeps the unused direction (1, 1): v -> (3b/2, 3b/2)
    wq = LQNetWeightQuantizer(2, 1, fan=8, momentum=0.0).double()
    b = float(wq.basis[0, 0])
    w = torch.zeros(1, 2, 2, 2, dtype=D)
    assert torch.equal(wq(w), torch.full_like(w, -b))
    wq.qem_step()
    torch.testing.assert_close(wq.basis, torch.full((1, 2), 1.5 * b, dtype=D), rtol=1e-4, atol=0)
    assert float(wq(w).abs().max()) < 1e-4 * b


def test_weight_quantizer_per_channel_and_ste():
    torch.manual_seed(0)
    wq = LQNetWeightQuantizer(2, 3, fan=27).double()
    wq.basis.copy_(torch.tensor([[0.1, 0.2], [0.05, 0.3], [0.2, 0.2]], dtype=D))
    w = torch.randn(3, 2, 3, 3, dtype=D, requires_grad=True) * 0.3
    w.retain_grad()
    out = wq(w)
    for c in range(3):
        expect, _ = _brute_nearest(w[c].detach().flatten(), wq.basis[c], True)
        torch.testing.assert_close(out[c].flatten(), expect, rtol=0, atol=1e-15)
    g = torch.randn_like(out)
    out.backward(g)
    torch.testing.assert_close(w.grad, g)  # identity straight-through (authors' code)


def test_activation_quantizer_gradient_clipped_above_top_level():
    aq = LQNetActQuantizer(2).double()
    aq.basis.copy_(torch.tensor([[0.5, 1.0]], dtype=D))  # levels 0, 0.5, 1, 1.5
    x = torch.tensor([-0.3, 0.2, 0.26, 0.74, 1.2, 1.5, 2.0], dtype=D, requires_grad=True)
    y = aq(x)
    assert y.tolist() == [0.0, 0.0, 0.5, 0.5, 1.0, 1.5, 1.5]
    y.sum().backward()
    assert x.grad.tolist() == [1, 1, 1, 1, 1, 1, 0]  # 1[x <= largest level] (tf.minimum gives a tie to x)


def test_stats_only_in_training_and_moving_average():
    aq = LQNetActQuantizer(2, momentum=0.9).double()
    x = torch.rand(4, 8, dtype=D) * 2
    aq.eval()
    aq(x)
    assert float(aq.qem_count.sum()) == 0
    aq.train()
    old = aq.basis.clone()
    aq(x)
    aq(x)  # two forwards before one update: pooled statistics (same x twice = same solution)
    assert float(aq.qem_count.sum()) == 2 * x.numel()
    levels, order = lq.sorted_levels(old, aq.codes)
    n, s = lq.level_stats(x.reshape(1, -1), levels)
    btb, bx = lq.normal_equations(n, s, order, aq.codes)
    star = lq.qem_basis(btb, bx, old, 1e-4 / 2)  # doubled statistics = half the ridge
    aq.qem_step()
    torch.testing.assert_close(aq.basis, 0.9 * old + 0.1 * star)
    assert float(aq.qem_count.sum()) == 0


def test_qem_iterations_reduce_error():
    """Alternating encoding and QEM (Sec. 3.2) lowers the quantization error of a fixed weight tensor."""
    torch.manual_seed(0)
    w = torch.randn(4, 16, 3, 3, dtype=D) * 0.05
    wq = LQNetWeightQuantizer(3, 4, fan=9 * 4, momentum=0.0).double()

    def err() -> float:
        with torch.no_grad():
            return float(((wq(w) - w) ** 2).sum())

    errs = [err()]
    for _ in range(5):
        wq.qem_step()  # statistics of the forward inside err()
        errs.append(err())
    assert all(b <= a + 1e-15 for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 0.5 * errs[0]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 6, 3, padding=1)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        return self.fc(self.c2(self.c1(x).relu()).relu().mean((2, 3)))


def test_method_policy_and_hook():
    m = build_method("lqnet", 2, 3)
    net = prepare(Net(), m)
    layers = dict(quantized_layers(net))
    assert set(layers) == {"c2"}  # first conv and last FC full precision (paper)
    c2 = layers["c2"]
    assert isinstance(c2, QConv2d) and isinstance(c2.wq, LQNetWeightQuantizer) and isinstance(c2.aq, LQNetActQuantizer)
    assert c2.wq.basis.shape == (6, 2) and c2.aq.basis.shape == (1, 3)
    b = 0.6745 * (2 / (9 * 6)) ** 0.5 / 2
    torch.testing.assert_close(c2.wq.basis[0], torch.tensor([b, 2 * b]))
    assert isinstance(m.hooks[0], LQNetQEM)
    net.train()
    net(torch.randn(2, 3, 5, 5)).sum().backward()
    before = c2.wq.basis.clone()
    m.hooks[0].on_step_end(Context(model=net), 1)
    assert not torch.equal(before, c2.wq.basis)
    assert float(c2.wq.qem_count.sum()) == 0 and float(c2.aq.qem_count.sum()) == 0
    assert "basis" in dict(c2.wq.named_buffers()) and "wq.basis" in "".join(net.state_dict())
    assert not any(k.endswith(("qem_count", "qem_sum", "codes")) for k in net.state_dict())
    # same: every layer, weight-only: no activation quantizer
    net2 = prepare(Net(), build_method("lqnet", 4, 32, first_last="same"))
    layers = dict(quantized_layers(net2))
    assert set(layers) == {"c1", "c2", "fc"} and all(q.aq is None for q in layers.values())
    assert isinstance(layers["fc"], QLinear) and layers["fc"].wq.basis.shape == (2, 4)


def test_bad_options():
    with pytest.raises(QreproError, match="bit-width 5"):
        build_method("lqnet", 5, 5)
    with pytest.raises(QreproError, match="first_last"):
        build_method("lqnet", 2, 2, first_last="8bit")
    with pytest.raises(QreproError, match="momentum"):
        build_method("lqnet", 2, 2, momentum=1.0)
    with pytest.raises(QreproError, match="a_ridge"):
        build_method("lqnet", 2, 2, a_ridge=0.0)


def test_recipes_are_the_released_scripts():
    """The values of the authors' LQ-Nets release: imagenet.py --data_aug with imagenet_utils.py
    (ImageNetModel._get_optimizer: Nesterov momentum 0.9), and cifar10-vgg-small.py (plain momentum 0.9)."""
    cfg = compose(["+experiment=lqnet_resnet18_imagenet_w2a2"])
    o, s = cfg.optimizer, cfg.scheduler
    assert (o.name, o.lr, o.momentum, o.nesterov, o.weight_decay) == ("sgd", 0.1, 0.9, True, 5e-5)
    assert (list(s.milestones), s.gamma, cfg.trainer.epochs, cfg.trainer.batch_size) == (
        [30, 60, 85, 95, 105],
        0.1,
        110,
        256,
    )
    cfg = compose(["+experiment=lqnet_resnet20_cifar10_w2a2"])
    o, s = cfg.optimizer, cfg.scheduler
    assert (o.name, o.lr, o.momentum, o.nesterov, o.weight_decay) == ("sgd", 0.02, 0.9, False, 5e-4)
    assert (list(s.milestones), s.gamma, cfg.trainer.epochs, cfg.trainer.batch_size) == ([80, 160, 300], 0.1, 400, 100)
