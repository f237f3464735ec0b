"""Batched members (``trainer.members=K``): member i trains exactly as the separate run ``seed=S+i``.

Float64 on the CPU: every member's parameters, BatchNorm statistics, quantizer parameters, optimizer state
(incl. TR's transition counts and TALR), schedule and hook state after 20 batched steps equal those of its
separate ``qrepro.api`` run; through the trainer, a digits multirun batched writes the records, run directories and
checkpoints of the same multirun run separately, skips and resumes as it does.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from qrepro.errors import QreproError

ROOT = Path(__file__).resolve().parents[1]
K = 3
S = 5
R20 = [
    "model=resnet20",
    "dataset=digits",
    "+dataset.image_size=8",
    "trainer.device=cpu",
    "logger=none",
    "trainer.batch_size=4",
    "trainer.epochs=2",
]
METHODS = {
    "fp": ["quantizer=fp"],
    "apot": ["quantizer=apot", "precision=w4a4"],
    "sat": ["quantizer=sat", "precision=w4a4"],
    "tr": ["quantizer=tr", "precision=w2a2", "optimizer=sgdt", "quantizer.monitor_every=5"],
}
STEPS, PER_EPOCH = 20, 10


def _flat(d, pre=""):
    out = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flat(v, f"{pre}{k}."))
    elif isinstance(d, (list, tuple)):
        for k, v in enumerate(d):
            out.update(_flat(v, f"{pre}{k}."))
    else:
        out[pre.rstrip(".")] = d
    return out


def _state(run) -> dict:
    return _flat(
        {
            "model": run.model.state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "hooks": [h.state_dict() for h in run.hooks],
            "lr": [g["lr"] for g in run.optimizer.param_groups],
            "step": run.ctx.step,
        }
    )


def _worst(a: dict, b: dict) -> tuple[float, str]:
    """Largest |a - b| / max(1, |b|) over every tensor and number (non-numbers must be equal)."""
    assert a.keys() == b.keys()
    worst = (0.0, "")
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, torch.Tensor):
            assert x.shape == y.shape and x.dtype == y.dtype, k
            if not x.numel():
                continue
            d = float(((x.double() - y.double()).abs() / y.double().abs().clamp(min=1.0)).max())
        elif isinstance(x, float):
            d = abs(x - y) / max(1.0, abs(y))
        else:
            assert x == y, (k, x, y)
            continue
        if d > worst[0]:
            worst = (d, k)
    return worst


@pytest.mark.parametrize("method", list(METHODS))
def test_members_train_exactly_as_separate_runs(method):
    """K = 3 members over 20 float64 steps (two epochs' ends) equal their separate runs (<= 1e-10)."""
    from qrepro.api import build, build_members
    from qrepro.builders import build_data_from_cfg, compose
    from qrepro.engine.members import member_data

    torch.set_num_threads(1)
    ov = R20 + METHODS[method]
    common = dict(load_data=False, num_classes=10, steps_per_epoch=PER_EPOCH)
    data = build_data_from_cfg(compose(ov), torch.device("cpu"))
    batches = []
    for i in range(K):
        it = iter(member_data(data, S + i).train)
        batches.append([next(it) for _ in range(STEPS)])
    mem = build_members(ov + [f"seed={S}"], K, torch.float64, **common)
    refs = [build(ov + [f"seed={S + i}"], torch.float64, **common) for i in range(K)]
    for s in range(STEPS):
        mem.step([batches[i][s] for i in range(K)])
        for i, r in enumerate(refs):
            r.step(*batches[i][s])
        if (s + 1) % PER_EPOCH == 0:
            mem.end_epoch()
            for r in refs:
                r.end_epoch()
    stack = mem.step_fn.stack
    assert stack.k == K  # one batched computation over the three members
    for i, r in enumerate(mem.runs):
        w = dict(r.model.named_parameters())["layer1.0.conv1.weight"]
        st = stack.params["layer1.0.conv1.weight"]
        assert w.data_ptr() == st[i].data_ptr()  # the member's parameter is its slice of the stack
        worst, key = _worst(_state(r), _state(refs[i]))
        assert worst <= 1e-10, f"{method} member {i}: {key} differs by {worst:.3g}"
    if method == "tr":  # transition counting and TALR are each member's own (compared above with the state)
        talrs = [tuple(r.optimizer.tr_last["U"]) for r in mem.runs]
        assert len(set(talrs)) == K  # the members' TALRs differ: nothing is shared between members


def test_unbatchable_members_are_refused():
    from qrepro.api import build_members
    from qrepro.engine.members import MemberStack

    mem = build_members(
        R20 + ["optimizer=asam_sgd", "seed=0"], 2, **dict(load_data=False, num_classes=10, steps_per_epoch=5)
    )
    x = torch.zeros(4, 3, 8, 8)
    y = torch.zeros(4, dtype=torch.long)
    with pytest.raises(QreproError, match="closure"):
        mem.step([(x, y), (x, y)])
    models = [nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)) for _ in range(2)]
    stack = MemberStack(models)
    fn = stack.vmapped(lambda m, x: m(x), in_dims=(0,))
    with pytest.raises(QreproError, match="random numbers"):
        fn(torch.zeros(2, 3, 4))


