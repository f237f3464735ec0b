"""Experiments are recipes: a recipe change is made in one place, cells are thin deltas over a recipe."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import yaml

from qrepro.cli import CONFIG_DIR

EXPERIMENTS = Path(CONFIG_DIR) / "experiment"
RECIPES = Path(CONFIG_DIR) / "recipe"
# lines that make a cell out of a recipe: its precision, model, name and source
CELL_LINE = re.compile(r"\s*- override /(precision|model):|(name|init_from_experiment|init_from_required):")
INCLUDE = re.compile(r"\s*- /(recipe|experiment)/\S+\s*$")


def body(text: str) -> str:
    """A config file without its comments, blank lines and cell lines."""
    out = []
    for line in text.splitlines():
        line = "" if line.lstrip().startswith("#") else line.split(" #")[0].rstrip()
        if line.strip() and not CELL_LINE.match(line):
            out.append(line)
    return "\n".join(out)


def _duplicates(paths: list[Path], *, thin_ok: bool) -> list[list[str]]:
    groups: dict[str, list[str]] = defaultdict(list)
    for p in paths:
        b = body(p.read_text())
        lines = b.splitlines()
        if thin_ok and all(line == "defaults:" or INCLUDE.match(line) for line in lines):
            continue  # a thin cell: one recipe (or another cell) plus its precision/model/name/source lines
        groups[b].append(p.stem)
    return [sorted(v) for v in groups.values() if len(v) > 1]


def test_no_two_experiments_differ_only_in_precision_name_or_model():
    dups = _duplicates(sorted(EXPERIMENTS.glob("*.yaml")), thin_ok=True)
    assert not dups, f"experiments that should share a recipe (configs/recipe/): {dups}"


def test_no_two_recipes_are_the_same():
    dups = _duplicates(sorted(RECIPES.glob("*.yaml")), thin_ok=False)
    assert not dups, dups


def test_the_normalisation_catches_a_copied_cell(tmp_path):
    src = (EXPERIMENTS / "demo_digits_fp.yaml").read_text()
    (tmp_path / "a.yaml").write_text(src)
    copy = src.replace("name: demo_digits_fp", "name: demo_digits_fp2").replace("w32a32", "w4a4")
    (tmp_path / "b.yaml").write_text(copy + "# another comment\n")
    assert _duplicates([tmp_path / "a.yaml", tmp_path / "b.yaml"], thin_ok=True) == [["a", "b"]]


def test_every_recipe_is_used_and_every_include_exists():
    used = set()
    for p in [*EXPERIMENTS.glob("*.yaml"), *RECIPES.glob("*.yaml")]:  # a recipe may be a delta over another
        for entry in (yaml.safe_load(p.read_text()) or {}).get("defaults") or []:
            if isinstance(entry, str) and entry.startswith("/"):
                group, name = entry.strip("/").split("@")[0].split("/", 1)
                assert (Path(CONFIG_DIR) / group / f"{name}.yaml").is_file(), f"{p.name}: {entry}"
                used.add(name)
    assert {p.stem for p in RECIPES.glob("*.yaml")} <= used


def test_tr_cifar_experiments_default_to_the_authors_talr_and_keep_eq11_as_a_switch():
    from qrepro.builders import compose

    tr = {p.stem for p in EXPERIMENTS.glob("tr_resnet20_cifar*.yaml")}
    talr = [e for e in sorted(tr) if compose([f"+experiment={e}"]).optimizer.get("tr")]
    assert len(talr) >= 13  # SGDT/AdamT at 1 and 2 bits on CIFAR-10/100, the other TR optimizers of Table S5
    for e in talr:
        t = compose([f"+experiment={e}"]).optimizer.tr
        assert (t.rule, t.scope, t.running_eps) == ("momentum", "layer", 1e-8), e
    t = compose(["+experiment=tr_resnet20_cifar100_w2a2_sgdt", "talr=paper"]).optimizer.tr
    assert (t.rule, t.scope, t.running_eps) == ("additive", "global", 0.0)
    t = compose(["+experiment=tr_resnet18_imagenet_w2a2_sgdt", "init_from=null"]).optimizer.tr
    assert (t.rule, t.scope) == ("additive", "global")  # ImageNet: no authors' code, the paper's Eq. 11


MAX_SHARED = 5  # lines two experiment files may have in common (a source line, a one-line delta, ...)


def shared_lines(a: str, b: str) -> set[str]:
    """The non-trivial lines two config files have in common (comments, blank lines and ``defaults:`` aside)."""

    def lines(text: str) -> set[str]:
        out = set()
        for line in text.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#") and line != "defaults:":
                out.add(line)
        return out

    return lines(a) & lines(b)


def test_no_two_experiments_share_more_than_a_few_lines():
    texts = {p.stem: p.read_text() for p in sorted(EXPERIMENTS.glob("*.yaml"))}
    names = sorted(texts)
    worst = [
        (len(common), a, b)
        for i, a in enumerate(names)
        for b in names[i + 1 :]
        if len(common := shared_lines(texts[a], texts[b])) > MAX_SHARED
    ]
    assert not worst, f"experiment pairs sharing more than {MAX_SHARED} lines (move them into a recipe): {worst[:10]}"


def test_shared_lines_sees_a_copied_recipe():
    body = "defaults:\n  - override /dataset: digits\nname: a\ntrainer: {epochs: 3}  # x\noptimizer:\n  lr: 0.1\n"
    assert shared_lines(body, body.replace("name: a", "name: b")) == {
        "- override /dataset: digits",
        "trainer: {epochs: 3}",
        "optimizer:",
        "lr: 0.1",
    }
