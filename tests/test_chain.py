"""A cell command reproduces the cell: the source cell (FP model, previous bit-width) is resolved, not skipped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from qrepro.chain import carried, pop_plan, prepare, resolve
from qrepro.cli import CONFIG_DIR
from qrepro.errors import QreproError

ROOT = Path(__file__).resolve().parents[1]
FAST = ["trainer.epochs=1", "trainer.batch_size=256", "model.width=4", "logger=none", "trainer.progress=false"]


def _train(args: list[str], cwd: Path) -> str:
    env = {**os.environ, "WANDB_MODE": "disabled"}
    proc = subprocess.run(
        [sys.executable, "-m", "qrepro.train", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_plan_preview_of_a_paper_cell_prints_the_fp_then_4bit_chain(tmp_path):
    root = tmp_path / "imagenet"
    for split in ("train", "val"):
        (root / split / "a").mkdir(parents=True)
    out = _train(["+experiment=sat_mbv2_4bit", f"dataset.root={root}", "+plan=true"], tmp_path)
    lines = out.splitlines()
    assert lines[0] == "plan: sat_mbv2_4bit: 2 run(s) in order"
    assert "1. sat_mbv2_fp  [to train, from scratch]" in lines[1]
    assert "run dir: runs/sat_mbv2_fp/default" in lines[2]
    assert f"+experiment=sat_mbv2_fp dataset.root={root} init_from=null" in lines[3]
    assert "2. sat_mbv2_4bit  [to train, from sat_mbv2_fp]" in lines[4]
    assert "run dir: runs/sat_mbv2_4bit/default" in lines[5]
    assert "init_from=runs/sat_mbv2_fp/default/checkpoints/last.pt" in lines[6].replace('"', "")
    assert not (tmp_path / "runs").exists()  # a preview trains nothing


def test_digits_chain_runs_the_fp_cell_first_then_reuses_it(tmp_path):
    args = ["+experiment=demo_digits_sat_w4a4", *FAST, f"out_root={tmp_path / 'runs'}"]
    first = _train(args, tmp_path)
    fp_dir = tmp_path / "runs" / "demo_digits_fp" / "model.width=4,trainer.batch_size=256,trainer.epochs=1"
    q_dir = tmp_path / "runs" / "demo_digits_sat_w4a4" / fp_dir.name
    assert "starts from demo_digits_fp (no finished run in" in first and "training it first" in first
    fp_rec = json.loads((fp_dir / "record.json").read_text())
    q_rec = json.loads((q_dir / "record.json").read_text())
    assert fp_rec["complete"] and q_rec["complete"]
    assert fp_rec["init_from"] is None
    from qrepro.engine.rundir import file_sha256

    assert q_rec["init_from_sha256"] == file_sha256(fp_dir / "checkpoints" / "last.pt")
    assert Path(q_rec["init_from"]).resolve() == (fp_dir / "checkpoints" / "last.pt").resolve()
    stamp = (fp_dir / "record.json").stat().st_mtime_ns

    second = _train([*args, "force=true"], tmp_path)  # the quantized cell again; its source is reused
    assert "training it first" not in second
    assert f"using its finished run {fp_dir.as_posix()}" in second
    assert (fp_dir / "record.json").stat().st_mtime_ns == stamp
    plan = _train([*args, "+plan=true"], tmp_path)
    assert "1. demo_digits_fp  [finished (reused), from scratch]" in plan


def test_explicit_init_from_null_trains_the_cell_alone():
    assert [s.experiment for s in resolve("sat_mbv2_4bit", ["init_from=null"])] == ["sat_mbv2_4bit"]
    argv = ["+experiment=demo_digits_sat_w4a4", "init_from=null", *FAST]
    assert prepare(argv, runner=lambda cmd: pytest.fail("no source run expected")) == argv


def test_progressive_chain_and_carried_overrides():
    chain = resolve("apot_resnet18_imagenet_w2a2", ["seed=3", "precision=w2a2", "quantizer.wn=false"])
    assert [s.experiment for s in chain] == [
        f"apot_resnet18_imagenet_{b}" for b in ("fp", "w5a5", "w4a4", "w3a3", "w2a2")
    ]
    assert all(s.overrides == ["seed=3"] for s in chain[:-1])  # seed carries, cell-defining overrides do not
    assert carried(["+experiment=x", "precision=w4a4", "quantizer.levels=pot", "seed=1", "dataset.root=/d"]) == [
        "seed=1",
        "dataset.root=/d",
    ]


def test_external_source_must_be_given():
    with pytest.raises(QreproError, match="pretrained FP ResNet-18 state_dict.*init_from=<path>"):
        resolve("tr_resnet18_imagenet_w2a2_sgdt", [])
    assert len(resolve("tr_resnet18_imagenet_w2a2_sgdt", ["init_from=null"])) == 1


def test_multirun_of_a_chained_cell_is_refused_without_init_from():
    with pytest.raises(QreproError, match="multirun needs init_from"):
        prepare(["-m", "+experiment=demo_digits_sat_w4a4", "seed=0,1"])
    argv = ["-m", "+experiment=demo_digits_sat_w4a4", "seed=0,1", "init_from=null"]
    assert prepare(argv) == argv


def test_plan_flag_parsing():
    assert pop_plan(["+plan=true", "seed=1"]) == (["seed=1"], True)
    assert pop_plan(["seed=1"]) == (["seed=1"], False)
    with pytest.raises(QreproError):
        pop_plan(["+plan=maybe"])


def test_table_chains_agree_with_the_experiments_sources():
    """A table cell without its own overrides starts from a cell of its experiment's init_from_experiment chain; every
    chained cell's experiment names a source (so the cell command alone never trains it from scratch)."""
    exp_dir = Path(CONFIG_DIR) / "experiment"
    source = {p.stem: (yaml.safe_load(p.read_text()) or {}).get("init_from_experiment") for p in exp_dir.glob("*.yaml")}
    checked = 0
    for path in sorted((Path(CONFIG_DIR) / "table").glob("*.yaml")):
        cells = {c["id"]: c for c in yaml.safe_load(path.read_text())["cells"]}
        for c in cells.values():
            parent = c.get("init_from_cell")
            if not parent:
                continue
            assert source.get(c["experiment"]), f"{path.name}:{c['id']}: {c['experiment']} names no source"
            if not c.get("overrides") and not cells[parent].get("overrides"):
                ancestors, e = [], c["experiment"]
                while source.get(e):  # an ablation table may skip steps of the chain (APoT Table 3: 5 -> 3 bits)
                    e = source[e]
                    ancestors.append(e)
                assert cells[parent]["experiment"] in ancestors, f"{path.name}:{c['id']}"
                checked += 1
    assert checked > 50


def test_torchrun_ranks_do_not_train_the_source_each(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    argv = ["+experiment=demo_digits_sat_w4a4", f"out_root={tmp_path}", *FAST]
    with pytest.raises(QreproError, match="under torchrun train it first"):
        prepare(argv, runner=lambda cmd: pytest.fail("no rank may train the source"))