def test_member_state_dict_is_compact():
    """Checkpoints of a member hold its own tensors only (a saved view would carry the whole stack)."""
    from qrepro.engine.members import MemberStack

    models = [nn.Linear(3, 2) for _ in range(4)]
    refs = [m.weight.detach().clone() for m in models]
    stack = MemberStack(models)
    sd = models[2].state_dict()
    assert sd["weight"].untyped_storage().nbytes() == 6 * 4
    assert torch.equal(sd["weight"], refs[2])
    with torch.no_grad():  # something replaces a member's tensor: the stack takes its value back
        models[1].weight.data = torch.full((2, 3), 7.0)
    assert stack.check_tied() == 1
    assert torch.equal(stack.params["weight"][1], torch.full((2, 3), 7.0))
    stack.release()
    assert models[1].weight.untyped_storage().nbytes() == 6 * 4


# ------------------------------------------------------------------------------------------ the trainer
DIGITS = ["+experiment=demo_digits_fp", "model.width=4", "trainer.epochs=2", "logger=none", "trainer.device=cpu"]
DIGITS += ["trainer.progress=false", "trainer.num_threads=1"]


@pytest.fixture
def float64_trainer(monkeypatch):
    """The trainer in float64 (model and inputs), so that batched and separate runs agree to the printed digits
    instead of drifting apart by float32 rounding (as two thread counts of the same run also do)."""
    _float64(monkeypatch)


def _float64(monkeypatch):
    import qrepro.builders
    import qrepro.launch
    from qrepro.data import Normalizer

    orig_call = Normalizer.__call__
    monkeypatch.setattr(Normalizer, "__call__", lambda self, x: orig_call(self, x).double())
    bc = functools.partial(qrepro.builders.build_components, dtype=torch.float64)
    monkeypatch.setattr(qrepro.builders, "build_components", bc)
    monkeypatch.setattr(qrepro.launch, "build_components", bc)


def _train(overrides, out_root):
    """As ``python -m qrepro.train <DIGITS + overrides>`` with its Hydra run directory."""
    from qrepro.config import run_subdir as override_dirname
    from qrepro.train import compose, train

    ov = DIGITS + overrides
    cfg = compose(ov + [f"out_root={out_root}"])
    return train(cfg, run_dir=Path(out_root) / cfg.name / override_dirname(ov), overrides=ov)


def _name(seed):  # seed=0 is the experiment's own: not part of the run's name
    return f"model.width=4,seed={seed},trainer.epochs=2" if seed else "model.width=4,trainer.epochs=2"


def _rec(out_root, seed):
    return json.loads((Path(out_root) / "demo_digits_fp" / _name(seed) / "record.json").read_text())


@pytest.fixture(scope="module")
def separate_dir(tmp_path_factory):
    """The three separate float64 runs (seeds 0-2) that the batched runs are compared with, trained once per
    test process (under pytest-xdist each worker that needs them trains its own)."""
    out = tmp_path_factory.mktemp("separate")
    with pytest.MonkeyPatch.context() as mp:
        _float64(mp)
        for s in range(3):
            _train([f"seed={s}"], out)
    return out


