"""Gradient accumulation (``trainer.accumulate=N``): each step's batch as N micro-batches, one optimizer step.

Without BatchNorm the step equals the full-batch step to float64 rounding (plain SGD, a quantized method, ASAM's
two passes, a distillation loss plus a weight regularizer, ragged last batches); with BatchNorm the step count, LR
schedule and TR transition counts are the full batch's and BatchNorm's running statistics move N times per step.
Tables count such a run as its cell and mark it; a batch that N does not divide is one line before anything is
written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accumulate_ddp import ddp_problem, ddp_rank
from torch import nn

from qrepro.api import build
from qrepro.config import run_subdir
from qrepro.engine.fast import make_forward_loss
from qrepro.engine.loop import micro_batches, train_step
from qrepro.errors import QreproError
from qrepro.hooks import Context
from qrepro.quant.distill import Distillation
from qrepro.tables import compare, load_records, parse_table
from qrepro.tables.render import to_csv, to_latex, to_markdown
from qrepro.validation import validate_config

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["trainer.device=cpu", "model.width=4", "trainer.batch_size=16", "trainer.epochs=2"]


def _batches(n: int, b: int = 16, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, 3, 32, 32, generator=g), torch.randint(0, 10, (b,), generator=g)) for _ in range(n)]


def _without_bn(model: nn.Module) -> None:
    for m in list(model.modules()):
        for child_name, child in list(m.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                setattr(m, child_name, nn.Identity())


def _trained(overrides: list[str], n: int, *, bn: bool, steps: int = 3):
    run = build([*overrides, *SMALL, f"trainer.accumulate={n}"], dtype=torch.float64, load_data=False,
                num_classes=10, steps_per_epoch=4)  # fmt: skip
    if not bn:
        _without_bn(run.model)
    losses = [float(run.step(x, y)) for x, y in _batches(steps)]
    return run, losses


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


CASES = {
    "sgd": ["+experiment=demo_digits_fp"],
    "sat": ["+experiment=demo_digits_sat_w4a4", "init_from=null"],
    "asam": ["+experiment=demo_digits_fp", "optimizer=asam_sgd", "optimizer.lr=0.05"],
}


@pytest.mark.parametrize("case", list(CASES))
def test_without_batchnorm_accumulation_is_the_full_batch_step(case):
    ref, ref_losses = _trained(CASES[case], 1, bn=False)
    want = _params(ref.model)
    for n in (2, 4):
        run, losses = _trained(CASES[case], n, bn=False)
        assert losses == pytest.approx(ref_losses, rel=1e-12, abs=1e-12)
        got = _params(run.model)
        assert got.keys() == want.keys()
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-11, atol=1e-12, msg=f"{case} N={n}: {k}")
        assert run.ctx.step == ref.ctx.step == 3
    assert max((want[k].double() - ref.model.state_dict()[k].double()).abs().max() for k in want) == 0.0
    # the run moved (the comparison is not between two untouched models)
    init = _params(build([*CASES[case], *SMALL], dtype=torch.float64, load_data=False, num_classes=10,
                         steps_per_epoch=4).model)  # fmt: skip
    assert any(not torch.equal(init[k], want[k]) for k in want if k in init and init[k].is_floating_point())


def test_ewgs_weight_gradient_scaling_is_the_documented_exception():
    # EWGS scales the weight discretiser's gradient by 1 + δ·sign(g)·(x_n − x_q), where g is summed over the batch:
    # nonlinear in g, so summing micro-batch gradients is not the full batch's (docs/speed.md §8); δ = 0 is exact
    ewgs = ["+experiment=demo_digits_fp", "quantizer=ewgs", "precision=w4a4", "quantizer.use_hessian=false"]
    diffs = {}
    for delta in (0.0, 0.5):
        ov = [*ewgs, f"quantizer.delta={delta}"]
        a, b = _params(_trained(ov, 1, bn=False)[0].model), _params(_trained(ov, 2, bn=False)[0].model)
        diffs[delta] = max(float((a[k] - b[k]).abs().max()) for k in a if a[k].is_floating_point())
    assert diffs[0.0] < 1e-12 and diffs[0.5] > 1e-6


def test_with_batchnorm_steps_schedule_and_transitions_count_optimizer_steps():
    tr = ["+experiment=demo_digits_fp", "quantizer=tr", "optimizer=sgdt", "precision=w2a2"]
    ref, _ = _trained(tr, 1, bn=True)
    run, _ = _trained(tr, 4, bn=True)
    assert run.ctx.step == ref.ctx.step == 3
    assert run.scheduler.last_step == ref.scheduler.last_step == 3  # one LR-schedule step per optimizer step
    # the LR of the groups the schedule drives (not the transition-adaptive ones) is the full batch's
    plain = [i for i, g in enumerate(ref.optimizer.param_groups) if not g.get("talr")]
    assert plain and [run.optimizer.param_groups[i]["lr"] for i in plain] == [
        ref.optimizer.param_groups[i]["lr"] for i in plain
    ]
    assert run.optimizer._tr_t == ref.optimizer._tr_t == 3  # one transition count per optimizer step
    assert len(run.optimizer.tr_last["K"]) == len(ref.optimizer.tr_last["K"])
    bn = [m for m in run.model.modules() if isinstance(m, nn.BatchNorm2d)]
    bn_ref = [m for m in ref.model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bn and all(int(m.num_batches_tracked) == 4 * 3 for m in bn)  # N running-stat updates per step
    assert all(int(m.num_batches_tracked) == 3 for m in bn_ref)
    # BatchNorm normalised micro-batches: the results differ (this is why tables mark such runs)
    assert not torch.allclose(bn[0].running_var, bn_ref[0].running_var)


def test_micro_batches_split_evenly_and_weigh_by_size():
    x, y = torch.arange(10.0).view(10, 1), torch.arange(10)
    parts = micro_batches(x, y, 4)
    assert [len(p[1]) for p in parts] == [3, 3, 2, 2] and sum(p[2] for p in parts) == pytest.approx(1.0)
    assert torch.equal(torch.cat([p[0] for p in parts]), x)
    assert [len(p[1]) for p in micro_batches(x[:3], y[:3], 4)] == [1, 1, 1]  # no empty micro-batch


@pytest.mark.parametrize("b, n", [(12, 3), (10, 4)])
def test_distillation_loss_and_weight_regularizer_match_the_full_batch(b, n):
    # Method.loss that takes the input (a teacher on the same images) plus a batch-independent regularizer: the
    # weighted micro-losses sum to the full batch's loss with the regularizer once, and so do the gradients
    torch.manual_seed(0)

    def net():
        return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4)).double()

    teacher, student = net(), net()

    def regularizer(m: nn.Module) -> torch.Tensor:
        return 0.3 * sum(p.pow(2).sum() for p in m.parameters())

    x, y = torch.randn(b, 5, dtype=torch.float64), torch.randint(0, 4, (b,))
    out = {}
    for steps in (1, n):
        model = net()
        model.load_state_dict(student.state_dict())
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        fl = make_forward_loss(model, Distillation(teacher), regularizer)
        ctx = Context(model=model, optimizer=opt)
        res = [train_step(model, fl, opt, None, x, y, ctx=ctx, accumulate=steps) for _ in range(2)]
        out[steps] = (res, model.state_dict(), ctx.step)
    (r1, p1, s1), (rn, pn, sn) = out[1], out[n]
    assert s1 == sn == 2
    for (l1, c1), (ln, cn) in zip(r1, rn):
        torch.testing.assert_close(ln, l1, rtol=1e-13, atol=1e-14)
        assert int(cn) == int(c1)  # correct predictions summed over micro-batches
    for k in p1:
        torch.testing.assert_close(pn[k], p1[k], rtol=1e-12, atol=1e-14)


def test_fp16_scaler_path_scales_each_micro_loss_and_steps_once():
    scaler_cls = getattr(torch.amp, "GradScaler", None)
    if scaler_cls is None:
        pytest.skip("torch.amp.GradScaler not available")
    torch.manual_seed(1)
    base = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    out = {}
    for n in (1, 2):
        model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
        model.load_state_dict(base.state_dict())
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        try:
            scaler = scaler_cls("cpu", init_scale=2.0**10)
        except (RuntimeError, TypeError) as e:  # pragma: no cover - older torch without CPU scaling
            pytest.skip(f"no CPU GradScaler: {e}")
        ctx = Context(model=model, optimizer=opt)
        fl = make_forward_loss(model, nn.functional.cross_entropy)
        for _ in range(2):
            train_step(model, fl, opt, None, x, y, ctx=ctx, scaler=scaler, accumulate=n)
        out[n] = (model.state_dict(), scaler.get_scale(), ctx.step)
    (p1, s1, k1), (p2, s2, k2) = out[1], out[2]
    assert (s1, k1) == (s2, k2) == (2.0**10, 2)  # one update per step: the scale did not move
    for k in p1:
        torch.testing.assert_close(p2[k], p1[k], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------- config and identity
def test_validation_names_batch_and_accumulate():
    base = {"seed": 0, "out_root": "runs", "trainer": {"batch_size": 100, "accumulate": 3}}
    with pytest.raises(QreproError, match=r"trainer.batch_size=100 is not divisible by trainer.accumulate=3") as e:
        validate_config(base)
    assert "\n" not in str(e.value)
    validate_config({**base, "trainer": {"batch_size": 99, "accumulate": 3}})
    with pytest.raises(QreproError, match=r"trainer.accumulate=0 is invalid"):
        validate_config({**base, "trainer": {"batch_size": 99, "accumulate": 0}})


def test_per_process_batch_must_split_too():
    from qrepro.engine.dist import per_rank_batch

    assert per_rank_batch(256, 2, 4) == 128
    with pytest.raises(QreproError, match=r"128 per process, not divisible by trainer.accumulate=3"):
        per_rank_batch(256, 2, 3)


def test_identity_and_run_name_keep_accumulate():
    from qrepro.config import NON_SEMANTIC_KEYS, SAME_CELL_DEFAULTS
    from qrepro.engine.rundir import identity

    cfg = {"trainer": {"batch_size": 8, "accumulate": 1, "epochs": 1}, "seed": 0}
    old = {"trainer": {"batch_size": 8, "epochs": 1}, "seed": 0}  # a run from before the key existed
    one = identity(cfg, None, NON_SEMANTIC_KEYS, SAME_CELL_DEFAULTS)
    assert one["config_sha256"] == identity(old, None, NON_SEMANTIC_KEYS)["config_sha256"]
    two = identity({**cfg, "trainer": {**cfg["trainer"], "accumulate": 2}}, None, NON_SEMANTIC_KEYS, SAME_CELL_DEFAULTS)
    assert two["config_sha256"] != one["config_sha256"] and two["config"]["trainer"]["accumulate"] == 2
    assert run_subdir(["+experiment=x", "trainer.accumulate=2", "trainer.progress=false"]) == "trainer.accumulate=2"


# ---------------------------------------------------------------------------------------------------- tables
def _table() -> object:
    cell = dict(id="q", experiment="e_q", model="m", dataset="d", method="M", w_bits=4, a_bits=4, paper=70.0)
    return parse_table({"name": "t", "paper": "P", "title": "T", "metric": "top1", "reported": "best",
                        "tolerance": 1.0, "cells": [cell]})  # fmt: skip


def _record(root: Path, sub: str, seed: int, best: float, extra: list[str]) -> None:
    d = root / sub
    d.mkdir(parents=True)
    rec = {"complete": True, "experiment": "e_q", "overrides": ["+experiment=e_q", *extra, f"seed={seed}"],
           "seed": seed, "config": {"trainer": {"batch_size": 2048}}, "metrics": {"best_top1": best}}  # fmt: skip
    (d / "record.json").write_text(json.dumps(rec))


def test_accumulated_run_counts_as_its_cell_and_is_marked(tmp_path):
    _record(tmp_path, "a", 0, 69.5, ["trainer.accumulate=4"])
    _record(tmp_path, "b", 1, 70.5, [])
    _record(tmp_path, "c", 0, 69.9, [])  # seed 0 without accumulation: another run, not a duplicate
    records = load_records([tmp_path])
    assert len(records) == 3
    table = _table()
    (row,) = compare(table, records)
    assert row.ours.n == 3 and not row.elsewhere
    md = to_markdown(table, [row], "best")
    note = "BatchNorm saw micro-batches of 2048/4"
    assert "`q` [1]" in md and "[1] s0: run with gradient accumulation over 4 micro-batches" in md and note in md
    assert note in to_csv(table, [row], "best")
    tex = to_latex(table, [row], "best")
    assert r"$^\dagger$" in tex and "2048/4" in tex
    # only accumulated runs: the note covers the whole cell; without them: no note
    (row,) = compare(table, [r for r in records if r.path.parent.name == "a"])
    assert "[1] Run with gradient accumulation over 4" in to_markdown(table, [row], "best")
    (row,) = compare(table, [r for r in records if r.path.parent.name != "a"])
    assert "gradient accumulation" not in to_markdown(table, [row], "best")


# ------------------------------------------------------------------------------------------------ the CLI
def _launch(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "qrepro.train", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)  # fmt: skip


FAST = ["logger=none", "trainer.progress=false", "model.width=4", "trainer.epochs=1"]


def test_cli_refuses_an_indivisible_batch_and_writes_nothing(tmp_path):
    p = _launch(["+experiment=demo_digits_fp", *FAST, "trainer.batch_size=100", "trainer.accumulate=3",
                 "out_root=runs"], tmp_path)  # fmt: skip
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1, p.stderr + p.stdout
    assert lines[0].startswith("error: trainer.batch_size=100 is not divisible by trainer.accumulate=3")
    assert not (tmp_path / "runs").exists()


def test_cli_run_with_accumulation_names_its_directory(tmp_path):
    p = _launch(["+experiment=demo_digits_fp", *FAST, "trainer.batch_size=256", "trainer.accumulate=2",
                 "out_root=runs"], tmp_path)  # fmt: skip
    assert p.returncode == 0, p.stderr + p.stdout
    (rec_path,) = (tmp_path / "runs").rglob("record.json")
    assert "trainer.accumulate=2" in rec_path.parent.name
    rec = json.loads(rec_path.read_text())
    assert rec["complete"] is True and "trainer.accumulate=2" in rec["overrides"]
    assert rec["config"]["trainer"]["accumulate"] == 2 and rec["metrics"]["best_top1"] > 10.0


def test_compiled_forward_takes_micro_batches_of_one_shape_once():
    # the compiled step (trainer.compile) over micro-batches: one graph for the micro-batch shape (two more for an
    # epoch's smaller last batch, whose split is ragged), and the same step as eager
    from torch._dynamo import lookup_backend

    from qrepro.engine.fast import compile_forward_loss

    graphs = []

    def counting(gm, example_inputs):  # Dynamo's graphs, each then compiled as the aot_eager backend does
        graphs.append({tuple(t.shape) for t in example_inputs})
        return lookup_backend("aot_eager")(gm, example_inputs)

    torch._dynamo.reset()
    torch.manual_seed(2)
    base = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    data = [(torch.randn(b, 5, dtype=torch.float64), torch.randint(0, 3, (b,))) for b in (8, 8, 8, 6)]
    out = {}
    for compiled in (False, True):
        model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
        model.load_state_dict(base.state_dict())
        opt = torch.optim.SGD(model.parameters(), lr=0.2)
        fl = make_forward_loss(model, nn.functional.cross_entropy)
        if compiled:
            fl = compile_forward_loss(fl, "default", backend=counting)
        ctx = Context(model=model, optimizer=opt)
        losses = [float(train_step(model, fl, opt, None, x, y, ctx=ctx, accumulate=2)[0]) for x, y in data]
        out[compiled] = (losses, model.state_dict())
    # micro-batches of 4 (the full batches of 8), then of 3 (the last batch of 6)
    assert len(graphs) == 2 and (4, 5) in graphs[0] and (3, 5) in graphs[1]
    assert out[True][0] == pytest.approx(out[False][0], rel=1e-13)
    for k, v in out[False][1].items():
        torch.testing.assert_close(out[True][1][k], v, rtol=1e-13, atol=1e-14)
    torch._dynamo.reset()


def test_ddp_accumulation_all_reduces_once_per_step_and_equals_the_global_batch(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(ddp_rank, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    x, y, model = ddp_problem()  # one process, the global batch, no accumulation
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    ctx = Context(model=model, optimizer=opt)
    for _ in range(2):
        train_step(model, make_forward_loss(model, nn.functional.cross_entropy), opt, None, x, y, ctx=ctx)
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        assert got["allreduce_calls"] == 2  # one bucket, once per optimizer step (no_sync on 3 of 4 micro-batches)
        for k, v in model.state_dict().items():
            torch.testing.assert_close(got["state"][k], v, rtol=1e-12, atol=1e-14)


def test_batched_members_accumulate_as_their_separate_runs():
    # trainer.members=2 with trainer.accumulate=2 (BatchNorm on: micro-batches of each member's own batch) equals
    # the two separate runs with trainer.accumulate=2, in float64
    from qrepro.api import build_members

    ov = ["+experiment=demo_digits_fp", *SMALL, "trainer.accumulate=2"]
    common = dict(load_data=False, num_classes=10, steps_per_epoch=4)
    mem = build_members([*ov, "seed=0"], 2, torch.float64, **common)
    refs = [build([*ov, f"seed={i}"], torch.float64, **common) for i in range(2)]
    data = [_batches(3, seed=i) for i in range(2)]
    for s in range(3):
        mem.step([data[0][s], data[1][s]])
        for i, r in enumerate(refs):
            r.step(*data[i][s])
    assert mem.step_fn.accumulate == 2
    for i, r in enumerate(refs):
        got, want = _params(mem.runs[i].model), _params(r.model)
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-10, atol=1e-12, msg=f"member {i}: {k}")
        bn = [m for m in mem.runs[i].model.modules() if isinstance(m, nn.BatchNorm2d)]
        assert bn and all(int(m.num_batches_tracked) == 2 * 3 for m in bn)
