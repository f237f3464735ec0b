"""ReActNet-18: binarization maths (Bi-Real/ReActNet equations) in float64, RSign/RPReLU, the model layout and
the method's policy, transition-rate scheduling of the binary latent weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from qrepro.errors import QreproError
from qrepro.models import build_model
from qrepro.quant import build_method, prepare, quantized_layers
from qrepro.quant import reactnet as F
from qrepro.quant.methods.reactnet import BinaryActivation, BinaryWeight

D = torch.float64


def _grad(fn, x):
    x = x.clone().requires_grad_(True)
    fn(x).sum().backward()
    return x.grad


# ------------------------------------------------------------------------------------------------ activations
def test_approx_sign_values_and_piecewise_polynomial_gradient():
    x = torch.tensor([-2.0, -1.0, -0.75, -0.5, -1e-9, 0.0, 1e-9, 0.25, 0.5, 0.999, 1.0, 3.0], dtype=D)
    y = F.binary_activation(x)
    assert torch.equal(y, torch.sign(x))  # sign(0) = 0 as in the authors' code
    # dF/dx = 2 + 2x on [-1, 0), 2 - 2x on [0, 1), 0 elsewhere (Bi-Real Net Eq. 6)
    expected = torch.where(
        (x >= -1) & (x < 0), 2 + 2 * x, torch.where((x >= 0) & (x < 1), 2 - 2 * x, torch.zeros_like(x))
    )
    assert torch.allclose(_grad(F.binary_activation, x), expected, rtol=0, atol=1e-15)
    assert _grad(F.binary_activation, x)[5] == 2.0  # the peak at 0
    assert _grad(F.binary_activation, x)[1] == 0.0 and _grad(F.binary_activation, x)[10] == 0.0  # ends at ±1


def test_surrogate_is_the_polynomial_and_its_derivative_is_the_gradient():
    x = torch.linspace(-1.5, 1.5, 301, dtype=D)
    f = F.approx_sign_surrogate(x)
    poly = torch.where(x < -1, -1.0, torch.where(x < 0, x**2 + 2 * x, torch.where(x < 1, -(x**2) + 2 * x, 1.0)))
    assert torch.equal(f, poly)
    # continuous at the joints, equal to sign at ±1 and 0 at 0
    for p, v in ((-1.0, -1.0), (0.0, 0.0), (1.0, 1.0)):
        t = torch.tensor([p - 1e-12, p, p + 1e-12], dtype=D)
        assert torch.allclose(F.approx_sign_surrogate(t), torch.full_like(t, v), atol=1e-11)
    # finite differences of F away from the joints equal the backward pass
    h = 1e-6
    xs = x[(x - x.round()).abs() > 1e-3]
    fd = (F.approx_sign_surrogate(xs + h) - F.approx_sign_surrogate(xs - h)) / (2 * h)
    assert torch.allclose(_grad(F.binary_activation, xs), fd, atol=1e-8)


def test_ste_reading_is_the_clipped_identity():
    x = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0], dtype=D)
    assert torch.equal(F.binary_activation(x, "ste"), torch.sign(x))
    assert torch.equal(
        _grad(lambda t: F.binary_activation(t, "ste"), x), torch.tensor([0, 0, 1, 1, 1, 0, 0.0], dtype=D)
    )  # torch.clamp's gradient: 0 on the bounds


def test_rsign_shift_gradient():
    """RSign(x) = sign(x − α) (Eq. 1): the model's move0 adds −α; the gradient of α sums the approx-sign slopes."""
    model = prepare(build_model("reactnet18", 10, stem="cifar"), build_method("reactnet", 32, 1))
    block = model.layer1[0].double()
    x = torch.randn(2, 64, 4, 4, dtype=D, generator=torch.Generator().manual_seed(0)) * 0.7
    with torch.no_grad():
        block.move0.bias.copy_(torch.randn(1, 64, 1, 1, dtype=D) * 0.3)
    captured = {}
    block.binary_conv.register_forward_hook(lambda m, i, o: captured.update(a=m.aq(i[0])))
    block(x)
    u = x + block.move0.bias
    assert torch.equal(captured["a"], torch.sign(u))
    g = torch.randn_like(u)
    bias = block.move0.bias.detach().clone().requires_grad_(True)
    (F.binary_activation(x + bias) * g).sum().backward()
    slope = torch.where((u >= -1) & (u < 0), 2 + 2 * u, torch.where((u >= 0) & (u < 1), 2 - 2 * u, 0.0))
    assert torch.allclose(bias.grad, (g * slope).sum(dim=(0, 2, 3), keepdim=True), atol=1e-12)


