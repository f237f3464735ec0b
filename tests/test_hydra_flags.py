"""Hydra's own flags on ``python -m qrepro.train``, on a plain experiment and on a cell that starts from another
cell (``init_from_experiment``): the printing flags print and resolve or train no chain, ``-m`` runs a sweep,
and a user's ``hydra.run.dir`` applies to the run asked for while its source keeps its own directory."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import qrepro.train as train_mod
from qrepro.config import NON_SEMANTIC_KEYS

PLAIN = "+experiment=demo_digits_fp"
CHAINED = "+experiment=demo_digits_apot_w4a4"  # starts from demo_digits_fp
FAST = ["trainer.epochs=1", "model.width=2", "trainer.progress=false", "logger=none", "trainer.device=cpu"]
BOTH = pytest.mark.parametrize("exp", [PLAIN, CHAINED])


@pytest.fixture(scope="module")
def out_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hydra_flags")


def _main(argv: list[str], out_root: Path, capsys, monkeypatch) -> tuple[int, str]:
    """``python -m qrepro.train <argv> out_root=<out_root>`` in this process: (exit code, stdout)."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setattr(sys, "argv", ["qrepro.train", *argv, f"out_root={out_root}"])
    code = 0
    try:
        train_mod.main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out = capsys.readouterr()
    assert "Traceback" not in out.err, out.err
    return code, out.out


def _printed(argv: list[str], tmp_path: Path, capsys, monkeypatch) -> str:
    code, out = _main(argv, tmp_path, capsys, monkeypatch)
    assert code == 0
    assert not re.search(r"^(chain|run|record): ", out, re.M)  # nothing resolved, nothing trained
    assert not any(tmp_path.iterdir())  # and nothing written
    return out


@BOTH
@pytest.mark.parametrize("flag", [["--cfg", "job"], ["-c", "job"], ["--cfg=job"]])
def test_cfg_job_prints_the_job_config(exp, flag, tmp_path, capsys, monkeypatch):
    cfg = yaml.safe_load(_printed([exp, *flag, "seed=3"], tmp_path, capsys, monkeypatch))
    assert cfg["name"] == exp.split("=")[1] and cfg["seed"] == 3 and "hydra" not in cfg
    assert cfg["init_from"] is None  # a printing flag resolves no chain


@BOTH
def test_cfg_hydra_prints_hydras_config(exp, tmp_path, capsys, monkeypatch):
    cfg = yaml.safe_load(_printed([exp, "--cfg", "hydra"], tmp_path, capsys, monkeypatch))
    assert list(cfg) == ["hydra"] and cfg["hydra"]["run"]["dir"].startswith("${out_root}/${name}/")


@BOTH
def test_cfg_all_resolved_names_run_dirs_from_the_one_key_table(exp, tmp_path, capsys, monkeypatch):
    cfg = yaml.safe_load(_printed([exp, "--cfg", "all", "--resolve", "seed=2"], tmp_path, capsys, monkeypatch))
    assert cfg["trainer"]["epochs"] >= 1
    assert cfg["hydra"]["job"]["config"]["override_dirname"]["exclude_keys"] == list(NON_SEMANTIC_KEYS)
    assert cfg["hydra"]["run"]["dir"] == f"{tmp_path}/{exp.split('=')[1]}/seed=2"


@BOTH
def test_resolve_prints_resolved_values(exp, tmp_path, capsys, monkeypatch):
    raw = _printed([exp, "--cfg", "job"], tmp_path, capsys, monkeypatch)
    resolved = _printed([exp, "--resolve", "--cfg", "job"], tmp_path, capsys, monkeypatch)
    assert "${" not in resolved and yaml.safe_load(resolved)["name"] == yaml.safe_load(raw)["name"]


@BOTH
def test_package_prints_one_section(exp, tmp_path, capsys, monkeypatch):
    out = _printed([exp, "--cfg", "job", "--package", "trainer"], tmp_path, capsys, monkeypatch)
    section = yaml.safe_load(out)
    assert "epochs" in section and "batch_size" in section and "name" not in section


def test_info_in_a_fresh_process(tmp_path):
    # Hydra logs --info through handlers it configures once per process: a real process, as a user runs it
    exp = CHAINED
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "qrepro.train", exp, f"out_root={tmp_path}", "--info", "searchpath"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0 and "Config search path" in p.stdout and "Traceback" not in p.stderr, p.stderr
    assert not any(tmp_path.iterdir())


