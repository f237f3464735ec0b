"""Parameter-group rules and per-iteration schedules."""

import math

import pytest
import torch
from torch import nn

from qrepro.errors import QreproError
from qrepro.optim import build_optimizer, build_scheduler, param_tags
from qrepro.quant import prepare
from qrepro.quant.methods import Method


class Clip(nn.Module):
    param_tags = {"alpha": "act_clip"}

    def __init__(self):
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor(8.0))

    def forward(self, x):
        return torch.minimum(x, self.alpha)


def _model():
    m = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, groups=8, bias=False),
        nn.Flatten(),
        nn.Linear(8, 2),
    )
    return prepare(m, Method("t", lambda info: (None, Clip()) if info.role == "middle" else None))


def test_tags():
    tags = param_tags(_model())
    assert tags["0.weight"] == {"weight"} and tags["0.bias"] == {"bias"}
    assert tags["1.weight"] == {"norm"} and tags["1.bias"] == {"norm"}
    assert tags["3.weight"] == {"depthwise"}
    assert tags["3.aq.alpha"] == {"quant", "act_clip"}
    assert tags["5.weight"] == {"weight"}


def test_group_rules_first_match_wins():
    m = _model()
    opt = build_optimizer(
        m,
        "sgd",
        [
            {"tags": ["norm", "bias", "depthwise"], "weight_decay": 0.0},
            {"tags": ["act_clip"], "lr": 0.01, "weight_decay": 1e-4},
        ],
        lr=0.1,
        momentum=0.9,
        nesterov=True,
        weight_decay=5e-4,
    )
    by = {n: g for g in opt.param_groups for n in g["param_names"]}
    assert by["1.weight"]["weight_decay"] == 0 and by["3.weight"]["weight_decay"] == 0
    assert by["3.aq.alpha"]["lr"] == 0.01 and by["3.aq.alpha"]["weight_decay"] == 1e-4
    assert by["0.weight"]["lr"] == 0.1 and by["0.weight"]["weight_decay"] == 5e-4
    assert opt.param_groups[0]["nesterov"] is True
    n_params = sum(len(g["params"]) for g in opt.param_groups)
    assert n_params == len(list(m.parameters()))
    with pytest.raises(QreproError):
        build_optimizer(m, "sgd", None, lr=0.1, momentum=0.0, nesterov=True)
    with pytest.raises(QreproError):
        build_optimizer(m, "sgd", [{"weight_decay": 0}], lr=0.1)


def test_schedules():
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p], "lr": 0.2}], lr=0.2)
    s = build_scheduler(opt, "cosine", total_steps=100, steps_per_epoch=10, warmup_epochs=1, warmup_start_factor=0.0)
    assert s.factor(0) == 0.0 and s.factor(5) == pytest.approx(0.5) and s.factor(10) == pytest.approx(1.0)
    assert s.factor(55) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert s.factor(100) == pytest.approx(0.0, abs=1e-12)
    ms = build_scheduler(None, "multistep", total_steps=100, steps_per_epoch=10, milestones=[3, 6], gamma=0.1)
    assert [ms.factor(t) for t in (29, 30, 59, 60)] == pytest.approx([1, 0.1, 0.1, 0.01])
    lin = build_scheduler(None, "linear", total_steps=10, steps_per_epoch=1)
    assert lin.factor(5) == pytest.approx(0.5)
    for _ in range(10):
        s.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2)
    opt.param_groups[0]["fixed_lr"] = True  # e.g. transition-rate-scheduled groups
    s.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2)