# ------------------------------------------------------------------------------------------------ RPReLU
def test_rprelu_forward_and_gradients():
    """RPReLU (Eq. 3): f(x) = β(x − γ) + ζ for x ≤ γ, x − γ + ζ above; move1.bias = −γ, move2.bias = ζ."""
    block = build_model("reactnet18", 10, stem="cifar").layer1[0].double()
    c = 64
    gen = torch.Generator().manual_seed(1)
    gamma = torch.randn(c, dtype=D, generator=gen) * 0.2
    zeta = torch.randn(c, dtype=D, generator=gen) * 0.2
    beta = torch.rand(c, dtype=D, generator=gen)
    with torch.no_grad():
        block.move1.bias.copy_(-gamma.view(1, c, 1, 1))
        block.move2.bias.copy_(zeta.view(1, c, 1, 1))
        block.prelu.weight.copy_(beta)
    x = torch.randn(3, c, 2, 2, dtype=D, generator=gen).requires_grad_(True)
    y = block.move2(block.prelu(block.move1(x)))
    gm, zm, bm = gamma.view(1, c, 1, 1), zeta.view(1, c, 1, 1), beta.view(1, c, 1, 1)
    ref = torch.where(x > gm, x - gm + zm, bm * (x - gm) + zm)
    assert torch.allclose(y, ref, atol=1e-15)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    above = (x > gm).to(D)
    dx = g * (above + (1 - above) * bm)
    assert torch.allclose(x.grad, dx, atol=1e-15)
    assert torch.allclose(block.move2.bias.grad, g.sum(dim=(0, 2, 3), keepdim=True), atol=1e-12)
    assert torch.allclose(block.move1.bias.grad, dx.sum(dim=(0, 2, 3), keepdim=True), atol=1e-12)  # d/d(−γ)
    assert torch.allclose(block.prelu.weight.grad, (g * (1 - above) * (x - gm)).sum(dim=(0, 2, 3)), atol=1e-12)
    assert torch.all(build_model("reactnet18", 10).layer1[0].prelu.weight == 0.25)


# ------------------------------------------------------------------------------------------------ weights
def test_weight_binarization_per_output_channel_scale_and_clipped_ste():
    w = torch.tensor(
        [[[[0.5, -1.5]], [[1.0, -0.25]]], [[[2.0, 0.0]], [[-1.0, 0.3]]]], dtype=D
    )  # (C_out=2, C_in=2, 1, 2)
    a0 = (0.5 + 1.5 + 1.0 + 0.25) / 4
    a1 = (2.0 + 0.0 + 1.0 + 0.3) / 4
    expected = torch.cat([a0 * torch.sign(w[:1]), a1 * torch.sign(w[1:])])
    assert torch.allclose(F.binarize_weight(w), expected, rtol=0, atol=1e-16)
    assert F.binarize_weight(w)[1, 0, 0, 1] == 0.0  # sign(0) = 0, as torch.sign in the authors' code
    assert torch.allclose(F.weight_scale(w).flatten(), torch.tensor([a0, a1], dtype=D))
    # gradient: 1[−1 < w < 1] (torch.clamp's, 0 on the bounds ±1 as in the authors' code), not scaled by α
    g = torch.randn_like(w)
    wg = w.clone().requires_grad_(True)
    (F.binarize_weight(wg) * g).sum().backward()
    assert torch.equal(wg.grad, g * ((w > -1) & (w < 1)).to(D))
    # the other readings
    assert torch.allclose(F.binarize_weight(w, "tensor"), w.abs().mean() * torch.sign(w))
    assert torch.equal(F.binarize_weight(w, "none"), torch.sign(w))


