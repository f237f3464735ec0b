"""Fault injection: runs killed, relaunched, run twice at once, rerun with force, fed bad values, full disks,
non-finite weights, failing multirun jobs. Each case asserts the one-line error, the exit code and that records and
checkpoints still agree (docs/runs.md describes the behaviour). Digits, small_cnn, 1-3 epochs; subprocesses only
where a real process boundary matters (kill -9, concurrent launches, the command line, multirun)."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import qrepro.engine.callbacks as callbacks_mod
import qrepro.engine.trainer as trainer_mod
from qrepro.engine.rundir import RunLock, file_sha256
from qrepro.errors import QreproError
from qrepro.train import compose, train

FAST = ["logger=none", "trainer.progress=false", "trainer.batch_size=256", "model.width=4", "trainer.log_every=2"]
ROOT = Path(__file__).resolve().parents[1]


def _cfg(extra):
    return compose(["+experiment=demo_digits_fp", *FAST, *extra])


def _run(tmp_path, extra, sub="run"):
    return train(_cfg(extra), run_dir=tmp_path / sub, experiment="demo_digits_fp", overrides=list(extra))


def _rec(tmp_path, sub="run"):
    return json.loads((tmp_path / sub / "record.json").read_text())


def _ck(tmp_path, name="last.pt", sub="run"):
    return torch.load(tmp_path / sub / "checkpoints" / name, weights_only=True)


def _interrupt_at_eval(monkeypatch, n):
    """KeyboardInterrupt in the n-th evaluation, i.e. during epoch n, after epochs 1..n-1 were checkpointed."""
    real, calls = trainer_mod.evaluate, {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(trainer_mod, "evaluate", flaky)
    return real


def _killed_run(tmp_path, monkeypatch, extra, at=3, sub="run"):
    real = _interrupt_at_eval(monkeypatch, at)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, extra, sub)
    monkeypatch.setattr(trainer_mod, "evaluate", real)


def _assert_best_agrees(tmp_path, sub="run"):
    rec, best = _rec(tmp_path, sub), _ck(tmp_path, "best.pt", sub)
    assert best["epoch"] + 1 == rec["metrics"]["best_epoch"]
    assert best["top1"] == pytest.approx(rec["metrics"]["best_top1"])
    assert _ck(tmp_path, sub=sub)["best"]["epoch"] == rec["metrics"]["best_epoch"]


def _no_tmp(path: Path):
    assert not [p for p in path.rglob("*") if p.name.endswith(".tmp")]


# ---------------------------------------------------------------------------------------------- 1. ownership
def test_second_launch_is_refused_while_the_directory_is_owned(tmp_path):
    with RunLock(tmp_path / "run"):
        with pytest.raises(QreproError, match=r"in use by another process \(pid \d+ on "):
            _run(tmp_path, ["trainer.epochs=1"])
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "record.json").exists()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, capsys):
    d = tmp_path / "run" / "checkpoints"
    d.mkdir(parents=True)
    (tmp_path / "run" / ".lock").write_text(json.dumps({"pid": 4999999, "host": "h", "started": "then"}))
    (d / "last.pt.4999999.abcd.tmp").write_bytes(b"partial")  # a killed writer's leftover
    assert _run(tmp_path, ["trainer.epochs=1"]).record["complete"]
    out = capsys.readouterr().out
    assert "taking over" in out and "pid 4999999" in out
    _no_tmp(tmp_path)
    assert (tmp_path / "run" / ".lock").read_text() == ""  # released


def _hammer(path: str, n: int) -> None:
    from qrepro.engine.checkpoint import atomic_save

    for i in range(n):
        atomic_save({"i": torch.full((256,), float(i))}, path)


def test_concurrent_writers_use_their_own_temporary_files(tmp_path):
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_hammer, args=(str(tmp_path / "last.pt"), 25)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]  # no FileNotFoundError on a shared '.tmp' name
    assert torch.load(tmp_path / "last.pt", weights_only=True)["i"].shape == (256,)
    _no_tmp(tmp_path)


# ``python -c HOLD <args>``: the trainer's command line, pausing after each checkpoint while the file named by
# QREPRO_TEST_HOLD exists (a deterministic window in which the run is alive, owns its directory and has a last.pt)
HOLD = """
import os, sys, time
import qrepro.engine.callbacks as c
real = c.Checkpointer.on_epoch_end
def held(self, t, epoch, row):
    real(self, t, epoch, row)
    while os.path.exists(os.environ["QREPRO_TEST_HOLD"]):
        time.sleep(0.1)
