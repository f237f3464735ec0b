"""Model zoo: every registered model builds, runs forward/backward, and follows the layout contract
(stem conv first in module order, classifier = last nn.Linear); parameter counts match the literature."""

from __future__ import annotations

import inspect
import math
import socket
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from qrepro.errors import QreproError
from qrepro.models import MODELS, build_model, model_names
from qrepro.quant import prepare
from qrepro.quant.layers import QConv2d, QLinear
from qrepro.quant.methods import Method

NUM_CLASSES = 7
# Small inputs keep CPU time down; every architecture here pools adaptively. DeiT needs its
# position-embedding grid to match the input, so it is built for that size.
INPUT_SIZE = {"resnet20": 32, "resnet56": 32, "mobilenet_v2_cifar": 32, "small_cnn": 32}
DEFAULT_SIZE = 32  # ImageNet models: 32x32 leaves a 1x1 final map, enough for a batch-2 BN
EXTRA_KWARGS = {"deit_tiny": {"img_size": 32}, "deit_small": {"img_size": 32}}


def _build(name: str, num_classes: int = NUM_CLASSES, **kw) -> nn.Module:
    torch.manual_seed(0)
    return build_model(name, num_classes=num_classes, **{**EXTRA_KWARGS.get(name, {}), **kw})


def _input(name: str, batch: int = 2) -> torch.Tensor:
    s = INPUT_SIZE.get(name, DEFAULT_SIZE)
    return torch.randn(batch, 3, s, s, generator=torch.Generator().manual_seed(1))


