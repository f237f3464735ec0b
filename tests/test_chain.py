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


def test_multirun_of_a_chained_cell_trains_each_shared_source_once_before_its_jobs(tmp_path):
    trained = []

    def runner(cmd):
        trained.append(next(a for a in cmd if a.startswith("+experiment=")) + " " + " ".join(sorted(cmd[4:])))
        rec = tmp_path / f"src{len(trained)}" / "record.json"
        return type("R", (), {"returncode": 0, "record": str(rec)})()

    base = ["-m", "+experiment=demo_digits_sat_w4a4", f"out_root={tmp_path}", *FAST]
    argv = [*base, "precision=w2a2,w3a3,w4a4"]  # one source (precision is the cell's own) for three jobs
    assert prepare(argv, runner=runner, out=lambda s: None) == argv
    assert len(trained) == 1 and trained[0].startswith("+experiment=demo_digits_fp")
    trained.clear()
    prepare([*base, "precision=w2a2,w4a4", "seed=0,1"], runner=runner, out=lambda s: None)
    assert len(trained) == 2 and "seed=0" in trained[0] and "seed=1" in trained[1]  # one source per seed
    argv = ["-m", "+experiment=demo_digits_sat_w4a4", "seed=0,1", "init_from=null"]
    assert prepare(argv, runner=lambda cmd: pytest.fail("no source run expected")) == argv


def test_bit_width_sweep_over_a_chained_cell_runs_end_to_end(tmp_path):
    from qrepro.engine.rundir import file_sha256

    args = ["-m", "+experiment=demo_digits_apot_w4a4", "precision=w2a2,w4a4", *FAST, f"out_root={tmp_path / 'runs'}"]
    out = _train(args, tmp_path)
    name = "model.width=4,trainer.batch_size=256,trainer.epochs=1"
    fp_dir = tmp_path / "runs" / "demo_digits_fp" / name
    assert out.count("training it first") == 1 and out.count("record: ") == 3
    assert "multirun: 2 finished, 0 skipped, 0 failed" in out
    sha = file_sha256(fp_dir / "checkpoints" / "last.pt")
    w2a2 = f"model.width=4,precision=w2a2,{name.split(',', 1)[1]}"
    for bits, sub in (("w2a2", w2a2), ("w4a4", name)):  # precision=w4a4 is the cell's own: not in the name
        q = tmp_path / "runs" / "demo_digits_apot_w4a4" / sub
        rec = json.loads((q / "record.json").read_text())
        assert rec["complete"] and rec["precision"] == bits and rec["init_from_sha256"] == sha
    again = _train(args, tmp_path)  # relaunched: the source is reused, the jobs are skipped
    assert "training it first" not in again and "multirun: 0 finished, 2 skipped, 0 failed" in again


def test_plan_flag_parsing():
    assert pop_plan(["+plan=true", "seed=1"]) == (["seed=1"], True)
    assert pop_plan(["seed=1"]) == (["seed=1"], False)
    with pytest.raises(QreproError):
        pop_plan(["+plan=maybe"])


def test_table_chains_agree_with_the_experiments_sources():
    """Every table cell whose experiment names a source starts from a cell of that source's chain: derived from the
    experiment (tables leave init_from_cell out) or stated by an ablation table for its own chain."""
    from qrepro.tables.schema import experiment_source, load_table

    derived = explicit = 0
    for path in sorted((Path(CONFIG_DIR) / "table").glob("*.yaml")):
        raw = {c["id"]: c for c in yaml.safe_load(path.read_text())["cells"]}
        table = load_table(path)
        for c in table.cells:
            src = experiment_source(c.experiment)
            if c.ptq_from_cell or src is None:
                continue
            assert c.init_from_cell, f"{path.name}:{c.id}: {c.experiment} starts from {src}, the table from nothing"
            ancestors, e = [], c.experiment
            while experiment_source(e):  # an ablation may skip steps of the chain (APoT Table 3: 5 -> 3 bits)
                e = experiment_source(e)
                ancestors.append(e)
            assert table.cell(c.init_from_cell).experiment in ancestors, f"{path.name}:{c.id}"
            if "init_from_cell" in raw[c.id]:
                explicit += 1
            else:
                derived += 1
    assert derived > 90 and explicit < derived / 2  # most cells derive their source; own chains are the exception


def test_tables_derive_the_source_cell_from_the_experiment(tmp_path):
    from qrepro.tables.schema import derive_sources, parse_table

    cell = {"model": "small_cnn", "dataset": "digits", "paper": None, "w_bits": 4, "a_bits": 4, "method": "SAT"}
    cells = [
        {**cell, "id": "fp", "experiment": "demo_digits_fp", "w_bits": 32, "a_bits": 32},
        {**cell, "id": "q", "experiment": "demo_digits_sat_w4a4"},
        {**cell, "id": "q_seed1", "experiment": "demo_digits_sat_w4a4", "overrides": ["seed=1"]},
        {**cell, "id": "fp_seed1", "experiment": "demo_digits_fp", "overrides": ["seed=1"]},
        {**cell, "id": "q_scratch", "experiment": "demo_digits_sat_w4a4", "init_from_cell": None},
    ]
    got = {c["id"]: c.get("init_from_cell") for c in derive_sources(cells)}
    assert got == {"fp": None, "q": "fp", "q_seed1": "fp_seed1", "fp_seed1": None, "q_scratch": None}
    head = {"name": "t", "paper": "Demo", "title": "t", "metric": "top1", "reported": "last", "tolerance": 1.0}
    assert parse_table({**head, "cells": cells}).cell("q").init_from_cell == "fp"


def test_torchrun_ranks_do_not_train_the_source_each(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    argv = ["+experiment=demo_digits_sat_w4a4", f"out_root={tmp_path}", *FAST]
    with pytest.raises(QreproError, match="under torchrun train it first"):
        prepare(argv, runner=lambda cmd: pytest.fail("no rank may train the source"))
