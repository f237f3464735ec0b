"""A run is named by what it computes, not by how the command line spelt it: values are normalised before they
name the run directory, the same for single runs and multiruns."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

from qrepro.config import run_subdir

FAST = ["trainer.epochs=1", "trainer.batch_size=256", "model.width=2", "logger=none", "trainer.progress=false"]


def test_values_are_named_in_one_spelling():
    assert run_subdir(["optimizer.lr=1e-2"]) == run_subdir(["optimizer.lr=0.01"]) == "optimizer.lr=0.01"
    assert run_subdir(["trainer.deterministic=True"]) == run_subdir(["trainer.deterministic=true"])
    assert run_subdir(["trainer.deterministic=True"]) == "trainer.deterministic=true"
    assert run_subdir(["model=small_cnn"]) == run_subdir(["model='small_cnn'"]) == "model=small_cnn"
    assert run_subdir(["a=[1e-2, true]"]) == run_subdir(["a=[0.01,True]"])
    # different meanings stay apart: a string that reads as another type, another number
    assert run_subdir(["a='true'"]) != run_subdir(["a=true"])
    assert run_subdir(["a=1"]) != run_subdir(["a=1.0"]) and run_subdir(["a=0.01"]) != run_subdir(["a=0.02"])


def _train(args, cwd):
    env = {**os.environ, "WANDB_MODE": "disabled"}
    proc = subprocess.run(
        [sys.executable, "-m", "qrepro.train", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_a_multirun_job_finds_the_single_run_of_the_same_meaning(tmp_path):
    base = ["+experiment=demo_digits_fp", *FAST, f"out_root={tmp_path}"]
    single = _train([*base, "optimizer.lr=1e-2", "trainer.deterministic=true"], tmp_path)
    record = single.strip().splitlines()[-1].split("record: ", 1)[1]
    assert "optimizer.lr=0.01" in record and "trainer.deterministic=true" in record
    sweep = _train(["-m", *base, "optimizer.lr=0.01", "trainer.deterministic=True"], tmp_path)
    assert f"skip: {os.path.dirname(record)} already has a complete record" in sweep
    assert "multirun: 0 finished, 1 skipped, 0 failed" in sweep
    assert json.loads(open(record).read())["complete"]
    assert len(list(tmp_path.glob("demo_digits_fp/*/record.json"))) == 1


def test_an_explicit_default_is_the_run_without_it():
    from qrepro.config import without_defaults

    cell = ["+experiment=demo_digits_apot_w4a4"]
    assert run_subdir([*cell, "precision=w4a4", "quantizer=apot"]) == run_subdir(cell) == "default"
    assert run_subdir([*cell, "precision=w4a4", "seed=3"]) == run_subdir([*cell, "seed=3"]) == "seed=3"
    assert run_subdir([*cell, "precision=w2a2"]) == "precision=w2a2"  # not the cell's value: kept
    # kept when it changes something given the other overrides (w4a4's bits differ from w2a2's)
    over = [*cell, "precision=w2a2", "precision.w_bits=4"]
    assert without_defaults(over) == over
    assert without_defaults(["seed=0"]) == ["seed=0"]  # no experiment: nothing to compare with


def test_an_explicit_default_is_recorded_as_the_cell_and_counts_for_it():
    """The record's overrides (which table cells are matched on) drop an explicit default as the name does."""
    from qrepro.config import semantic_overrides
    from qrepro.tables.records import Record, match_cell

    cell = ["+experiment=demo_digits_apot_w4a4"]
    assert semantic_overrides([*cell, "precision=w4a4", "seed=3"]) == ["seed=3"]
    assert semantic_overrides([*cell, "precision=w2a2"]) == ["precision=w2a2"]
    stored = semantic_overrides([*cell, "precision=w4a4", "quantizer=apot"])
    rec = Record("r.json", {"experiment": "demo_digits_apot_w4a4", "overrides": stored, "complete": True}, ".")
    assert stored == [] and match_cell(SimpleNamespace(experiment="demo_digits_apot_w4a4", overrides=()), [rec]) == [
        rec
    ]


def test_hydra_own_overrides_name_nothing_and_are_not_recorded():
    """A launcher choice or a run directory changes where a run goes, not what it computes: neither the run's
    directory name nor the record's overrides (which table cells match on) hold it."""
    from qrepro.config import semantic_overrides

    cell = ["+experiment=demo_digits_fp", "seed=2"]
    for own in ("hydra/launcher=submitit_local", "hydra.run.dir=/tmp/x", "hydra.job.chdir=false"):
        assert run_subdir([*cell, own]) == "seed=2"
        assert semantic_overrides([*cell, own]) == ["seed=2"]


# ------------------------------------------------------------------------------------ a chained cell from scratch
def test_init_from_null_on_a_chained_cell_names_its_own_run():
    from qrepro.config import semantic_overrides
    from qrepro.tables.records import canonical_overrides

    cell = ["+experiment=demo_digits_apot_w4a4", "seed=1"]  # starts from demo_digits_fp (init_from_experiment)
    assert run_subdir(cell) == run_subdir([*cell, "init_from=/x/last.pt"]) == "seed=1"  # the chained run
    assert run_subdir([*cell, "init_from=null"]) == run_subdir([*cell, "++init_from=null"]) == "init_from=null,seed=1"
    assert run_subdir([*cell, "init_from=null", "init_from=/x/last.pt"]) == "seed=1"  # the last value counts
    # a cell without a source starts from scratch anyway: init_from=null changes nothing
    assert run_subdir(["+experiment=demo_digits_fp", "init_from=null"]) == "default"
    # recorded with it, and matched apart from the chained run's record by the tables
    over = semantic_overrides([*cell, "init_from=null"], scratch=True)
    assert over == ["init_from=null", "seed=1"]
    assert canonical_overrides(over) != canonical_overrides(["seed=1"])
    assert canonical_overrides(["init_from=/x/last.pt", "seed=1"]) == canonical_overrides(["seed=1"])


def test_init_from_null_trains_beside_the_finished_chained_run(tmp_path):
    from qrepro.config import compose
    from qrepro.engine.rundir import file_sha256
    from qrepro.launch import train

    out = tmp_path / "runs"
    fp = train(compose(["+experiment=demo_digits_fp", *FAST]), run_dir=tmp_path / "fp", overrides=[])
    ckpt = tmp_path / "fp" / "checkpoints" / "last.pt"
    cell = ["+experiment=demo_digits_apot_w4a4", *FAST, f"out_root={out}"]
    chained_dir = out / "demo_digits_apot_w4a4" / run_subdir(cell)
    chained = train(compose([*cell, f"init_from={ckpt}"]), run_dir=chained_dir, overrides=cell)
    assert fp.record["complete"] and chained.record["init_from_sha256"] == file_sha256(ckpt)
    before = (chained_dir / "record.json").read_text()

    stdout = _train([*cell, "init_from=null"], tmp_path)  # the command line: Hydra names the directory
    record = stdout.strip().splitlines()[-1].split("record: ", 1)[1]
    assert os.path.dirname(record) == str(out / "demo_digits_apot_w4a4" / f"init_from=null,{chained_dir.name}")
    rec = json.loads(open(record).read())
    assert rec["complete"] and rec["init_from"] is None and rec["identity"]["init_from_sha256"] is None
    assert rec["identity"]["config_sha256"] == chained.record["identity"]["config_sha256"]  # same recipe...
    assert "init_from=null" in rec["overrides"] and "init_from=null" not in chained.record["overrides"]
    assert (chained_dir / "record.json").read_text() == before  # ...the chained run is left as it was
