"""PACT as published (full-precision first/last layers), SAWB (+FPSC) and DoReFa-Net as published: values and
gradients in float64 against the papers' equations, edge cases and per-layer policies."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from qrepro.errors import QreproError
from qrepro.models import build_model
from qrepro.quant import build_method, prepare
from qrepro.quant import dorefanet as DF
from qrepro.quant import sawb as SF
from qrepro.quant.layers import QConv2d, quantized_layers
from qrepro.quant.methods.dorefanet import DoReFaActivation, DoReFaWeight
from qrepro.quant.methods.pact_sawb import SAWBWeight
from qrepro.quant.methods.sat import PACTQuantizer, SATWeightQuantizer

D = torch.float64


def _net():
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------- PACT


def test_pact_fp_first_last_leaves_plain_layers():
    model = prepare(_net(), build_method("pact", 4, 4, first_last="fp", scheme="original"))
    assert type(model[0]) is nn.Conv2d and type(model[6]) is nn.Linear  # not swapped: no clamping, no input quant
    mid = model[2]
    assert isinstance(mid, QConv2d) and isinstance(mid.wq, SATWeightQuantizer) and isinstance(mid.aq, PACTQuantizer)
    assert mid.wq.bits == 4 and mid.wq.rescale is None and not mid.aq.calibrated  # original PACT gradient


def test_pact_default_first_last_unchanged():
    model = prepare(_net(), build_method("pact", 4, 4))
    assert model[0].wq.bits == 8 and model[6].wq.bits == 8 and model[6].aq.bits == 4


# ---------------------------------------------------------------------------------------------------------- SAWB


def test_sawb_alpha_formula():
    w = torch.tensor([-1.0, -0.5, 0.25, 2.0], dtype=D)
    rms, mabs = math.sqrt((1 + 0.25 + 0.0625 + 4) / 4), (1 + 0.5 + 0.25 + 2) / 4
    assert SF.sawb_alpha(w, 2).item() == pytest.approx(3.212 * rms - 2.178 * mabs)
    assert SF.sawb_alpha(w, 1).item() == pytest.approx(mabs)  # binary: E|w|


@pytest.mark.parametrize("bits", [2, 3, 4, 5])
def test_sawb_alpha_near_mse_optimal_for_gaussian(bits):
    """The fitted coefficients put alpha near the MSE-optimal clip of a Gaussian (the distribution they fit)."""
    w = torch.randn(50_000, generator=torch.Generator().manual_seed(0), dtype=D)
    alphas = torch.linspace(0.5, 4.0, 141, dtype=D)
    errs = torch.stack([(SF.sawb_quantize(w, bits, a) - w).square().mean() for a in alphas])
    best = alphas[errs.argmin()].item()
    assert SF.sawb_alpha(w, bits).item() == pytest.approx(best, rel=0.05)


def test_sawb_levels_and_gradient():
    w = torch.linspace(-3, 3, 601, dtype=D)
    a = torch.tensor(1.5, dtype=D)
    q = SF.sawb_quantize(w, 2, a)
    assert sorted(set(q.tolist())) == pytest.approx([-1.5, -0.5, 0.5, 1.5])  # {-a, -a/3, a/3, a}: no zero level
    wg = torch.tensor([-2.0, -1.5, -0.2, 0.0, 1.0, 1.5, 2.0], dtype=D, requires_grad=True)
    SF.sawb_quantize(wg, 2, a).sum().backward()
    assert wg.grad.tolist() == [0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0]  # STE strictly inside, 0 on/beyond +-alpha
    wz = torch.zeros(5, dtype=D)
    assert torch.isfinite(SF.sawb_quantize(wz, 2)).all()  # all-zero weights: alpha floored, no NaN
    with pytest.raises(QreproError):
        SF.sawb_alpha(w, 7)


def test_pact_sawb_policy_and_fpsc():
    r20 = build_model("resnet20", num_classes=10, shortcut="B")
    prepare(r20, build_method("pact_sawb_fpsc", 2, 2))
    names = dict(quantized_layers(r20))
    assert names and all("shortcut" not in n for n in names)
    assert all(isinstance(l.wq, SAWBWeight) and isinstance(l.aq, PACTQuantizer) for l in names.values())
    assert any("shortcut" in n for n, m in r20.named_modules() if type(m) is nn.Conv2d)
    r20b = prepare(build_model("resnet20", num_classes=10, shortcut="B"), build_method("pact_sawb", 2, 2))
    assert any("shortcut" in n for n, _ in quantized_layers(r20b))
    first = next(m for m in r20b.modules() if isinstance(m, nn.Conv2d))
    assert type(first) is nn.Conv2d  # first conv full precision


# ---------------------------------------------------------------------------------------------------- DoReFa-Net


def test_dorefanet_weight_multi_bit_matches_formula():
    w = torch.tensor([-2.0, -0.3, 0.0, 0.1, 0.7, 1.2], dtype=D)
    t = torch.tanh(w)
    r = t / (2 * t.abs().max()) + 0.5
    want = 2 * torch.round(3 * r) / 3 - 1
    assert torch.allclose(DF.weight(w, 2), want, atol=1e-15)


def test_dorefanet_weight_binary():
    w = torch.tensor([-2.0, -0.5, 0.0, 0.5, 1.0], dtype=D, requires_grad=True)
    q = DF.weight(w, 1)
    e = 4.0 / 5
    assert q.tolist() == pytest.approx([-e, -e, 0.0, e, e])  # sign(0) = 0 as tf.sign
    q.sum().backward()
    assert w.grad.tolist() == [1.0] * 5  # straight-through, E detached


def test_dorefanet_activation_fixed_clip():
    x = torch.tensor([-1.0, 0.0, 0.1, 0.5, 0.8, 1.0, 3.0], dtype=D, requires_grad=True)
    q = DF.activation(x, 2)
    assert q.tolist() == pytest.approx([0.0, 0.0, 0.0, 2 / 3, 2 / 3, 1.0, 1.0])
    q.sum().backward()
    assert x.grad.tolist() == [0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    assert DF.quantize_k(torch.tensor([0.5], dtype=D), 1).item() == 0.0  # half to even, as round


def test_dorefanet_policy_is_parameter_free_and_distinct_from_dorefa():
    model = prepare(_net(), build_method("dorefanet", 2, 2))
    assert type(model[0]) is nn.Conv2d and type(model[6]) is nn.Linear
    assert isinstance(model[2].wq, DoReFaWeight) and isinstance(model[2].aq, DoReFaActivation)
    assert not any("wq" in n or "aq" in n for n, _ in model.named_parameters())  # nothing learned
    other = prepare(_net(), build_method("dorefa", 2, 2))
    assert isinstance(other[2].aq, PACTQuantizer)  # the SAT ablation's dorefa keeps PACT activations
    same = prepare(_net(), build_method("dorefanet", 2, 2, first_last="same"))
    assert same[0].aq is None and same[0].wq.bits == 2 and same[6].aq.bits == 2
    with pytest.raises(QreproError):
        build_method("dorefanet", 2, 2, first_last="8bit")
