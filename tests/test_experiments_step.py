"""Every experiment in configs/experiment builds (model, method, optimizer, schedule) and takes one training step.

Composing alone (tests/test_configs.py) misses what only building and stepping meets: a method that rejects the
model or the bits, an optimizer rule that names no parameter, a hook that fails on its first batch, a loss that is
NaN from the start. Each experiment is built with ``qrepro.api.build`` exactly as the trainer builds it (the
dataset's class count, no data loaded, no checkpoint) and stepped once on a random batch of 2 images at 32x32
(the smallest size every ImageNet model here accepts; CIFAR/digits are 32x32 anyway): the loss and the
parameters are finite, the loss reaches some parameter's gradient and some parameter moves.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from qrepro.api import build
from qrepro.cli import CONFIG_DIR

EXPERIMENTS = sorted(
    str(p.relative_to(Path(CONFIG_DIR) / "experiment").with_suffix(""))
    for p in (Path(CONFIG_DIR) / "experiment").rglob("*.yaml")
)
SMALL = ["trainer.device=cpu", "trainer.compile=false", "logger=none", "init_from=null"]
BATCH, SIZE = 2, 32


def _default(defaults, group: str) -> str | None:
    for item in defaults or []:
        if isinstance(item, dict):
            for key, value in item.items():
                if key.removeprefix("override ").strip("/ ") == group:
                    return value
    return None


@cache
def _num_classes(dataset: str) -> int:
    return int(OmegaConf.load(Path(CONFIG_DIR) / "dataset" / f"{dataset}.yaml").num_classes)


def _dataset_in(path: Path) -> str | None:
    """The dataset a config's defaults list chooses, following included configs (a cell's recipe)."""
    defaults = OmegaConf.to_container(OmegaConf.load(path)).get("defaults") or []
    found = _default(defaults, "dataset")
    for item in defaults:
        if found is None and isinstance(item, str) and item.startswith("/"):
            found = _dataset_in(Path(CONFIG_DIR) / f"{item.strip('/').split('@')[0]}.yaml")
    return found


def _dataset(name: str) -> str:
    """The experiment's dataset, read from its defaults list (else the trainer's default), without composing."""
    found = _dataset_in(Path(CONFIG_DIR) / "experiment" / f"{name}.yaml")
    return found or _default(
        OmegaConf.to_container(OmegaConf.load(Path(CONFIG_DIR) / "train.yaml"))["defaults"], "dataset"
    )


def test_experiments_found():
    assert len(EXPERIMENTS) > 100, EXPERIMENTS


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_builds_and_steps(name):
    dataset = _dataset(name)
    num_classes = _num_classes(dataset)
    run = build([f"+experiment={name}", *SMALL], load_data=False, num_classes=num_classes, steps_per_epoch=2)
    assert (run.cfg.dataset.name, run.cfg.dataset.num_classes) == (dataset, num_classes)

    g = torch.Generator().manual_seed(0)
    if run.cfg.dataset.get("raw255"):  # uint8 pixel values as floats, no normalisation
        x = torch.randint(0, 256, (BATCH, 3, SIZE, SIZE), generator=g).float()
    else:
        x = torch.randn(BATCH, 3, SIZE, SIZE, generator=g)
    y = torch.randint(0, num_classes, (BATCH,), generator=g)
    params = dict(run.model.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}

    loss = run.step(x, y)

    assert torch.isfinite(loss), f"{name}: loss {float(loss)}"
    bad = [n for n, p in params.items() if not torch.isfinite(p).all()]
    assert not bad, f"{name}: non-finite parameters after one step: {bad[:5]}"
    assert any(p.grad is not None and bool(p.grad.ne(0).any()) for p in params.values()), f"{name}: no gradient"
    moved = [n for n, p in params.items() if not torch.equal(before[n], p.detach())]
    assert moved, f"{name}: no parameter changed in one step"