c.Checkpointer.on_epoch_end = held
from qrepro.train import main
main()
"""


def _cli(args, tmp_path, hold=None):
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    head = [sys.executable, "-m", "qrepro.train"]
    if hold is not None:
        env["QREPRO_TEST_HOLD"] = str(hold)
        head = [sys.executable, "-c", HOLD]
    cmd = [*head, *args, f"out_root={tmp_path / 'runs'}"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


def test_kill9_concurrent_launch_and_relaunch(tmp_path):
    """kill -9 mid-run; a second launch while it runs is refused; then the same command with resume=true."""
    args = ["+experiment=demo_digits_fp", *FAST, "trainer.epochs=3"]
    run_dir = tmp_path / "runs" / "demo_digits_fp" / "model.width=4,trainer.batch_size=256,trainer.epochs=3"
    hold = tmp_path / "hold"
    hold.touch()
    first = _cli(args, tmp_path, hold)
    last = run_dir / "checkpoints" / "last.pt"
    deadline = time.time() + 120
    while not last.exists() and time.time() < deadline and first.poll() is None:
        time.sleep(0.2)
    assert last.exists(), first.communicate()
    second = _cli(args, tmp_path)
    _, err = second.communicate(timeout=120)
    assert second.returncode == 2 and "in use by another process" in _one_error_line(err)
    assert first.poll() is None, "the first run must still be running"
    first.send_signal(signal.SIGKILL)
    first.wait()
    epoch = torch.load(last, weights_only=True)["epoch"]

    resumed = _cli([*args, "resume=true"], tmp_path)
    out, err = resumed.communicate(timeout=180)
    assert resumed.returncode == 0, err
    assert "taking over" in out  # the lock of the killed process
    assert f"resumed from {last} after epoch {epoch + 1}/3" in out
    rec = json.loads((run_dir / "record.json").read_text())
    assert rec["complete"] and rec["curves"]["epoch"] == [1, 2, 3] and rec["segments"] == 2
    best = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)
    assert best["epoch"] + 1 == rec["metrics"]["best_epoch"]
    _no_tmp(run_dir)


# --------------------------------------------------------------------------------- 2./3. rerun and relaunch
def test_force_rerun_killed_marks_the_old_record_superseded(tmp_path, monkeypatch):
    old = _run(tmp_path, ["trainer.epochs=2"]).record
    assert old["complete"]
    _killed_run(tmp_path, monkeypatch, ["trainer.epochs=2", "force=true"], at=2)
    rec = _rec(tmp_path)
    assert rec["complete"] is False and rec["status"] == "superseded"
    assert rec["superseded"]["previous_status"] == "complete"
    assert _ck(tmp_path)["epoch"] == 0  # the new run's epoch 1
    with pytest.raises(QreproError, match="unfinished run.*resume=true.*force=true"):  # not skipped as complete
        _run(tmp_path, ["trainer.epochs=2"])
    rec = _run(tmp_path, ["trainer.epochs=2", "resume=true"]).record
    assert rec["complete"] and rec["curves"]["epoch"] == [1, 2] and rec["segments"] == 2
    _assert_best_agrees(tmp_path)


def test_force_killed_before_its_first_checkpoint_leaves_no_old_checkpoint(tmp_path, monkeypatch):
    _run(tmp_path, ["trainer.epochs=1"])
    _killed_run(tmp_path, monkeypatch, ["trainer.epochs=1", "force=true"], at=1)
    assert _rec(tmp_path)["status"] == "superseded"
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()  # the old run's checkpoint is gone
    assert _run(tmp_path, ["trainer.epochs=1"]).record["complete"]  # nothing to resume: a fresh start


def test_relaunch_without_resume_refuses_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    _killed_run(tmp_path, monkeypatch, ["trainer.epochs=3"])
    before = (tmp_path / "run" / "checkpoints" / "last.pt").read_bytes()
    with pytest.raises(QreproError) as e:
        _run(tmp_path, ["trainer.epochs=3"])
    assert str(e.value) == (
        f"{tmp_path / 'run'} holds an unfinished run (checkpoint after epoch 2/3, no complete record); "
        "add resume=true to continue it, or force=true to start over"
    )
    assert (tmp_path / "run" / "checkpoints" / "last.pt").read_bytes() == before


# -------------------------------------------------------------------------------------------- 4. identity
@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("src")
    out = []
    for seed in (0, 1):
        _run(tmp, ["trainer.epochs=1", f"seed={seed}"], f"s{seed}")
        out.append(tmp / f"s{seed}" / "checkpoints" / "last.pt")
    return out


def test_a_different_init_from_is_never_another_runs_result(tmp_path, two_checkpoints, capsys):
    a, b = two_checkpoints
    assert _run(tmp_path, ["trainer.epochs=1", f"init_from={a}"]).record["init_from_sha256"]
    with pytest.raises(QreproError, match=r"initialised differently \(init_from sha256 \w+ -> sha256 \w+\)"):
        _run(tmp_path, ["trainer.epochs=1", f"init_from={b}"])
    with pytest.raises(QreproError, match=r"initialised differently \(init_from sha256 \w+ -> none\)"):
        _run(tmp_path, ["trainer.epochs=1"])
    assert _run(tmp_path, ["trainer.epochs=1", f"init_from={a}"]).skipped  # the same content: skipped
    assert "skip:" in capsys.readouterr().out


def test_resume_with_a_different_init_from_is_refused(tmp_path, monkeypatch, two_checkpoints):
    a, b = two_checkpoints
    _killed_run(tmp_path, monkeypatch, ["trainer.epochs=3", f"init_from={a}"])
    with pytest.raises(QreproError, match="was written by a different run .*init_from"):
        _run(tmp_path, ["trainer.epochs=3", f"init_from={b}", "resume=true"])


def test_ptq_result_of_another_checkpoint_is_refused(tmp_path, two_checkpoints):
    from qrepro.ptq.__main__ import run_ptq

    a, b = two_checkpoints
    base = ["+experiment=demo_digits_fp", *FAST, "ptq.algorithm=minmax", "ptq.calib_size=32", "ptq.eval_fp=false"]
    base += ["precision=w4a4"]
    (p,) = run_ptq(compose([*base, f"init_from={a}"], "ptq"), run_dir=tmp_path / "ptq", overrides=[])
    assert json.loads(p.read_text())["complete"]
    with pytest.raises(QreproError, match="complete PTQ result of another checkpoint"):
        run_ptq(compose([*base, f"init_from={b}"], "ptq"), run_dir=tmp_path / "ptq", overrides=[])
    run_ptq(compose([*base, f"init_from={b}", "force=true"], "ptq"), run_dir=tmp_path / "ptq", overrides=[])
    assert json.loads(p.read_text())["ptq"]["source_sha256"] == file_sha256(b)


# ------------------------------------------------------------------------------------ 5.-8. records and data
@pytest.mark.parametrize("epochs", [0, -1])
def test_nonpositive_epochs_are_refused_before_anything_is_written(tmp_path, epochs):
    with pytest.raises(QreproError, match=f"trainer.epochs={epochs} is invalid: expected an integer >= 1"):
        _run(tmp_path, [f"trainer.epochs={epochs}"])
    assert not (tmp_path / "run").exists()


def test_kill_between_last_and_best_writes_keeps_them_in_agreement(tmp_path, monkeypatch):
    real = callbacks_mod.os.replace

    def killed_before_best_rename(src, dst):
        if str(src).endswith("best.pt.pending") and _ck(tmp_path)["epoch"] == 1:
            raise KeyboardInterrupt  # last.pt (epoch 2, naming epoch 2 best) is written, best.pt is not
        return real(src, dst)

    monkeypatch.setattr(callbacks_mod.os, "replace", killed_before_best_rename)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, ["trainer.epochs=3"])
    monkeypatch.setattr(callbacks_mod.os, "replace", real)
    assert (tmp_path / "run" / "checkpoints" / "best.pt.pending").exists()
    _run(tmp_path, ["trainer.epochs=3", "resume=true"])
    _assert_best_agrees(tmp_path)


def test_kill_between_best_and_last_writes_keeps_them_in_agreement(tmp_path, monkeypatch):
    real = callbacks_mod.atomic_save

    def killed_before_last(obj, path):
        if Path(path).name == "last.pt" and obj["epoch"] == 1:
            raise KeyboardInterrupt  # best.pt.pending holds epoch 2; last.pt still says epoch 1
        return real(obj, path)

    monkeypatch.setattr(callbacks_mod, "atomic_save", killed_before_last)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, ["trainer.epochs=3"])
    monkeypatch.setattr(callbacks_mod, "atomic_save", real)
    _run(tmp_path, ["trainer.epochs=3", "resume=true"])
    _assert_best_agrees(tmp_path)
    assert not (tmp_path / "run" / "checkpoints" / "best.pt.pending").exists()


def test_resumed_record_covers_the_whole_run(tmp_path, monkeypatch):
    _killed_run(tmp_path, monkeypatch, ["trainer.epochs=3"])
    rec = _run(tmp_path, ["trainer.epochs=3", "resume=true"]).record
    c = rec["curves"]
    assert rec["segments"] == 2 and c["epoch"] == [1, 2, 3]
    assert rec["wall_time_s"] >= sum(c["epoch_s"])  # epochs 1-2 ran in the first segment
    assert min(c["images_per_s"]) <= rec["images_per_s"] <= max(c["images_per_s"])
    assert rec["started"] <= json.loads((tmp_path / "run" / "record.json").read_text())["finished"]


def _image_tree(root: Path, classes: dict[str, list[str]]):
    from PIL import Image

    for split, names in classes.items():
        for c in names:
            (root / split / c).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (32, 32), (i * 40, 10, 20)).save(root / split / c / f"{i}.png")


@pytest.mark.parametrize(
    "dataset,train_classes,test_classes,needle",
    [
        ("cifar10", 9, 9, "has 9 classes (9 with training images) but dataset=cifar10 expects 10"),
        (
            "cifar100",
            10,
            10,
            "has 10 classes (10 with training images) but dataset=cifar100 expects 100; use dataset=cifar10",
        ),
        ("cifar10", 10, 9, "train/ and test/ hold different class folders (c9 in only one)"),
    ],
)
def test_class_count_and_layout_are_checked(tmp_path, dataset, train_classes, test_classes, needle):
    from qrepro.builders import build_data_from_cfg

    _image_tree(
        tmp_path / "t",
        {"train": [f"c{i}" for i in range(train_classes)], "test": [f"c{i}" for i in range(test_classes)]},
    )
    cfg = compose([f"dataset={dataset}", f"dataset.root={tmp_path / 't'}", "trainer.batch_size=4"])
    with pytest.raises(QreproError) as e:
        build_data_from_cfg(cfg, torch.device("cpu"))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_non_tar_file_as_cifar_root_is_one_line(tmp_path):
    from qrepro.builders import build_data_from_cfg

    f = tmp_path / "data.tar.gz"
    f.write_bytes(os.urandom(2048))
    with pytest.raises(QreproError) as e:
        build_data_from_cfg(compose(["dataset=cifar10", f"dataset.root={f}"]), torch.device("cpu"))
    assert "not a readable tar archive (not a tar, tar.gz or tar.bz2 archive)" in str(e.value)
    assert "\n" not in str(e.value)


# -------------------------------------------------------------------------------------- 9. divergence
def _poison_loss(monkeypatch, after_calls):
    real, calls = torch.nn.functional.cross_entropy, {"n": 0}

    def poisoned(logits, y, **kw):
        calls["n"] += 1
        out = real(logits, y, **kw)
        return out * float("nan") if calls["n"] > after_calls else out

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", poisoned)


def test_divergence_in_the_first_epoch_names_no_checkpoint(tmp_path, monkeypatch):
    _poison_loss(monkeypatch, 0)
    with pytest.raises(QreproError) as e:
        _run(tmp_path, ["trainer.epochs=3"])
    msg = str(e.value)
    assert "stopped in epoch 1/3" in msg and "(epoch 1)" in msg and "no checkpoint was written" in msg
    assert "last good checkpoint" not in msg
    rec = _rec(tmp_path)
    assert rec["status"] == "diverged" and rec["metrics"]["epochs_done"] == 0
    assert _run(tmp_path, ["trainer.epochs=3"]).skipped  # a relaunch skips a diverged run


def test_nonfinite_batchnorm_statistics_stop_the_run_before_checkpointing(tmp_path, monkeypatch):
    real, calls = trainer_mod.train_one_epoch, {"n": 0}

    def inf_var(model, *a, **k):
        out = real(model, *a, **k)
        calls["n"] += 1
        if calls["n"] == 2:
            bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
            bn.running_var.fill_(float("inf"))
        return out

    monkeypatch.setattr(trainer_mod, "train_one_epoch", inf_var)
    with pytest.raises(QreproError) as e:
        _run(tmp_path, ["trainer.epochs=3"])
    msg = str(e.value)
    assert "after epoch 2" in msg and "running_var" in msg and "stopped in epoch 2/3" in msg
    assert f"last good checkpoint {tmp_path / 'run' / 'checkpoints' / 'last.pt'} (after epoch 1)" in msg
    st = _ck(tmp_path)
    assert st["epoch"] == 0 and all(torch.isfinite(v).all() for v in st["model"].values() if v.is_floating_point())
    monkeypatch.setattr(trainer_mod, "train_one_epoch", real)
    assert _run(tmp_path, ["trainer.epochs=3", "retry=true"]).record["complete"]  # retry runs it again


def test_a_nonfinite_checkpoint_is_never_called_good_nor_loaded(tmp_path):
    from qrepro.engine.callbacks import Checkpointer

    _run(tmp_path, ["trainer.epochs=1"], "src")
    st = _ck(tmp_path, sub="src")
    key = next(k for k in st["model"] if k.endswith("running_var"))
    st["model"][key].fill_(float("inf"))
    torch.save(st, tmp_path / "src" / "checkpoints" / "last.pt")
    assert "holds non-finite values" in Checkpointer(tmp_path / "src").last_good()
    with pytest.raises(QreproError, match=rf"holds non-finite values \(NaN/inf\) in 1 tensor\(s\), e.g. {key}"):
        _run(tmp_path, ["trainer.epochs=1", f"init_from={tmp_path / 'src' / 'checkpoints' / 'last.pt'}"])


# ---------------------------------------------------------------------------------------------- W&B
class FakeLogger:
    def __init__(self, resume_id):
        self.id, self.resume_id, self.logged, self.summary = resume_id or "run123", resume_id, [], None

    def log(self, metrics, step=None):
        self.logged.append(step)

    def finish(self, summary=None):
        if self.summary is None and summary is not None:
            self.summary = summary


def test_resume_continues_the_same_wandb_run_and_summary_has_best_and_last(tmp_path, monkeypatch):
    import qrepro.launch as train_mod

    made = []

    def fake(cfg, run_dir, config, resume_id=None):
        made.append(FakeLogger(resume_id))
        return made[-1]

    monkeypatch.setattr(train_mod, "make_logger", fake)
    _killed_run(tmp_path, monkeypatch, ["trainer.epochs=3"])
    rec = _run(tmp_path, ["trainer.epochs=3", "resume=true"]).record
    assert made[0].resume_id is None and made[1].resume_id == "run123"  # the same W&B run continues
    assert (tmp_path / "run" / "wandb_id").read_text().strip() == "run123"
    assert made[1].logged[0] > made[0].logged[-1]  # steps go on increasing
    s = made[1].summary
    m = rec["metrics"]
    assert s["best_top1"] == m["best_top1"] and s["best_epoch"] == m["best_epoch"] and s["last_top1"] == m["last_top1"]
    assert s["status"] == "complete"


def test_wandb_offline_resume_keeps_the_run_id(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    extra = ["trainer.epochs=2", "logger=wandb"]
    _killed_run(tmp_path, monkeypatch, extra, at=2)
    wid = (tmp_path / "run" / "wandb_id").read_text().strip()
    _run(tmp_path, [*extra, "resume=true"])
    runs = sorted(p.name for p in (tmp_path / "run").rglob("offline-run-*"))
    assert len(runs) == 2 and all(r.endswith(wid) for r in runs), runs


# ------------------------------------------------------------------------------- one-line errors, exit 2
def _main(argv, monkeypatch, capsys):
    import qrepro.train as train_mod

    monkeypatch.setattr(sys, "argv", ["qrepro.train", *argv])
    with pytest.raises(SystemExit) as e:
        train_mod.main()
    err = capsys.readouterr().err
    return e.value.code, err


CLI_CASES = [
    (["trainer.epoch=1"], "unknown config key trainer.epoch; did you mean trainer.epochs?"),
    (["+trainer.epoch=1"], "unknown config key trainer.epoch; did you mean trainer.epochs?"),
    (["optimizer.lr=abc"], "optimizer.lr='abc' is invalid: expected a finite number > 0"),
    (["optimizer.lr=-1"], "optimizer.lr=-1 is invalid"),
    (["optimizer.weight_decay=-20"], "optimizer.weight_decay=-20 is invalid: expected a finite number >= 0"),
    (["trainer.epochs=abc"], "trainer.epochs='abc' is invalid"),
    (["trainer.batch_size=0"], "trainer.batch_size=0 is invalid"),
    (["trainer.batch_size=abc"], "trainer.batch_size='abc' is invalid"),
    (["seed=-1"], "seed=-1 is invalid"),
    (["seed=abc"], "seed='abc' is invalid"),
    (["+sede=1"], "unknown config key sede; did you mean seed?"),
    (["scheduler=multistep", "scheduler.milestones=[5,2]"], "scheduler.milestones=[5, 2] is invalid"),
]


@pytest.mark.parametrize("argv,needle", CLI_CASES)
def test_bad_values_are_one_line_before_anything_is_written(tmp_path, monkeypatch, capsys, argv, needle):
    code, err = _main(
        ["+experiment=demo_digits_fp", *FAST, f"out_root={tmp_path / 'runs'}", *argv], monkeypatch, capsys
    )
    assert code == 2 and needle in _one_error_line(err)
    assert "To append" not in err  # never Hydra's '+key' hint
    assert not (tmp_path / "runs").exists()


def test_path_arguments_are_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "ckdir" / "checkpoints").mkdir(parents=True)
    (tmp_path / "ckdir" / "checkpoints" / "last.pt").write_bytes(b"x")
    (tmp_path / "afile").write_text("")
    base = ["+experiment=demo_digits_fp", *FAST]
    code, err = _main([*base, f"out_root={tmp_path}/runs", f"init_from={tmp_path / 'ckdir'}"], monkeypatch, capsys)
    line = _one_error_line(err)
    assert code == 2 and "is a directory, not a checkpoint file; use" in line and "checkpoints/last.pt" in line
    code, err = _main([*base, f"out_root={tmp_path / 'afile' / 'runs'}"], monkeypatch, capsys)
    assert code == 2 and f"{tmp_path / 'afile'} is a file, not a directory" in _one_error_line(err)


def test_init_from_a_run_directory_with_overrides_in_its_path(tmp_path):
    from qrepro.validation import precheck

    sub = tmp_path / "runs" / "x" / "precision=w32a32,seed=1"
    _run(tmp_path, ["trainer.epochs=1"], "runs/x/precision=w32a32,seed=1")
    path = sub / "checkpoints" / "last.pt"
    argv, cfg, multirun = precheck(["+experiment=demo_digits_fp", f"init_from={path}"], "train")
    assert cfg.init_from == str(path) and not multirun
    assert _run(tmp_path, ["trainer.epochs=1", f"init_from={path}"], "chained").record["complete"]


@pytest.mark.parametrize("payload", [b"this is not a checkpoint", b"", b"PK\x03\x04broken zip"])
def test_corrupt_checkpoints_say_why_in_words(tmp_path, payload):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(payload)
    with pytest.raises(QreproError) as e:
        _run(tmp_path, ["trainer.epochs=1", f"init_from={bad}"])
    msg = str(e.value)
    assert msg.startswith(f"checkpoint {bad} is corrupt: ") and msg.endswith("; re-create it")
    assert not any(ch.isdigit() for ch in msg.split("corrupt: ")[1]), msg  # no '(101)' internals


def test_resume_from_a_best_pt_copied_over_last_pt(tmp_path, monkeypatch):
    _killed_run(tmp_path, monkeypatch, ["trainer.epochs=3"])
    ck = tmp_path / "run" / "checkpoints"
    (ck / "last.pt").write_bytes((ck / "best.pt").read_bytes())
    with pytest.raises(QreproError, match=r"last.pt is not a resumable training checkpoint \(no optimizer, best"):
        _run(tmp_path, ["trainer.epochs=3", "resume=true"])


def test_resume_an_fp_run_directory_holding_an_apot_checkpoint(tmp_path, monkeypatch):
    _killed_run(tmp_path, monkeypatch, ["trainer.epochs=3", "quantizer=apot", "precision=w4a4"], at=2)
    with pytest.raises(QreproError, match=r"was written by a different run \(config: .*'apot' -> 'fp'"):
        _run(tmp_path, ["trainer.epochs=3", "resume=true"])


# ------------------------------------------------------------------------------------------- filesystem
def _failing_save(monkeypatch, exc, partial=True):
    import qrepro.engine.checkpoint as ckpt_mod

    real = torch.save

    def save(obj, f, *a, **k):
        if partial:
            Path(f).write_bytes(b"PK\x03\x04partial")
        raise exc

    monkeypatch.setattr(ckpt_mod.torch, "save", save)
    return real


@pytest.mark.parametrize(
    "exc,needle",
    [
        (OSError(errno.ENOSPC, "No space left on device"), "no space left on device"),
        (
            RuntimeError("[enforce fail at inline_container.cc:595] . unexpected pos 1600 vs 1494"),
            "torch's writer failed",
        ),
        (PermissionError(errno.EACCES, "Permission denied"), "permission denied"),
        (OSError(errno.EROFS, "Read-only file system"), "read-only file system"),
    ],
)
def test_failed_checkpoint_writes_are_one_line_and_leave_no_partial_file(tmp_path, monkeypatch, exc, needle):
    _failing_save(monkeypatch, exc)
    with pytest.raises(QreproError) as e:
        _run(tmp_path, ["trainer.epochs=1"])
    msg = str(e.value)
    assert msg.startswith(f"cannot write {tmp_path / 'run' / 'checkpoints'}/") and needle in msg and "\n" not in msg
    _no_tmp(tmp_path)
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()


@pytest.mark.parametrize("cause,needle", [("space", "no space left on device"), ("access", "permission denied")])
def test_torch_writer_errors_name_their_cause(tmp_path, monkeypatch, cause, needle):
    """torch's zip writer raises a RuntimeError without errno: the cause is read from the filesystem, so a
    permission problem is not reported as a full disk and a full disk is not a bare writer message."""
    from qrepro.engine import fsio

    _failing_save(monkeypatch, RuntimeError("[enforce fail at inline_container.cc:595] . unexpected pos 1600 vs 1494"))
    if cause == "space":
        monkeypatch.setattr(fsio, "LOW_SPACE", 2**62)
    else:
        real_access = fsio.os.access
        monkeypatch.setattr(
            fsio.os, "access", lambda p, m: False if str(p).endswith("checkpoints") else real_access(p, m)
        )
    with pytest.raises(QreproError) as e:
        _run(tmp_path, ["trainer.epochs=1"])
    assert needle in str(e.value) and "disk full?" not in str(e.value) and "\n" not in str(e.value)
    _no_tmp(tmp_path)


def test_a_file_where_the_checkpoint_directory_should_be(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").write_text("in the way")
    with pytest.raises(QreproError, match=r"checkpoints is a file, not a directory"):
        _run(tmp_path, ["trainer.epochs=1"])


# ---------------------------------------------------------------------------------------------- multirun
def test_multirun_goes_on_after_failures_and_skips_them_when_relaunched(tmp_path):
    args = ["-m", "+experiment=demo_digits_fp", *FAST, "trainer.epochs=1", "optimizer.lr=1000000,abc,0.05"]
    p = _cli(args, tmp_path)
    out, err = p.communicate(timeout=240)
    assert p.returncode == 1, out + err
    summary = out.strip().splitlines()[-1]
    assert summary.startswith("multirun: 1 finished, 0 skipped, 2 failed: ")
    assert re.search(r"optimizer\.lr=1000000\S* \(diverged\)", summary)
    assert re.search(r"optimizer\.lr=abc\S* \(failed\)", summary)
    assert "optimizer.lr='abc' is invalid" in err
    sweep = tmp_path / "runs" / "demo_digits_fp"
    failed = json.loads((sweep / "multirun.json").read_text())["failed"]
    assert len(failed) == 2 and "optimizer.lr=1000000" in failed[0] and "optimizer.lr=abc" in failed[1]  # job order
    good = sweep / "model.width=4,trainer.batch_size=256,trainer.epochs=1"  # lr=0.05 is the experiment's own
    assert json.loads((good / "record.json").read_text())["complete"]
    bad = sweep / "model.width=4,optimizer.lr=1000000,trainer.batch_size=256,trainer.epochs=1"
    assert json.loads((bad / "record.json").read_text())["status"] == "diverged"
    assert not any("lr=abc" in d.name for d in sweep.iterdir())  # a job that never started leaves no directory
    p = _cli(args, tmp_path)
    out, err = p.communicate(timeout=240)
    summary = out.strip().splitlines()[-1]
    assert summary.startswith("multirun: 0 finished, 2 skipped, 1 failed: ")
    assert re.search(r"optimizer\.lr=abc\S* \(failed\)", summary)
    assert p.returncode == 1


# ------------------------------------------------------------------------------------ table chains (run_table)
def test_run_table_does_not_return_a_chained_cell_initialised_from_an_older_parent(tmp_path, capsys):
    """A table cell started from another cell's checkpoint is not 'complete' once that checkpoint changed."""
    from qrepro.run_table import main as run_table_main

    configs = ROOT / "tests" / "fixtures" / "tables" / "configs"
    fp, w4 = tmp_path / "runs" / "fp", tmp_path / "runs" / "w4"
    for d, rec in (
        (fp, {"experiment": "demo_fp", "overrides": []}),
        (w4, {"experiment": "demo_q", "overrides": ["precision=w4a4"]}),
    ):
        (d / "checkpoints").mkdir(parents=True)
        (d / "checkpoints" / "last.pt").write_bytes(b"v1")
        (d / "record.json").write_text(json.dumps({**rec, "complete": True, "seed": 0, "metrics": {"best_top1": 1}}))
    sha_v1 = file_sha256(fp / "checkpoints" / "last.pt")
    rec = json.loads((w4 / "record.json").read_text())
    (w4 / "record.json").write_text(json.dumps({**rec, "init_from_sha256": sha_v1}))
    argv = ["demo", "--configs", str(configs), "--runs", str(tmp_path / "runs"), "--cells", "w4"]

    def never(cmd):
        raise AssertionError(f"nothing should run: {cmd}")

    assert run_table_main(argv, runner=never) == 0  # the same parent checkpoint: both skipped
    assert "demo/w4: complete, skipped" in capsys.readouterr().out
    (fp / "checkpoints" / "last.pt").write_bytes(b"v2")  # the parent was re-trained since
    assert run_table_main(argv, runner=never) == 1
    out = capsys.readouterr().out
    assert "demo/w4: its complete record was initialised from another checkpoint of fp (sha256 " in out


def test_a_launch_refused_by_the_lock_leaves_the_owners_directory_alone(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "runs" / "demo_digits_fp" / "model.width=4,trainer.batch_size=256,trainer.epochs=1"
    with RunLock(run_dir):  # another launch owns it (e.g. still in its first epoch: no checkpoint, no record)
        argv = ["+experiment=demo_digits_fp", *FAST, "trainer.epochs=1", f"out_root={tmp_path / 'runs'}"]
        code, err = _main(argv, monkeypatch, capsys)
        assert code == 2 and "in use by another process" in _one_error_line(err)
        assert json.loads((run_dir / ".lock").read_text())["pid"] == os.getpid()
        assert not (run_dir / ".hydra").exists()  # the refused launch wrote nothing there