@BOTH
def test_help_and_shell_completion(exp, tmp_path, capsys, monkeypatch):
    assert "== Config ==" in _printed([exp, "--help"], tmp_path, capsys, monkeypatch)
    assert "hydra_bash_completion" in _printed([exp, "-sc", "install=bash"], tmp_path, capsys, monkeypatch)


def _record(path: Path) -> dict:
    return json.loads(path.read_text())


def test_multirun_on_a_plain_experiment(out_root, capsys, monkeypatch):
    code, out = _main([PLAIN, *FAST, "-m", "seed=5,6"], out_root, capsys, monkeypatch)
    assert code == 0 and "multirun: 2 finished" in out
    for s in (5, 6):
        rec = _record(out_root / "demo_digits_fp" / f"model.width=2,seed={s},trainer.epochs=1" / "record.json")
        assert rec["complete"] and rec["seed"] == s


def test_multirun_on_a_chained_cell(out_root, capsys, monkeypatch):
    code, out = _main([CHAINED, *FAST, "-m", "seed=5"], out_root, capsys, monkeypatch)
    # the FP source (trained first, or the finished run of the plain sweep above) is where the job starts from
    assert code == 0 and "chain: demo_digits_apot_w4a4 starts from demo_digits_fp" in out
    assert "multirun: 1 finished" in out
    rec = _record(out_root / "demo_digits_apot_w4a4" / "model.width=2,seed=5,trainer.epochs=1" / "record.json")
    assert rec["init_from_sha256"] and rec["init_from"].endswith(
        "demo_digits_fp/model.width=2,seed=5,trainer.epochs=1/checkpoints/last.pt"
    )
    code, out = _main([CHAINED, *FAST, "-m", "seed=6", "init_from=null"], out_root, capsys, monkeypatch)
    assert code == 0 and "multirun: 1 finished" in out and "training it first" not in out
    # from scratch: a run of its own, beside the chained runs (init_from=null names it)
    rec = _record(
        out_root / "demo_digits_apot_w4a4" / "init_from=null,model.width=2,seed=6,trainer.epochs=1" / "record.json"
    )
    assert rec["init_from_sha256"] is None and "init_from=null" in rec["overrides"]


def test_run_dir_on_a_plain_experiment(out_root, capsys, monkeypatch):
    mine = out_root / "mine_plain"
    code, _ = _main([PLAIN, *FAST, "seed=7", f"hydra.run.dir={mine}"], out_root, capsys, monkeypatch)
    assert code == 0 and _record(mine / "record.json")["seed"] == 7


def test_run_dir_applies_to_the_cell_and_its_source_keeps_its_own(out_root, capsys, monkeypatch):
    mine = out_root / "mine_cell"
    code, out = _main([CHAINED, *FAST, "seed=8", f"hydra.run.dir={mine}"], out_root, capsys, monkeypatch)
    assert code == 0, out
    source = out_root / "demo_digits_fp" / "model.width=2,seed=8,trainer.epochs=1"
    src, cell = _record(source / "record.json"), _record(mine / "record.json")
    assert src["complete"] and src["experiment"] == "demo_digits_fp"
    assert cell["complete"] and cell["experiment"] == "demo_digits_apot_w4a4"
    assert cell["init_from"] == (source / "checkpoints" / "last.pt").as_posix()


def test_run_dir_with_batched_members_holds_each_member(out_root, capsys, monkeypatch):
    """``hydra.run.dir=X trainer.members=2``: each member runs in ``X/<its run_subdir>`` (not beside X, where
    they would land in X's parent), and the plan preview names the same directories."""
    mine = out_root / "mine_members"
    argv = [PLAIN, *FAST, "seed=9", "trainer.members=2", f"hydra.run.dir={mine}"]
    code, plan = _main([*argv, "+plan=true"], out_root, capsys, monkeypatch)
    assert code == 0 and not mine.exists()
    shown = re.findall(r"run dir \(seed=\d+\): (\S+)", plan)
    code, out = _main(argv, out_root, capsys, monkeypatch)
    assert code == 0, out
    dirs = [mine / "model.width=2,seed=9,trainer.epochs=1", mine / "model.width=2,seed=10,trainer.epochs=1"]
    assert shown == [d.as_posix() for d in dirs]
    assert [_record(d / "record.json")["seed"] for d in dirs] == [9, 10]
    assert sorted(p.name for p in mine.iterdir()) == sorted(d.name for d in dirs)
