"""The compiled-step forms of quantizer pieces equal the plain forms they replace, in value and gradient
(float64): ``ste.minimum`` == ``where(x <= hi, x, hi)``; LQ-Net's per-tensor quantization and QEM statistics on a
tensor in its own shape and memory layout == the same on the tensor flattened to one row; ReActNet's binary
activation == its ``where`` form."""

from __future__ import annotations

import copy

import torch
from torch import nn

from qrepro.hooks import Context
from qrepro.quant import build_method, prepare
from qrepro.quant import lqnet as lq
from qrepro.quant.layers import quantized_layers
from qrepro.quant.methods.lqnet import LQNetActQuantizer
from qrepro.quant.reactnet import approx_sign_surrogate, binarize_weight, binary_activation, weight_scale
from qrepro.quant.ste import minimum

D = torch.float64


def test_minimum_equals_where_in_value_and_gradient() -> None:
    x = torch.linspace(-3, 3, 61, dtype=D)  # hits 2 exactly
    g = torch.randn(61, dtype=D, generator=torch.Generator().manual_seed(0))
    for hi0 in (torch.tensor(2.0, dtype=D), torch.full((61,), 2.0, dtype=D)):
        outs = []
        for f in ("where", "minimum"):
            xx = x.clone().requires_grad_()
            hi = hi0.clone().requires_grad_()
            y = torch.where(xx <= hi, xx, hi) if f == "where" else minimum(xx, hi)
            outs.append((y, *torch.autograd.grad(y, (xx, hi), g)))
        for ref, got in zip(outs[0], outs[1]):
            assert torch.equal(ref, got)
    # a buffer bound (no gradient), as LQ-Net's top level
    xx = x.clone().requires_grad_()
    (gx,) = torch.autograd.grad(minimum(xx, torch.tensor(2.0, dtype=D)), xx, g)
    assert torch.equal(gx, g * (x <= 2).to(D))


def test_minimum_batches_under_vmap() -> None:
    x = torch.randn(3, 7, dtype=D, generator=torch.Generator().manual_seed(1))
    hi = torch.tensor([0.0, 0.5, -0.2], dtype=D)
    got = torch.func.vmap(minimum)(x, hi)
    assert torch.equal(got, torch.minimum(x, hi[:, None]))


def test_lqnet_per_tensor_forms_equal_the_row_forms() -> None:
    g = torch.Generator().manual_seed(2)
    basis = torch.rand(1, 3, generator=g, dtype=D) + 0.1
    levels, _ = lq.sorted_levels(basis, lq.codes(3, False, D))
    x = torch.randn(4, 5, 6, 7, generator=g, dtype=D).abs()
    x.view(-1)[:7] = lq.thresholds(levels)[0]  # values exactly on the thresholds go to the lower level
    x_cl = x.contiguous(memory_format=torch.channels_last)
    row = x.reshape(1, -1)
    q_row = lq.quantize(row, levels).reshape(x.shape)
    n_row, s_row = lq.level_stats(row, levels)
    for t in (x, x_cl):
        assert torch.equal(lq.quantize(t, levels[0]), q_row)
        n, s = lq.level_stats(t, levels[0])
        assert torch.equal(n, n_row[0])
        torch.testing.assert_close(s, s_row[0], rtol=1e-12, atol=1e-12)


def _row_reference(aq: LQNetActQuantizer, x: torch.Tensor) -> torch.Tensor:
    """The activation quantizer as it was written before: the input flattened to one row."""
    levels, _ = lq.sorted_levels(aq.basis, aq.codes)
    row = x.detach().reshape(1, -1)
    n, s = lq.level_stats(row, levels)
    aq.qem_count.add_(n)
    aq.qem_sum.add_(s)
    q = lq.quantize(row, levels).reshape(x.shape)
    top = aq.basis.clamp(min=0).sum()
    xc = torch.where(x <= top, x, top)
    return xc + (q - xc).detach()


def test_lqnet_activation_quantizer_over_qem_steps_equals_the_row_form() -> None:
    """Five training steps (forward, backward, QEM update) of the activation quantizer on channels-last inputs:
    outputs and input gradients equal those of the row form, statistics and bases to float64 rounding."""
    g = torch.Generator().manual_seed(3)
    new, ref = LQNetActQuantizer(2).double().train(), LQNetActQuantizer(2).double().train()
    for _ in range(5):
        x = (torch.randn(2, 3, 4, 5, generator=g, dtype=D) * 1.5).contiguous(memory_format=torch.channels_last)
        gy = torch.randn(x.shape, generator=g, dtype=D)
        outs = []
        for f in (new, lambda t: _row_reference(ref, t)):
            xx = x.clone().requires_grad_()
            y = f(xx)
            outs.append((y, *torch.autograd.grad(y, xx, gy)))
        for a, b in zip(*outs):
            assert torch.equal(a, b)
        torch.testing.assert_close(new.qem_count, ref.qem_count, rtol=0, atol=0)
        torch.testing.assert_close(new.qem_sum, ref.qem_sum, rtol=1e-12, atol=1e-12)
        new.qem_step(), ref.qem_step()
        torch.testing.assert_close(new.basis, ref.basis, rtol=1e-12, atol=1e-12)
        ref.basis.copy_(new.basis)  # the sums differ in the order of additions: compare each step from one basis


