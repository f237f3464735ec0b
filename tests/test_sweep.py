"""python -m qrepro.sweep: a table's cells as job arrays / torchrun commands, in init_from_cell order."""

import shlex

import pytest
from omegaconf import OmegaConf

from qrepro.errors import QreproError
from qrepro.sweep import commands, run_subdir, waves
from qrepro.train import compose


def _table(tmp_path, cells):
    p = tmp_path / "t.yaml"
    OmegaConf.save({"name": "t", "cells": cells}, p)
    return str(p)


def test_waves_follow_init_from_cell_and_reject_cycles():
    cells = [{"id": "q", "init_from_cell": "fp"}, {"id": "fp"}, {"id": "q2", "init_from_cell": "q"}]
    assert [[c["id"] for c in w] for w in waves(cells)] == [["fp"], ["q"], ["q2"]]
    with pytest.raises(QreproError, match="cycle"):
        waves([{"id": "a", "init_from_cell": "b"}, {"id": "b", "init_from_cell": "a"}])


def test_run_subdir_is_hydras_override_dirname():
    from hydra._internal.config_loader_impl import get_overrides_dirname
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from qrepro.config import NON_SEMANTIC_KEYS, run_subdir_name

    ov = ["+experiment=x", "trainer.epochs=3", "resume=true", "seed=1", "dataset.root=/d", "model.width=8"]
    ref = get_overrides_dirname(OverridesParser.create().parse_overrides(ov), list(NON_SEMANTIC_KEYS), ",", "=")
    assert run_subdir(ov) == run_subdir_name(ref) == "model.width=8,seed=1,trainer.epochs=3"
    assert run_subdir(["+experiment=x", "resume=true"]) == "default"


def test_commands_form_job_arrays_per_wave_and_compose(tmp_path):
    cells = [
        {"id": "fp", "experiment": "demo_digits_fp", "overrides": ["trainer.epochs=2"]},
        {"id": "a", "experiment": "demo_digits_fp", "overrides": [], "init_from_cell": "fp"},
    ]
    lines = commands(_table(tmp_path, cells), "submitit_slurm", extra=["dataset.root=/d"])
    cmds = [shlex.split(x) for x in lines if not x.startswith("#")]
    assert len(cmds) == 2 and all(
        c[:6] == ["python", "-m", "qrepro.train", "-m", "hydra/launcher=submitit_slurm", "+experiment=demo_digits_fp"]
        for c in cmds
    )
    assert 'init_from="${out_root}/demo_digits_fp/trainer.epochs=2/checkpoints/last.pt"' in cmds[1]
    cfg = compose(cmds[1][5:])
    assert cfg.init_from == "runs/demo_digits_fp/trainer.epochs=2/checkpoints/last.pt" and cfg.resume
    tr = [shlex.split(x) for x in commands(_table(tmp_path, cells), "torchrun", gpus=4) if not x.startswith("#")]
    assert tr[0][:5] == ["torchrun", "--standalone", "--nproc_per_node=4", "-m", "qrepro.train"]
    compose(tr[0][5:])


def test_every_table_in_the_repo_yields_commands():
    from pathlib import Path

    from qrepro.cli import CONFIG_DIR
    from qrepro.tables import load_table

    for t in sorted(Path(CONFIG_DIR, "table").glob("*.yaml")):
        lines = commands(t.stem)
        if not any(c.runnable for c in load_table(t).cells):  # paper-only rows: no job
            assert lines == [f"# {t.stem}: no runnable cell (paper-only rows; qrepro-table coverage says why)"]
            continue
        assert any(x.startswith("python -m qrepro.train -m hydra/launcher=submitit_slurm") for x in lines), t.stem


def test_cells_selection_keeps_extras_and_treats_unselected_sources_as_done(tmp_path, capsys):
    from qrepro.sweep import main

    cells = [
        {"id": "fp", "experiment": "demo_digits_fp", "overrides": []},
        {"id": "q4", "experiment": "demo_digits_fp", "overrides": ["seed=4"], "init_from_cell": "fp"},
        {"id": "q2", "experiment": "demo_digits_fp", "overrides": ["seed=2"], "init_from_cell": "q4"},
    ]
    t = _table(tmp_path, cells)
    main([t, "--launcher", "torchrun", "--gpus", "2", "--cells", "q*", "dataset.root=/d"])
    lines = [x for x in capsys.readouterr().out.splitlines() if not x.startswith("#")]
    assert len(lines) == 2 and all(x.endswith("resume=true dataset.root=/d") for x in lines)
    assert "seed=4" in lines[0] and "seed=2" in lines[1]  # q4 (its source fp is outside: done) before q2
    assert "/demo_digits_fp/default/checkpoints/last.pt" in lines[0]  # still initialised from fp's run
    with pytest.raises(SystemExit):
        main([t, "--cells", "nope*"])
    assert "matches no cell" in capsys.readouterr().err


def test_ptq_cells_run_qrepro_ptq_after_their_fp_cell_and_compose():
    """PTQ cells (``ptq:`` field) are single-process ``python -m qrepro.ptq`` runs in the wave after
    ``ptq.from_cell``; every command of every table composes with its own entry point's config."""
    from pathlib import Path

    from qrepro.cli import CONFIG_DIR
    from qrepro.sweep import load_cells

    ptq_tables = [t.stem for t in sorted(Path(CONFIG_DIR, "table").glob("*.yaml"))]
    ptq_tables = [t for t in ptq_tables if any(c.get("ptq") for c in load_cells(t))]
    assert "symreg_digits_demo" in ptq_tables
    lines = commands("symreg_digits_demo", "torchrun", gpus=2)
    waves_, cmds = [], []
    for x in lines:
        if x.startswith("# wave"):
            waves_.append([])
        elif not x.startswith("#"):
            waves_[-1].append(shlex.split(x))
            cmds.append(shlex.split(x))
    ptq = [c for c in cmds if c[:3] == ["python", "-m", "qrepro.ptq"]]
    assert ptq and all("resume=true" not in c for c in ptq)
    assert not any(c[:3] == ["python", "-m", "qrepro.ptq"] for c in waves_[0])  # never before their FP cell
    cfg = compose(ptq[0][3:], config_name="ptq")
    assert cfg.ptq.algorithm and cfg.init_from.endswith("/checkpoints/last.pt")
    slurm = [shlex.split(x) for x in commands("symreg_digits_demo") if x.startswith("python -m qrepro.ptq")]
    assert slurm and all("hydra.launcher.gpus_per_node=1" in c for c in slurm)
