"""Batched members over a chained cell (``trainer.members=K`` on a cell with ``init_from_experiment``).

Member i is the separate run ``seed=S+i``; that run's chain carries its seed, so member i starts from the seed S+i
run of the source cell. The launch trains the K source runs as one batched job of the source cell (once, before
the members; reused when finished), then each member starts from its own source's ``last.pt``.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qrepro.chain import Step, batch_command, member_chains, member_inits, prepare
from qrepro.config import run_subdir
from qrepro.engine.rundir import file_sha256
from qrepro.errors import QreproError
from qrepro.run_table import RunResult

ROOT = Path(__file__).resolve().parents[1]
CELL = "demo_digits_apot_w4a4"
# ResNet-20 on 8x8 digits: no max-pool, whose ties between quantized activations would route a gradient to another
# position in the batched kernel than in the single-run one (docs/speed.md, float32 section)
FAST = ["model=resnet20", "+dataset.image_size=8", "trainer.epochs=1", "trainer.batch_size=64", "logger=none"]
FAST += ["trainer.device=cpu", "trainer.progress=false", "trainer.num_threads=1"]
NAME = "+dataset.image_size=8,model=resnet20,trainer.epochs=1"


@pytest.fixture
def float64_trainer(monkeypatch):
    """The trainer in float64 (as in tests/test_members.py): batched and separate runs then agree to the printed
    digits instead of drifting apart by float32 rounding."""
    import qrepro.builders
    import qrepro.launch
    from qrepro.data import Normalizer

    orig_call = Normalizer.__call__
    monkeypatch.setattr(Normalizer, "__call__", lambda self, x: orig_call(self, x).double())
    bc = functools.partial(qrepro.builders.build_components, dtype=torch.float64)
    monkeypatch.setattr(qrepro.builders, "build_components", bc)
    monkeypatch.setattr(qrepro.launch, "build_components", bc)
    # and on a subset of digits (256 training, 128 test images: 4 steps per epoch at batch 64), for speed
    import qrepro.data.digits as digits

    full = digits.load_digits_tensors
    monkeypatch.setattr(
        digits, "load_digits_tensors", lambda *a, **kw: [t[:n] for t, n in zip(full(*a, **kw), (256, 256, 128, 128))]
    )


def _train_in_process(args: list[str], inits: list[str | None] | None = None) -> list:
    """``python -m qrepro.train <args>`` as its Hydra job does it once the chain is resolved (this process, so
    that the float64 fixture applies)."""
    from qrepro.train import compose, train

    cfg = compose(args)
    res = train(cfg, run_dir=Path(cfg.out_root) / cfg.name / run_subdir(args), overrides=args, member_inits=inits)
    return res if isinstance(res, list) else [res]


def _runner(calls: list[list[str]]):
    def run(cmd: list[str]) -> RunResult:
        calls.append(cmd[3:])
        recs = tuple(r.record_path for r in _train_in_process(cmd[3:]))
        return RunResult(0, recs[-1], recs)

    return run


def _launch(argv: list[str], calls: list[list[str]]) -> list:
    """The launch of ``argv`` (a single run): the chain resolved (sources trained by the runner), then the job."""
    new = prepare(argv, runner=_runner(calls), out=lambda s: None)
    if any(a.startswith("trainer.members=") for a in argv):
        assert new == argv  # the job resolves each member's source
        return _train_in_process(new, member_inits(CELL, new))
    return _train_in_process(new)


def _rec(out_root: Path, experiment: str, seed: int) -> dict:
    sub = NAME if not seed else NAME.replace("model=resnet20,", f"model=resnet20,seed={seed},")
    return json.loads((out_root / experiment / sub / "record.json").read_text())


def _same_run(a: dict, b: dict, where: str) -> None:
    """``a`` (a batched member's record) is the record of the separate run ``b`` (another out_root)."""
    assert a["complete"] and b["complete"], where
    for k in ("best_top1", "best_top5", "last_top1", "last_top5"):  # as printed: two decimals
        assert f"{a['metrics'][k]:.2f}" == f"{b['metrics'][k]:.2f}", (where, k)
    for k in ("train_loss", "test_loss", "test_top1", "lr"):
        assert a["curves"][k] == pytest.approx(b["curves"][k], rel=1e-9, abs=1e-12), (where, k)
    for k in ("overrides", "seed", "experiment", "precision", "method", "identity"):
        if k == "identity":  # the config's hash (without out_root and init_from, non-semantic) is the same
            assert a[k]["config_sha256"] == b[k]["config_sha256"], where
        else:
            assert a[k] == b[k], (where, k)
    ck = torch.load(Path(a["checkpoint"]), weights_only=True)["model"]
    ref = torch.load(Path(b["checkpoint"]), weights_only=True)["model"]
    for k, v in ref.items():
        assert torch.allclose(ck[k].double(), v.double(), rtol=1e-9, atol=1e-12), (where, k)


def test_members_over_a_chained_cell_equal_the_separate_chained_runs(tmp_path, float64_trainer):
    sep, bat = tmp_path / "separate", tmp_path / "batched"
    calls: list[list[str]] = []
    for s in (0, 1):  # the separate runs, each resolving its own chain: one FP source per seed
        _launch([f"+experiment={CELL}", *FAST, f"seed={s}", f"out_root={sep}"], calls)
    assert [c[0] for c in calls] == ["+experiment=demo_digits_fp"] * 2
    calls.clear()

    argv = [f"+experiment={CELL}", *FAST, "seed=0", "trainer.members=2", f"out_root={bat}"]
    results = _launch(argv, calls)
    # the two FP sources were trained once, as one batched job, before the members
    assert len(calls) == 1 and calls[0][0] == "+experiment=demo_digits_fp"
    assert "trainer.members=2" in calls[0] and "seed=0" in calls[0] and calls[0][-1] == "init_from=null"
    assert [r.record_path.parent.name for r in results] == [NAME, NAME.replace("resnet20,", "resnet20,seed=1,")]
    for s in (0, 1):
        fp_b, fp_s = _rec(bat, "demo_digits_fp", s), _rec(sep, "demo_digits_fp", s)
        _same_run(fp_b, fp_s, f"fp seed {s}")
        q_b, q_s = _rec(bat, CELL, s), _rec(sep, CELL, s)
        _same_run(q_b, q_s, f"apot seed {s}")
        assert q_b["members"]["seeds"] == [0, 1] and q_b["members"]["index"] == s and "members" not in q_s
        # each member starts from its own seed's source run, as its separate run does
        fp_ckpt = Path(fp_b["checkpoint"]).parent / "last.pt"
        assert q_b["init_from_sha256"] == file_sha256(fp_ckpt) and Path(q_b["init_from"]) == fp_ckpt
        assert Path(q_s["init_from"]) == Path(fp_s["checkpoint"]).parent / "last.pt"
        assert q_b["config"]["init_from"] == q_b["init_from"]

    # launched again, over the separate runs' directory (the members' runs are those runs): every source run is
    # reused and every member skipped (a relaunch over its own directory is the same case)
    calls.clear()
    again = _launch([*argv[:-1], f"out_root={sep}"], calls)
    assert calls == [] and len(again) == 2 and all(r.skipped for r in again)


def _fake_runner(calls: list[list[str]]):
    """A runner that writes each member's finished record and ``last.pt`` where the batched job would."""

    def run(cmd: list[str]) -> RunResult:
        calls.append(cmd[3:])
        # the members' chains as the batched job resolves them (no init_from: each from its seed's source run)
        chains = member_chains(cmd[3].split("=", 1)[1], [a for a in cmd[4:] if not a.startswith("init_from=")])
        recs = []
        for c in chains:
            step = c[-1]
            (step.run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            (step.run_dir / "checkpoints" / "last.pt").write_bytes(f"{step.experiment} seed {step.seed}".encode())
            init = file_sha256(c[-2].run_dir / "checkpoints" / "last.pt") if len(c) > 1 else None
            rec = {"complete": True, "status": "complete", "init_from_sha256": init}
            (step.run_dir / "record.json").write_text(json.dumps(rec))
            recs.append(step.run_dir / "record.json")
        return RunResult(0, recs[-1], tuple(recs))

    return run


def test_multirun_of_members_jobs_trains_each_seeds_source_once(tmp_path):
    calls: list[list[str]] = []
    argv = ["-m", f"+experiment={CELL}", "logger=none", f"out_root={tmp_path}", "precision=w2a2,w4a4"]
    argv.append("trainer.members=2")
    assert prepare(argv, runner=_fake_runner(calls), out=lambda s: None) == argv
    # both jobs start from the same two FP runs (seeds 0 and 1): trained once, as one batched job
    assert calls == [["+experiment=demo_digits_fp", "logger=none", f"out_root={tmp_path}", "trainer.members=2",
                      "init_from=null"]]  # fmt: skip
    fp = tmp_path / "demo_digits_fp"
    want = [(fp / d / "checkpoints" / "last.pt").as_posix() for d in ("default", "seed=1")]
    for bits in ("w2a2", "w4a4"):  # each job's members start from their seeds' sources
        assert member_inits(CELL, [f"+experiment={CELL}", f"out_root={tmp_path}", f"precision={bits}",
                                   "trainer.members=2"]) == want  # fmt: skip
    # a job never trains a source: an unfinished one is an error naming the command that trains it
    with pytest.raises(QreproError, match="a source run is not finished.*demo_digits_fp.*seed=4 trainer.members=2"):
        member_inits(CELL, [f"+experiment={CELL}", f"out_root={tmp_path}", "seed=4", "trainer.members=2"])


def test_plan_preview_of_a_members_job_and_its_progressive_chain(tmp_path):
    plan: list[str] = []
    argv = ["+experiment=apot_resnet20_cifar10_w4a4", "seed=2", "trainer.members=2", f"out_root={tmp_path}"]
    assert prepare(argv, out=plan.append, plan=True, runner=lambda cmd: pytest.fail("a preview trains nothing")) is None
    lines = plan[0].splitlines()
    assert lines[0] == "plan: apot_resnet20_cifar10_w4a4: 3 run(s) in order, each for 2 batched members (seeds 2, 3)"
    assert lines[1] == "  1. apot_resnet20_cifar10_fp  [to train, from scratch]"
    assert lines[2] == f"     run dir (seed=2): {tmp_path.as_posix()}/apot_resnet20_cifar10_fp/seed=2"
    assert lines[3] == f"     run dir (seed=3): {tmp_path.as_posix()}/apot_resnet20_cifar10_fp/seed=3"
    fp_cmd = "python -m qrepro.train +experiment=apot_resnet20_cifar10_fp"
    assert lines[4] == f"     {fp_cmd} out_root={tmp_path.as_posix()} seed=2 trainer.members=2 init_from=null"
    assert (
        lines[5]
        == "  2. apot_resnet20_cifar10_w5a5  [to train, from apot_resnet20_cifar10_fp, each member from its seed's run]"
    )
    assert lines[8].endswith(
        "+experiment=apot_resnet20_cifar10_w5a5 out_root=" + tmp_path.as_posix() + " seed=2 trainer.members=2"
    )
    assert lines[-1].endswith(
        "+experiment=apot_resnet20_cifar10_w4a4 out_root=" + tmp_path.as_posix() + " seed=2 trainer.members=2"
    )
    assert not tmp_path.exists() or not any(tmp_path.iterdir())
    # trained: one batched job per step before the cell (the 5-bit job resolves its members' FP runs itself)
    calls: list[list[str]] = []
    assert prepare(argv, out=lambda s: None, runner=_fake_runner(calls)) == argv
    assert [c[0] for c in calls] == ["+experiment=apot_resnet20_cifar10_fp", "+experiment=apot_resnet20_cifar10_w5a5"]
    assert calls[0][-1] == "init_from=null" and calls[1][-2:] == ["seed=2", "trainer.members=2"]
    w5 = tmp_path / "apot_resnet20_cifar10_w5a5"
    assert member_inits(argv[0][12:], argv) == [(w5 / f"seed={s}/checkpoints/last.pt").as_posix() for s in (2, 3)]
    # a source run that started from another checkpoint than its source's current one is trained again
    (tmp_path / "apot_resnet20_cifar10_fp" / "seed=3" / "checkpoints" / "last.pt").write_bytes(b"retrained")
    calls.clear()
    assert prepare(argv, out=lambda s: None, runner=_fake_runner(calls)) == argv
    assert [c[0] for c in calls] == ["+experiment=apot_resnet20_cifar10_w5a5"]


def test_batch_command_only_for_consecutive_seeds_of_one_batch():
    def step(seed: int, *ovr: str) -> Step:
        return Step("demo_digits_fp", [*ovr], Path(f"runs/{seed}"), False, None, seed)

    given = [step(3, "model.width=4", "seed=3"), step(4, "model.width=4", "seed=4")]
    assert batch_command(given) == [
        "python", "-m", "qrepro.train", "+experiment=demo_digits_fp", "model.width=4", "seed=3", "trainer.members=2"
    ]  # fmt: skip
    assert batch_command(given[::-1]) is None  # seeds 4, 3: not what one batch writes
    assert batch_command([given[0], step(4, "model.width=8", "seed=4")]) is None  # another override differs
    no_seed = [step(0), step(1, "seed=1")]  # member 0 without a seed override, as its separate run
    assert batch_command(no_seed, init_null=True)[4:] == ["trainer.members=2", "init_from=null"]
    assert batch_command([step(0), step(1, "seed=1"), step(2, "seed=2")])[4:] == ["trainer.members=3"]


def test_members_job_under_torchrun_does_not_train_sources(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    argv = [f"+experiment={CELL}", "trainer.members=2", f"out_root={tmp_path}"]
    with pytest.raises(QreproError, match="trainer.members cannot be combined with several processes"):
        prepare(argv, runner=lambda cmd: pytest.fail("no rank may train the source"), out=lambda s: None)


def test_cfg_job_shows_the_members_job_without_resolving_it(tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled"}
    args = [f"+experiment={CELL}", "trainer.members=3", f"out_root={tmp_path / 'runs'}", "--cfg", "job"]
    proc = subprocess.run(
        [sys.executable, "-m", "qrepro.train", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "  members: 3\n" in proc.stdout and "init_from_experiment: demo_digits_fp" in proc.stdout
    assert "chain:" not in proc.stdout and not (tmp_path / "runs").exists()
