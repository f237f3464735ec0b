"""Launch-time faults of ``python -m qrepro.train``: each is one line on stderr, exit code 2, and nothing is written
(no run directory, ``.hydra/``, ``.lock`` or ``train.log``) before the launch is validated; signals end a run like
Ctrl-C (checkpoint kept, one line)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qrepro.errors import QreproError
from qrepro.train import compose, train

ROOT = Path(__file__).resolve().parents[1]
FAST = ["logger=none", "trainer.progress=false", "trainer.batch_size=256", "model.width=4", "trainer.epochs=1"]


def _launch(args, tmp_path, **kw):
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "qrepro.train", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
        **kw,
    )


def _one_line(p, needle):
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    assert p.returncode == 2, p.stderr + p.stdout
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], p.stderr
    assert "Traceback" not in p.stderr + p.stdout
    return lines[0]


def _written(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


# ------------------------------------------------------------------------------- records never claim bits
def test_fp_training_at_other_bits_is_refused_in_process(tmp_path):
    cfg = compose(["+experiment=demo_digits_fp", *FAST, "precision=w2a2"])
    with pytest.raises(QreproError, match=r"quantizer=fp trains full precision and ignores precision=w2a2"):
        train(cfg, run_dir=tmp_path / "run", experiment="demo_digits_fp", overrides=["precision=w2a2"])
    assert not (tmp_path / "run").exists()
    # bits that the method uses are fine; PTQ of an FP experiment at w4a4 composes (its config is not refused)
    compose(["+experiment=demo_digits_fp", "precision=w4a4", "ptq.algorithm=minmax"], "ptq")


def test_fp_training_at_other_bits_is_one_line_and_writes_nothing(tmp_path):
    p = _launch(["+experiment=demo_digits_fp", *FAST, "precision=w2a2", "out_root=runs"], tmp_path)
    _one_line(p, "ignores precision=w2a2")
    assert _written(tmp_path / "runs") == []


# ------------------------------------------------------------------------------------------ experiment names
def test_experiment_with_or_without_plus_and_closest_name(tmp_path):
    assert compose(["experiment=demo_digits_fp"]).name == compose(["+experiment=demo_digits_fp"]).name
    with pytest.raises(QreproError, match=r"unknown experiment 'demo_digit_fp'; did you mean demo_digits_fp\b"):
        compose(["+experiment=demo_digit_fp"])
    # on the command line: no '+' runs the experiment (here its plan preview), a misspelt one names the closest
    p = _launch(["experiment=demo_digits_apot_w4a4", "+plan=true", "out_root=runs"], tmp_path)
    assert p.returncode == 0 and "plan: demo_digits_apot_w4a4" in p.stdout, p.stderr
    _one_line(
        _launch(["experiment=demo_digits_apot_w4", "out_root=runs"], tmp_path), "did you mean demo_digits_apot_w4a4"
    )
    assert _written(tmp_path / "runs") == []


# ---------------------------------------------------------------------------------------------------- signals
def test_sigterm_ends_a_run_like_ctrl_c(tmp_path):
    import signal
    import time

    args = ["+experiment=demo_digits_fp", *FAST[:-1], "trainer.epochs=200", "out_root=runs"]
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "qrepro.train", *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    last = tmp_path / "runs" / "demo_digits_fp"
    deadline = time.time() + 120
    while not list(last.rglob("last.pt")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err.strip().splitlines() == [
        "terminated (SIGTERM): the last finished epoch is checkpointed; resume with resume=true"
    ]
    (ck,) = list(last.rglob("last.pt"))
    lock = ck.parent.parent / ".lock"
    assert lock.read_text() == ""  # released: the next launch resumes it without taking over a dead owner's lock


# ------------------------------------------------------------------------------------------ dataset.workers
def test_dataset_workers_default_to_the_machine_and_stay_out_of_run_names(monkeypatch):
    from qrepro.config import run_subdir
    from qrepro.data import imagenet

    assert compose(["dataset=imagenet"]).dataset.workers is None
    monkeypatch.setattr(imagenet.os, "sched_getaffinity", lambda pid: {0, 1})
    assert imagenet.default_workers() == 2
    monkeypatch.setattr(imagenet.os, "sched_getaffinity", lambda pid: set(range(64)))
    assert imagenet.default_workers() == 8
    assert run_subdir(["dataset.workers=3", "seed=1"]) == "seed=1"


# ------------------------------------------------------------------------------ nothing written before checks
def test_bad_paths_are_one_line_and_write_nothing(tmp_path):
    bad = tmp_path / "bad=1.pt"
    bad.write_bytes(b"not a checkpoint")
    base = ["+experiment=demo_digits_fp", *FAST, "out_root=runs"]
    _one_line(_launch([*base, f"init_from={bad}"], tmp_path), "is corrupt")
    _one_line(_launch([*base, "dataset=cifar10", f"dataset.root={tmp_path / 'a=b'}"], tmp_path), "a=b does not exist")
    assert _written(tmp_path / "runs") == []
    # '=' in out_root is a path like any other
    p = _launch(["+experiment=demo_digits_fp", *FAST, "trainer.epochs=1", f"out_root={tmp_path / 'o=1'}"], tmp_path)
    assert p.returncode == 0, p.stderr
    (run,) = (tmp_path / "o=1" / "demo_digits_fp").iterdir()
    log = (run / "train.log").read_text()
    assert log.startswith("run: ") and "best top1" in log and "\r" not in log  # the console, without bar redraws
    overrides = (run / ".hydra" / "overrides.yaml").read_text()
    # a skipped relaunch (a non-semantic key added) leaves the finished run's files as they were
    p = _launch(
        ["+experiment=demo_digits_fp", *FAST, "trainer.epochs=1", f"out_root={tmp_path / 'o=1'}", "trainer.device=cpu"],
        tmp_path,
    )
    assert p.returncode == 0 and "skip: " in p.stdout, p.stderr
    assert (run / ".hydra" / "overrides.yaml").read_text() == overrides and (run / "train.log").read_text() == log


# ------------------------------------------------------------------------------------------- multirun.json
def _merge_many(sweep_dir: str, who: str) -> None:
    from qrepro.cli import _merge_multirun_json

    for i in range(15):
        _merge_multirun_json(Path(sweep_dir), [{"id": f"{who}{i}", "num": i, "status": "finished"}])


def test_concurrent_sweeps_add_to_multirun_json_without_losing_jobs(tmp_path):
    import multiprocessing as mp

    from qrepro.cli import _merge_multirun_json

    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_merge_many, args=(str(tmp_path), w)) for w in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    jobs = json.loads((tmp_path / "multirun.json").read_text())["jobs"]
    assert sorted(j["id"] for j in jobs) == sorted(f"{w}{i}" for w in "ab" for i in range(15))
    # a job refused because the other sweep owned its run directory keeps the owner's outcome
    refused = {"id": "a0", "num": 0, "status": "failed", "error": "runs/x is in use by another process (pid 1)"}
    _merge_multirun_json(tmp_path, [refused])
    data = json.loads((tmp_path / "multirun.json").read_text())
    assert next(j for j in data["jobs"] if j["id"] == "a0")["status"] == "finished" and data["failed"] == []


# ------------------------------------------------------------------------------------------ run identity
def test_channels_last_is_part_of_the_run_identity_and_name():
    from qrepro.config import NON_SEMANTIC_KEYS, plain, run_subdir
    from qrepro.engine.rundir import identity

    def ident(*o):
        return identity(plain(compose(["+experiment=demo_digits_fp", *o])), None, NON_SEMANTIC_KEYS)["config_sha256"]

    assert ident("trainer.channels_last=true") != ident()
    assert ident("trainer.channels_last=false") == ident()  # the default keeps the identity of earlier records
    assert run_subdir(["trainer.channels_last=true"]) == "trainer.channels_last=true"