def test_reactnet_approx_sign_equals_the_where_form() -> None:
    """ReActNet's binary activation (gradient rebuilt in the backward pass) == ``F + (sign(x) - F).detach()`` with
    the ``where`` form of the polynomial F, values and gradients, including -1, 0, 1 and values beyond them."""
    x = torch.cat(
        [
            torch.tensor([-2.0, -1.0, -1 + 1e-12, -0.5, -1e-300, 0.0, 1e-300, 0.5, 1 - 1e-12, 1.0, 2.0], dtype=D),
            torch.randn(200, dtype=D, generator=torch.Generator().manual_seed(4)),
        ]
    )
    g = torch.randn(x.shape, dtype=D, generator=torch.Generator().manual_seed(5))
    outs = []
    for f in (
        binary_activation,
        lambda t: approx_sign_surrogate(t) + (torch.sign(t) - approx_sign_surrogate(t)).detach(),
    ):
        xx = x.clone().requires_grad_()
        y = f(xx)
        outs.append((y, *torch.autograd.grad(y, xx, g)))
    assert torch.equal(outs[0][0], outs[1][0])
    assert torch.equal(outs[0][1], outs[1][1])  # bit for bit: the same roundings
    assert torch.equal(outs[0][1][[0, 1, 9, 10]], torch.zeros(4, dtype=D))  # 0 at and beyond ±1
    assert outs[0][1][5] == 2 * g[5]  # the peak at 0
    xb = x[:12].reshape(3, 4).requires_grad_()
    yb = torch.func.vmap(binary_activation)(xb)
    (gb,) = torch.autograd.grad(yb, xb, g[:12].reshape(3, 4))
    assert torch.equal(yb, torch.sign(xb)) and torch.equal(gb, outs[0][1][:12].reshape(3, 4))


def test_reactnet_weight_and_ste_clamp_equal_torch_clamp() -> None:
    """ReActNet's weight binarization and the ``ste`` activation gradient use ``ste.clip`` for ``clamp(x, -1, 1)``:
    values and gradients equal those with ``torch.clamp`` (0 on the bounds ±1)."""
    w = torch.cat([torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0], dtype=D), torch.randn(40, dtype=D)]).reshape(5, 9)
    g = torch.randn(5, 9, dtype=D, generator=torch.Generator().manual_seed(6))
    for scale in ("channel", "tensor", "none"):
        ww = w.clone().requires_grad_()
        y = binarize_weight(ww, scale)
        (gw,) = torch.autograd.grad(y, ww, g)
        wc = w.clone().requires_grad_()
        c = torch.clamp(wc, -1.0, 1.0)
        ref = c + (weight_scale(w, scale) * torch.sign(w) - c).detach()  # the torch.clamp form
        (gc,) = torch.autograd.grad(ref, wc, g)
        assert torch.equal(y, ref) and torch.equal(gw, gc)
    xx = w.clone().requires_grad_()
    (gx,) = torch.autograd.grad(binary_activation(xx, "ste"), xx, g)
    assert torch.equal(gx, g * (w.abs() < 1).to(D))


def test_lqnet_batched_qem_update_equals_one_quantizer_at_a_time() -> None:
    """``LQNetQEM`` solves the QEM systems of all quantizers of a network in one batch: bases equal the update of
    each quantizer alone (``qem_step`` on a copy), statistics are cleared, over three steps."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.Flatten(), nn.LazyLinear(3)
    )
    model(torch.randn(1, 3, 9, 9))
    method = build_method("lqnet", 2, 2, first_last="same")
    prepare(model, method)
    model.double().train()
    hook = method.hooks[0]
    for _ in range(3):
        model(torch.randn(5, 3, 9, 9, dtype=D))
        qs = [q for _, layer in quantized_layers(model) for q in (layer.wq, layer.aq)]
        alone = [copy.deepcopy(q) for q in qs]
        for q in alone:
            q.qem_step()
        hook.on_step_end(Context(model=model), 0)
        for q, a in zip(qs, alone):
            torch.testing.assert_close(q.basis, a.basis, rtol=1e-13, atol=1e-15)
            assert not q.qem_count.any() and not q.qem_sum.any()
