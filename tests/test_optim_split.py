"""optimizer=sgd_adam: SGD groups step as torch.optim.SGD, adam groups as torch.optim.Adam (float64)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from qrepro.errors import QreproError
from qrepro.optim import OPTIMIZERS, _load_all, param_groups

_load_all()

D = torch.float64


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.q = nn.Module()
        self.q.param_tags = {"s": "q_scale"}
        self.q.s = nn.Parameter(torch.tensor([0.5, 1.5]))

    def forward(self, x):
        return self.fc(x) * self.q.s.sum()


def _build(model):
    groups = param_groups(
        model,
        {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4},
        [{"tags": ["q_scale"], "adam": True, "lr": 1e-2, "weight_decay": 1e-3, "betas": [0.8, 0.99]}],
    )
    return OPTIMIZERS.get("sgd_adam")(groups, model=model, lr=0.1, momentum=0.9, weight_decay=1e-4)


def test_matches_torch_sgd_and_adam():
    torch.manual_seed(0)
    net = Net().double()
    ref = copy.deepcopy(net)
    opt = _build(net)
    sgd = torch.optim.SGD(ref.fc.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    adam = torch.optim.Adam([ref.q.s], lr=1e-2, weight_decay=1e-3, betas=(0.8, 0.99), foreach=False)
    for _ in range(5):
        x, y = torch.randn(8, 4, dtype=D), torch.randn(8, 3, dtype=D)
        for m, o in ((net, [opt]), (ref, [sgd, adam])):
            for oo in o:
                oo.zero_grad()
            ((m(x) - y) ** 2).mean().backward()
            for oo in o:
                oo.step()
    for (n, a), b in zip(net.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-15, msg=n)
    # checkpoints round-trip (Adam moments and SGD momentum live in one state)
    opt2 = _build(copy.deepcopy(net))
    opt2.load_state_dict(opt.state_dict())
    g = next(g for g in opt2.param_groups if g["adam"])
    assert float(opt2.state[g["params"][0]]["step"]) == 5 and g["betas"] == (0.8, 0.99)


def test_needs_an_adam_group():
    net = Net()
    groups = param_groups(net, {"lr": 0.1}, [])
    with pytest.raises(QreproError, match="adam: true"):
        OPTIMIZERS.get("sgd_adam")(groups, model=net, lr=0.1)
