"""One table command, one grammar: ``qrepro-table plan|run|sweep|render <table> [--cells GLOB ...]``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qrepro.table import main, merge_cells

FAST = ["trainer.epochs=1", "trainer.batch_size=256", "model.width=4", "logger=none", "trainer.progress=false"]


def test_cells_are_merged_into_one_glob_list():
    assert merge_cells(["t", "--cells", "a", "--cells=b*,c", "x=1"]) == ["t", "x=1", "--cells", "a,b*,c"]
    assert merge_cells(["t"]) == ["t"]


def test_plan_takes_globs_and_orders_chains(tmp_path, capsys):
    code = main(["plan", "apot_table1", "--cells", "r18_w4*", "--runs", str(tmp_path), "dataset.root=/d"])
    assert code == 0
    cmds = [line for line in capsys.readouterr().out.splitlines() if "qrepro.train" in line]
    assert [c.split("+experiment=")[1].split()[0] for c in cmds] == [
        "apot_resnet18_imagenet_fp",
        "apot_resnet18_imagenet_w5a5",
        "apot_resnet18_imagenet_w4a4",
    ]


def test_a_glob_matching_nothing_is_one_line(tmp_path, capsys):
    assert main(["plan", "apot_table1", "--cells", "r99_*", "--runs", str(tmp_path)]) == 2
    assert "no cell matching 'r99_*'" in capsys.readouterr().err


def test_sweep_takes_the_same_globs(capsys):
    assert main(["sweep", "apot_table1", "--cells", "r18_*", "--cells", "r34_fp", "--launcher", "torchrun"]) == 0
    out = capsys.readouterr().out
    assert "apot_resnet18_imagenet_w2a2" in out and "apot_resnet34_imagenet_fp" in out
    assert "apot_resnet34_imagenet_w5a5" not in out and "apot_resnet50" not in out


def test_render_and_the_older_render_form(tmp_path):
    for argv in (["render", "symreg_digits_demo"], ["symreg_digits_demo"]):
        out = tmp_path / argv[0]
        assert main([*argv, "--runs", str(tmp_path / "none"), "--out", str(out), "--no-figures"]) == 0
        assert "symreg_digits_demo" in (out / "symreg_digits_demo.md").read_text()
    assert main(["render", "symreg_digits_demo", "--cells", "x"]) == 2


def test_run_trains_a_digits_chain_on_this_machine(tmp_path):
    table = tmp_path / "demo_chain.yaml"
    cell = "{model: small_cnn, dataset: digits, paper: null}"
    table.write_text(
        "name: demo_chain\npaper: Demo\ntitle: digits FP -> SAT W4A4\nmetric: top1\nreported: last\ntolerance: 1.0\n"
        "cells:\n"
        f"  - {{id: fp, experiment: demo_digits_fp, method: FP, w_bits: 32, a_bits: 32, {cell[1:]}\n"
        f"  - {{id: sat_w4a4, experiment: demo_digits_sat_w4a4, method: SAT, w_bits: 4, a_bits: 4, "
        f"init_from_cell: fp, fp_cell: fp, {cell[1:]}\n"
    )
    env = {**os.environ, "WANDB_MODE": "disabled"}
    args = ["run", str(table), "--cells", "sat_*", "--runs", "runs", *FAST]
    proc = subprocess.run(
        [sys.executable, "-m", "qrepro.table", *args], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    recs = sorted(tmp_path.glob("runs/*/*/record.json"))
    assert [r.parts[-3] for r in recs] == ["demo_digits_fp", "demo_digits_sat_w4a4"]
    q = json.loads(recs[1].read_text())
    assert q["complete"] and Path(q["init_from"]).parent.parent == recs[0].parent
    again = subprocess.run(
        [sys.executable, "-m", "qrepro.table", *args], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert again.returncode == 0 and again.stdout.count("complete, skipped") == 2


@pytest.mark.parametrize("old", [["-m", "qrepro.run_table"], ["-m", "qrepro.sweep"]])
def test_older_entries_still_answer(old, tmp_path):
    args = ["apot_table1", "--cells", "r18_fp"] + (
        ["--dry-run", "--runs", str(tmp_path)] if "run_table" in old[1] else []
    )
    proc = subprocess.run([sys.executable, *old, *args], capture_output=True, text=True)
    assert proc.returncode == 0 and "apot_resnet18_imagenet_fp" in proc.stdout