def _conv_linear(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """conv/linear layers in named_modules order, as qrepro.quant.prepare sees them."""
    return [(n, m) for n, m in model.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]


def _nparams(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registry_not_empty():
    names = model_names()
    assert len(names) >= 13
    for expected in ("resnet20", "resnet56", "resnet18", "preresnet50", "mobilenet_v1", "deit_tiny"):
        assert expected in names


@pytest.mark.parametrize("name", model_names())
def test_forward_backward(name):
    model = _build(name).train()
    x = _input(name)
    out = model(x)
    assert out.shape == (2, NUM_CLASSES)
    out.logsumexp(dim=1).sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)
    assert all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", model_names())
def test_layout_roles(name):
    """First conv/linear in module order is the stem (first to run, sees the 3-channel image);
    the last nn.Linear is the classifier (its output is the model's output)."""
    model = _build(name).eval()
    layers = _conv_linear(model)
    assert layers, "no conv/linear layers"
    # no subclasses or other conv types that prepare() would silently skip
    for n, m in model.named_modules():
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
            assert type(m) in (nn.Conv2d, nn.Linear), f"{n} is {type(m).__name__}"

    order, outputs = [], {}

    def hook(mod, inp, out):
        order.append(mod)
        outputs[mod] = out

    handles = [m.register_forward_hook(hook) for _, m in layers]
    with torch.no_grad():
        y = model(_input(name))
    for h in handles:
        h.remove()

    stem = layers[0][1]
    assert isinstance(stem, nn.Conv2d) and stem.in_channels == 3
    assert order[0] is stem
    last_linear = [m for _, m in layers if isinstance(m, nn.Linear)][-1]
    assert last_linear.out_features == NUM_CLASSES
    assert order[-1] is last_linear
    torch.testing.assert_close(outputs[last_linear], y)


class _Scale(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * 1.0


@pytest.mark.parametrize("name", ["resnet20", "mobilenet_v1", "preresnet50", "mobilenet_v3_large", "deit_tiny"])
def test_prepare_swaps_every_layer(name):
    """Every conv/linear is swappable by qrepro.quant.prepare and the output does not change."""
    model = _build(name).eval()
    x = _input(name)
    with torch.no_grad():
        ref = model(x)
    n_layers = len(_conv_linear(model))
    method = Method(name="identity", quantize_layer=lambda info: (_Scale(), None))
    prepare(model, method)
    q = [m for m in model.modules() if isinstance(m, (QConv2d, QLinear))]
    assert len(q) == n_layers
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref)


# --- parameter counts (1000 classes for ImageNet models, 10 for CIFAR) ---------------------------
@pytest.mark.parametrize(
    "name, num_classes, kwargs, expected, rel_tol",
    [
        ("resnet20", 10, {"shortcut": "A"}, 0.27e6, 0.01),  # He et al. 2016, Table 6
        ("resnet20", 10, {"shortcut": "B"}, 272_474, 0.0),  # A + two (1x1 conv + BN) projections
        ("resnet56", 10, {"shortcut": "A"}, 0.85e6, 0.01),  # He et al. 2016, Table 6
        ("resnet18", 1000, {}, 11.7e6, 0.01),
        ("resnet50", 1000, {}, 25.6e6, 0.01),
        ("preresnet50", 1000, {}, 25.5e6, 0.01),
        ("mobilenet_v1", 1000, {}, 4.2e6, 0.01),  # Howard et al. 2017, Table 8
        ("mobilenet_v2", 1000, {}, 3.5e6, 0.01),  # Sandler et al. 2018, Table 4 (3.4M) / torchvision 3.5M
        ("mobilenet_v3_large", 1000, {}, 5.4e6, 0.02),
        ("deit_tiny", 1000, {"img_size": 224}, 5.7e6, 0.01),  # Touvron et al. 2021, Table 1
        ("deit_small", 1000, {"img_size": 224}, 22.0e6, 0.01),
    ],
)
def test_parameter_counts(name, num_classes, kwargs, expected, rel_tol):
    n = _nparams(build_model(name, num_classes=num_classes, **kwargs))
    assert math.isclose(n, expected, rel_tol=rel_tol), n


def test_resnet20_shortcuts():
    a = build_model("resnet20", 10, shortcut="A")
    b = build_model("resnet20", 10, shortcut="B")
    # 19 weighted conv layers (6n+1); option B adds the two 1x1 projection convs -> 20 after the stem
    assert sum(isinstance(m, nn.Conv2d) for m in a.modules()) == 19
    convs_b = [m for m in b.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs_b) == 21
    assert sum(m.kernel_size == (1, 1) and m.stride == (2, 2) for m in convs_b) == 2
    # option A: stride-2 subsample, zero-padded channels, no parameters
    sc = a.layer2[0].shortcut
    assert not list(sc.parameters())
    x = torch.randn(2, 16, 32, 32)
    y = sc(x)
    assert y.shape == (2, 32, 16, 16)
    torch.testing.assert_close(y[:, 8:24], x[:, :, ::2, ::2])
    assert y[:, :8].abs().sum() == 0 and y[:, 24:].abs().sum() == 0


def test_resnet20_final_map_and_bn_before_fc():
    m = build_model("resnet20", 10, bn_before_fc=True)
    names = [n for n, _ in m.named_modules()]
    assert names[-2:] == ["bn_fc", "fc"] and isinstance(m.bn_fc, nn.BatchNorm1d)
    seen = {}
    m.layer3.register_forward_hook(lambda mod, i, o: seen.update(shape=o.shape))
    m(torch.randn(2, 3, 32, 32))
    assert seen["shape"] == (2, 64, 8, 8)  # "average pool 8"
    assert isinstance(build_model("resnet20", 10).bn_fc, nn.Identity)


def test_kaiming_fan_out_init():
    torch.manual_seed(0)
    m = build_model("resnet56", 10, init="kaiming")
    w = m.layer2[1].conv1.weight  # 32 out channels, 3x3 -> fan_out 288
    assert abs(w.std().item() - math.sqrt(2.0 / 288)) < 0.1 * math.sqrt(2.0 / 288)
    torch.manual_seed(0)
    d = build_model("resnet56", 10, init="torch")  # PyTorch default: U(-1/sqrt(fan_in), ..)
    assert d.layer2[1].conv1.weight.abs().max() <= 1 / math.sqrt(288) + 1e-6


def test_preresnet50_structure():
    m = build_model("preresnet50", 1000)
    # first unit: no pre-activation of its own (follows the stem's BN-ReLU); others have one
    assert isinstance(m.layer1[0].bn1, nn.Identity)
    assert isinstance(m.layer1[1].bn1, nn.BatchNorm2d) and isinstance(m.layer2[0].bn1, nn.BatchNorm2d)
    # projection shortcuts are plain 1x1 convs in the first unit of each stage, identity elsewhere
    assert [type(m.get_submodule(f"layer{s}.0").shortcut) for s in range(1, 5)] == [nn.Conv2d] * 4
    assert m.layer1[1].shortcut is None
    # final BN-ReLU before pooling, and no BN directly after a unit's last conv
    names = [n for n, _ in m.named_modules()]
    assert names[-4:] == ["bn_final", "relu_final", "avgpool", "fc"]
    assert m.layer4[2].conv3.stride == (1, 1) and m.layer2[0].conv2.stride == (2, 2)


def test_mobilenets_structure():
    v1 = build_model("mobilenet_v1", 1000)
    dw = [m for m in v1.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert len(dw) == 13 and all(m.groups == m.in_channels for m in dw)
    half = build_model("mobilenet_v1", 10, width_mult=0.5)
    assert half.classifier.in_features == 512
    cifar = build_model("mobilenet_v2_cifar", 10)
    seen = {}
    cifar.features.register_forward_hook(lambda mod, i, o: seen.update(shape=o.shape))
    cifar(torch.randn(2, 3, 32, 32))
    assert seen["shape"][-2:] == (8, 8)
    strides = [m.stride[0] for m in cifar.modules() if isinstance(m, nn.Conv2d) and m.stride != (1, 1)]
    assert strides == [2, 2]


def test_deit_builds_without_network(monkeypatch):
    def no_net(*a, **k):
        raise AssertionError("model construction tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_net)
    monkeypatch.setattr(socket, "create_connection", no_net)
    m = build_model("deit_tiny", 5, img_size=32)
    assert m.head.out_features == 5


def test_unknown_model_lists_known_names():
    with pytest.raises(QreproError) as e:
        build_model("resnet21", 10)
    msg = str(e.value)
    assert "resnet21" in msg and "resnet20" in msg and "small_cnn" in msg and "\n" not in msg


@pytest.mark.parametrize(
    "name, kwargs, needle",
    [
        ("resnet20", {"depth": 20}, "depth"),
        ("resnet18", {"width_mult": 0.5}, "width_mult"),
        ("resnet20", {"shortcut": "C"}, "shortcut"),
        ("resnet20", {"init": "xavier"}, "init"),
        ("mobilenet_v2", {"width_mult": -1.0}, "width_mult"),
        ("mobilenet_v2", {"dropout": 1.5}, "dropout"),
        ("deit_tiny", {"img_size": 30}, "img_size"),
    ],
)
def test_bad_options_are_one_line_errors(name, kwargs, needle):
    with pytest.raises(QreproError) as e:
        build_model(name, 10, **kwargs)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_bad_num_classes():
    with pytest.raises(QreproError, match="num_classes"):
        build_model("small_cnn", 0)


def test_small_cnn_learns_digits():
    """small_cnn reaches >90% test accuracy on sklearn digits (as 3x32x32) in 3 CPU epochs."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = nn.functional.interpolate(x, size=32, mode="nearest").expand(-1, 3, -1, -1).contiguous()
    x = (x - x.mean()) / x.std()
    y = torch.tensor(d.target)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    tr, te = perm[:1400], perm[1400:]
    torch.manual_seed(0)
    model = build_model("small_cnn", 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    for _ in range(3):
        model.train()
        for idx in tr[torch.randperm(len(tr), generator=g)].split(64):
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(x[te]).argmax(1) == y[te]).float().mean().item()
    assert acc > 0.9, acc


CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "model"


@pytest.mark.parametrize("name", model_names())
def test_model_config_matches_factory(name):
    """configs/model/<name>.yaml = name + every option at its default (in_chans comes from the data)."""
    cfg = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / f"{name}.yaml"))
    assert cfg.pop("name") == name
    params = inspect.signature(MODELS.get(name)).parameters
    defaults = {k: p.default for k, p in params.items() if k not in ("num_classes", "in_chans")}
    assert cfg == defaults