def test_digits_multirun_batched_equals_separate(tmp_path, float64_trainer, separate_dir, capsys):
    results = _train(["seed=0", "trainer.members=3"], tmp_path)
    out = capsys.readouterr().out
    assert [r.record_path.parent.name for r in results] == [_name(s) for s in range(3)]
    for s in range(3):
        a, b = _rec(tmp_path, s), _rec(separate_dir, s)
        assert a["complete"] and a["status"] == "complete"
        for k in ("best_top1", "best_top5", "last_top1", "last_top5"):  # as printed: two decimals
            assert f"{a['metrics'][k]:.2f}" == f"{b['metrics'][k]:.2f}", (s, k)
        assert a["metrics"]["best_epoch"] == b["metrics"]["best_epoch"]
        for k in ("train_loss", "test_loss", "test_top1", "lr"):
            assert a["curves"][k] == pytest.approx(b["curves"][k], rel=1e-9, abs=1e-12), (s, k)
        same = {k for k in b if k not in ("run_dir", "checkpoint", "started", "finished", "wall_time_s")}
        same -= {"images_per_s", "curves", "metrics", "versions", "device", "git"}
        for k in same:
            assert a[k] == b[k] or k == "config", (s, k)
        assert {k: v for k, v in a["config"].items() if k != "out_root"} == {
            k: v for k, v in b["config"].items() if k != "out_root"
        }
        assert a["members"]["size"] == 3 and a["members"]["index"] == s and a["members"]["seeds"] == [0, 1, 2]
        assert "members" not in b
        ck = torch.load(Path(a["checkpoint"]), weights_only=True)
        ref = torch.load(Path(b["checkpoint"]), weights_only=True)
        for k, v in ref["model"].items():
            assert ck["model"][k].untyped_storage().nbytes() == v.untyped_storage().nbytes(), k
            assert torch.allclose(ck["model"][k].double(), v.double(), rtol=1e-9, atol=1e-12), k
    assert "error" not in out
    # a relaunch skips every member, as a relaunched multirun skips every run
    again = _train(["seed=0", "trainer.members=3"], tmp_path)
    assert all(r.skipped for r in again)
    # a batch over seeds whose runs exist separately skips them too
    assert all(r.skipped for r in _train(["seed=0", "trainer.members=3"], separate_dir))


def test_a_diverged_member_leaves_and_the_others_train_on_as_separate_runs(
    tmp_path, float64_trainer, separate_dir, monkeypatch
):
    """Member seed=1's epoch-1 loss read as NaN: it leaves the batch with a diverged record, the launch ends with
    the one-line error naming it, and seeds 0 and 2 train epoch 2 as a batch of two (the step rebuilt without
    it), still equal to their separate runs."""
    import qrepro.engine.members as mm

    seen, sizes = {"epoch": None}, {}
    orig_epoch, orig_step = mm.BatchedEpoch.epoch, mm.BatchedStep.__call__

    def epoch(self, e):
        seen["epoch"] = e
        return orig_epoch(self, e)

    def step(self, xs, ys):
        losses, correct = orig_step(self, xs, ys)
        sizes.setdefault(seen["epoch"], set()).add(len(self.slots))
        if seen["epoch"] == 0 and len(self.slots) == 3:
            losses = losses.clone()
            losses[1] = float("nan")
        return losses, correct

    monkeypatch.setattr(mm.BatchedEpoch, "epoch", epoch)
    monkeypatch.setattr(mm.BatchedStep, "__call__", step)
    with pytest.raises(QreproError, match=r"^training diverged: member seed=1: "):
        _train(["seed=0", "trainer.members=3"], tmp_path)
    assert sizes == {0: {3}, 1: {2}}
    assert _rec(tmp_path, 1)["status"] == "diverged" and _rec(tmp_path, 1)["metrics"]["epochs_done"] == 0
    for s in (0, 2):
        a, b = _rec(tmp_path, s), _rec(separate_dir, s)
        assert a["status"] == "complete" and a["metrics"]["epochs_done"] == 2
        for k in ("train_loss", "test_loss", "test_top1"):
            assert a["curves"][k] == pytest.approx(b["curves"][k], rel=1e-9, abs=1e-12), (s, k)