def test_linear_weight_scale_is_per_row():
    w = torch.tensor([[1.0, -3.0], [0.5, 0.5]], dtype=D)
    assert torch.equal(F.binarize_weight(w), torch.tensor([[2.0, -2.0], [0.5, 0.5]], dtype=D))


def test_binary_weight_discrete_levels():
    q = BinaryWeight()
    w = torch.tensor([-0.3, 0.0, 2.0])
    assert torch.equal(q.discrete(w), torch.tensor([-1, 0, 1], dtype=torch.int8))
    assert torch.equal(q.from_discrete(q.discrete(w)), torch.tensor([-1.0, 0.0, 1.0]))
    assert q.bits == 1 and BinaryActivation().bits == 1


def test_bad_options_raise_one_line_errors():
    with pytest.raises(QreproError, match="act_grad"):
        build_method("reactnet", 1, 1, act_grad="tanh")
    with pytest.raises(QreproError, match="weight_scale"):
        build_method("reactnet", 1, 1, weight_scale="row")
    with pytest.raises(QreproError, match="bit-width 2"):
        build_method("reactnet", 2, 1)
    with pytest.raises(QreproError, match="keep_real"):
        build_method("reactnet", 1, 1, keep_real="downsample")
    with pytest.raises(QreproError, match="stem"):
        build_model("reactnet18", 10, stem="tiny")


# ------------------------------------------------------------------------------------------------ model + policy
def test_model_size_and_binary_policy():
    m = build_model("reactnet18", 100, stem="cifar")
    assert sum(p.numel() for p in m.parameters()) == 11_235_044  # "11,235K" (TR paper, Sec. S2.2)
    assert sum(p.numel() for p in build_model("reactnet18", 1000).parameters()) == 11_704_424
    prepare(m, build_method("reactnet", 1, 1))
    layers = dict(quantized_layers(m))
    assert len(layers) == 16 and all(n.endswith("binary_conv") for n in layers)
    assert all(isinstance(q.wq, BinaryWeight) and isinstance(q.aq, BinaryActivation) for q in layers.values())
    step1 = prepare(build_model("reactnet18", 100, stem="cifar"), build_method("reactnet", 32, 1))
    assert all(q.wq is None and q.aq is not None for _, q in quantized_layers(step1))
    # the step-1 state dict loads strictly into the step-2 model (same names, no quantizer state)
    m.load_state_dict(step1.state_dict(), strict=True)


def test_cifar_stem_keeps_resolution_and_imagenet_stem_downsamples():
    x = torch.randn(2, 3, 32, 32)
    for stem, hw in (("cifar", 4), ("imagenet", 1)):
        m = build_model("reactnet18", 10, stem=stem).eval()
        feats = {}
        m.layer4.register_forward_hook(lambda mod, i, o, feats=feats: feats.update(o=o))
        assert m(x).shape == (2, 10) and feats["o"].shape[-1] == hw


