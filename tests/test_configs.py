"""Every experiment config composes; keys other tools rely on exist."""

from pathlib import Path

import pytest

from qrepro.cli import CONFIG_DIR
from qrepro.train import compose

EXPERIMENTS = sorted(
    str(p.relative_to(Path(CONFIG_DIR) / "experiment").with_suffix(""))
    for p in (Path(CONFIG_DIR) / "experiment").rglob("*.yaml")
)


def test_experiment_list_non_empty():
    assert EXPERIMENTS, "no experiment configs found"


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes(name):
    cfg = compose([f"+experiment={name}"])
    for key in (
        "dataset.name",
        "dataset.root",
        "model.name",
        "quantizer.name",
        "precision.w_bits",
        "precision.a_bits",
        "optimizer.name",
        "optimizer.lr",
        "scheduler.name",
        "trainer.epochs",
        "trainer.batch_size",
        "seed",
        "init_from",
        "resume",
        "name",
    ):
        node = cfg
        for part in key.split("."):
            assert part in node, f"{name}: missing {key}"
            node = node[part]
    assert cfg.name, name
    header = (Path(CONFIG_DIR) / "experiment" / f"{name}.yaml").read_text().splitlines()
    assert header[0].strip() == "# @package _global_", f"{name}: first line must be the package header"
    assert header[1].startswith("# ") and len(header[1]) > 10, f"{name}: second line must be a one-line header"


@pytest.mark.parametrize("group", ["dataset", "model", "quantizer", "precision", "optimizer", "scheduler", "logger"])
def test_every_group_option_composes(group):
    options = sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))
    assert options
    for opt in options:
        cfg = compose([f"{group}={opt}"])
        assert cfg[group].name