def test_batched_job_resumes_every_member(tmp_path, float64_trainer, separate_dir, monkeypatch):
    """A batch stopped after epoch 1 (one member's checkpoint lost, as in a kill between writes) resumes every
    member: the lagging one catches up alone, then the batch finishes; results equal the uninterrupted runs."""
    import qrepro.engine.trainer as mt

    orig = mt.Cohort.epoch

    def crash_after_first(self, epoch):
        orig(self, epoch)
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(mt.Cohort, "epoch", crash_after_first)
    with pytest.raises(KeyboardInterrupt):
        _train(["seed=0", "trainer.members=3"], tmp_path)
    monkeypatch.setattr(mt.Cohort, "epoch", orig)
    runs = tmp_path / "demo_digits_fp"
    lasts = sorted(runs.glob("*/checkpoints/last.pt"))
    assert len(lasts) == 3 and not list(runs.glob("*/record.json"))
    with pytest.raises(QreproError, match="resume=true"):
        _train(["seed=0", "trainer.members=3"], tmp_path)
    (runs / "model.width=4,seed=1,trainer.epochs=2" / "checkpoints" / "last.pt").unlink()
    for p in (runs / "model.width=4,seed=1,trainer.epochs=2" / "checkpoints").glob("*"):
        p.unlink()
    results = _train(["seed=0", "trainer.members=3", "resume=true"], tmp_path)
    assert [r.record["complete"] for r in results] == [True] * 3
    for s in range(3):
        a, b = _rec(tmp_path, s), _rec(separate_dir, s)
        assert a["segments"] == (1 if s == 1 else 2)
        for k in ("best_top1", "last_top1", "last_top5"):
            assert f"{a['metrics'][k]:.2f}" == f"{b['metrics'][k]:.2f}", (s, k)
        assert a["curves"]["train_loss"] == pytest.approx(b["curves"]["train_loss"], rel=1e-9)


def test_kill9_of_batched_job_resumes(tmp_path):
    """A real ``kill -9`` of ``python -m qrepro.train ... trainer.members=2`` after its first epoch's checkpoints,
    then ``resume=true``: both members resume from their checkpoints and finish."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    args = [sys.executable, "-m", "qrepro.train", *DIGITS[:1], "model.width=4", "trainer.epochs=3", "logger=none"]
    args += ["trainer.device=cpu", "trainer.progress=false", "trainer.num_threads=1", f"out_root={tmp_path}"]
    args += ["seed=7", "trainer.members=2"]
    runs = tmp_path / "demo_digits_fp"
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        t0 = time.time()
        while len(list(runs.glob("*/checkpoints/last.pt"))) < 2 and time.time() - t0 < 240:
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert not list(runs.glob("*/record.json"))
    out = subprocess.run(args + ["resume=true"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("resumed from") == 2
    for s in (7, 8):
        rec = json.loads((runs / f"model.width=4,seed={s},trainer.epochs=3" / "record.json").read_text())
        assert rec["complete"] and rec["segments"] == 2 and rec["members"]["seeds"] == [7, 8]
        assert len(rec["curves"]["epoch"]) == 3


def test_ste_clip_batches_under_vmap():
    """``ste.clip`` (a custom autograd.Function) runs under ``torch.func.vmap``: values and gradients of the
    batched call equal the per-member calls (float64)."""
    from torch.func import vmap

    from qrepro.quant.ste import clip

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    hi = torch.tensor([0.3, 0.8, 1.5], dtype=torch.float64, requires_grad=True)
    lo = (-hi.detach()).clone().requires_grad_()
    out = vmap(clip)(x, lo, hi)
    w = torch.randn(3, 5, 7, generator=g, dtype=torch.float64)
    (out * w).sum().backward()
    for i in range(3):
        xi, loi, hii = (t.detach()[i].clone().requires_grad_() for t in (x, lo, hi))
        oi = clip(xi, loi, hii)
        (oi * w[i]).sum().backward()
        assert torch.equal(out[i].detach(), oi.detach())
        assert (
            torch.equal(x.grad[i], xi.grad) and torch.equal(hi.grad[i], hii.grad) and torch.equal(lo.grad[i], loi.grad)
        )


def test_members_refuse_in_one_line_before_touching_run_dirs(tmp_path):
    from types import SimpleNamespace

    from qrepro.engine.members import member_data

    with pytest.raises(QreproError, match="channels_last"):
        _train(["seed=0", "trainer.members=2", "trainer.channels_last=true"], tmp_path)
    assert not list(tmp_path.rglob("*.lock")) and not list(tmp_path.rglob("record.json"))
    with pytest.raises(QreproError, match="DataLoader"):  # e.g. ImageNet: not held on the device
        member_data(SimpleNamespace(train=[(torch.zeros(1), torch.zeros(1))]), 1)