# ------------------------------------------------------------------------------------------------ TR
def test_t_optimizer_schedules_binary_latent_weights():
    from qrepro.optim import build_optimizer

    m = prepare(build_model("reactnet18", 10, stem="cifar"), build_method("reactnet", 1, 1)).double()
    opt = build_optimizer(
        m, "sgdt", None, lr=0.1, momentum=0.9, weight_decay=1e-4, tr={"factor": 5e-3, "target_schedule": "constant"}
    )
    talr = [g for g in opt.param_groups if g.get("talr")]
    latent = {id(q.weight) for _, q in quantized_layers(m)}
    assert {id(p) for g in talr for p in g["params"]} == latent
    x, y = torch.randn(4, 3, 32, 32, dtype=D), torch.tensor([0, 1, 2, 3])
    before = [q.wq.discrete(q.weight) for _, q in quantized_layers(m)]
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
    opt.step()  # counts the transitions of the last update
    after = [q.wq.discrete(q.weight) for _, q in quantized_layers(m)]
    flips = sum(int((a != b).sum()) for a, b in zip(after, before))
    assert flips > 0 and "k" in opt.tr_last


def test_distill_option_trains_against_the_teacher(tmp_path):
    from qrepro.quant.distill import distribution_loss

    teacher = build_model("reactnet18", 10, stem="cifar")  # the real-valued network (quantizer=fp) as a teacher
    torch.save({"state_dict": teacher.state_dict()}, tmp_path / "t.pt")
    method = build_method(
        "reactnet",
        1,
        1,
        distill={"model": "reactnet18", "options": {"stem": "cifar"}, "checkpoint": str(tmp_path / "t.pt")},
    )
    method.loss.bind_models(build_model)  # what qrepro.builders does
    student = prepare(build_model("reactnet18", 10, stem="cifar"), method)
    from qrepro.hooks import Context

    for h in method.hooks:
        h.on_train_start(Context(model=student))
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    out = student(x)
    assert torch.allclose(method.loss(out, y, x), distribution_loss(out, teacher.eval()(x)))
    with pytest.raises(QreproError, match="distill"):
        build_method("reactnet", 1, 1, distill={"checkpoint": "x"})


# ------------------------------------------------------------------------------------------------ checkpoints
REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "reactnet"


def test_authors_checkpoint_layout_loads_strictly(tmp_path, capsys):
    """A checkpoint as the authors' train.py saves it ({'state_dict'} of an nn.DataParallel model) initialises our
    model strictly through the ``reactnet-authors`` converter, and the two networks then compute the same logits."""
    from qrepro.builders import init_model

    if (REFERENCE / "resnet" / "2_step2" / "birealnet.py").is_file():
        from qrepro.parity import reference_import

        with reference_import(REFERENCE / "resnet" / "2_step2") as imp:
            theirs = imp("birealnet").birealnet18(num_classes=1000).double()
    else:  # the layout alone: our model's own names under DataParallel's prefix
        theirs = build_model("reactnet18", 1000).double()
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            p.copy_(torch.randn_like(p) * (0.05 if "binary_conv" in n else 0.1) + (1.0 if "bn" in n else 0.0))
    ckpt = {"epoch": 3, "state_dict": nn.DataParallel(theirs).state_dict(), "best_top1_acc": 1.0}
    assert all(k.startswith("module.") for k in ckpt["state_dict"])
    torch.save(ckpt, tmp_path / "checkpoint.pth.tar")
    ours = prepare(build_model("reactnet18", 1000), build_method("reactnet", 1, 1)).double()
    init_model(ours, str(tmp_path / "checkpoint.pth.tar"), strict=True)
    assert "reactnet-authors format" in capsys.readouterr().out
    x = torch.randn(2, 3, 64, 64, dtype=D)
    if (REFERENCE / "resnet" / "2_step2" / "birealnet.py").is_file():
        assert torch.allclose(ours.eval()(x), theirs.eval()(x), rtol=0, atol=1e-10)
    for k, v in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v)


def test_converter_ignores_other_layouts():
    from qrepro.models.reactnet import convert_authors_state_dict

    sd = {"module.layer1.0.conv1.weight": torch.zeros(1), "module.fc.weight": torch.zeros(1)}
    assert convert_authors_state_dict(sd) is None
    assert convert_authors_state_dict({"layer1.0.move0.bias": torch.zeros(1)}) is None
