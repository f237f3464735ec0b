"""Post-training quantization: ACIQ maths, quantizers, level sets and the PTQ algorithms on a small model."""

from __future__ import annotations

import math
import os
from dataclasses import replace as dataclasses_replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import integrate, optimize, stats
from torch import nn

from qrepro.errors import QreproError
from qrepro.ptq.core import PTQConfig, find_blocks, fold_weight_transforms, quantize_model
from qrepro.quant import build_method, prepare
from qrepro.quant.aciq import aciq_alpha, clip_mse, fit_scale, optimal_clip_ratio
from qrepro.quant.layers import quantized_layers
from qrepro.quant.levels import kmeans_levels, pot_levels, project
from qrepro.quant.quantizers import AdaRoundWeight, LevelQuantizer, UniformQuantizer

D = torch.float64


# ------------------------------------------------------------------------------------------------ ACIQ
def _numeric_mse(alpha: float, bits: int, pdf, signed: bool = True) -> float:
    """Supplement Eq. 4 by numerical integration (float64): tails + Δ²/12 (Δ = 2α/2^b, or α/2^b unsigned)."""
    tail = integrate.quad(lambda x: pdf(x) * (x - alpha) ** 2, alpha, np.inf, epsabs=1e-14, epsrel=1e-12)[0]
    if signed:
        return 2 * tail + (2 * alpha / 2**bits) ** 2 / 12
    return 2 * tail + (alpha / 2**bits) ** 2 / 12  # half-distribution density 2f on [0, ∞)


PDFS = {"laplace": stats.laplace(scale=1.0).pdf, "gaussian": stats.norm(scale=1.0).pdf}


@pytest.mark.parametrize("dist", ["laplace", "gaussian"])
@pytest.mark.parametrize("bits", range(2, 9))
def test_aciq_optimal_clip_matches_numeric_optimum(dist, bits):
    pdf = PDFS[dist]
    res = optimize.minimize_scalar(
        lambda a: _numeric_mse(a, bits, pdf), bounds=(0.1, 30.0), method="bounded", options={"xatol": 1e-10}
    )
    assert optimal_clip_ratio(bits, dist) == pytest.approx(res.x, abs=1e-5)
    # the closed form of the error itself
    for a in (0.5, 2.0, res.x, 7.0):
        assert clip_mse(a, bits, dist) == pytest.approx(_numeric_mse(a, bits, pdf), rel=1e-9, abs=1e-15)
    # unsigned half-distribution on [0, α] with 2^b levels == signed problem at b + 1 bits
    res_u = optimize.minimize_scalar(
        lambda a: _numeric_mse(a, bits, pdf, signed=False),
        bounds=(0.1, 30.0),
        method="bounded",
        options={"xatol": 1e-10},
    )
    assert aciq_alpha(1.0, bits, dist, signed=False) == pytest.approx(res_u.x, abs=1e-5)


def test_aciq_published_ratios():
    # Banner et al. (ACIQ): α*/b for Laplace and α*/σ for Gaussian, M = 2..8 bits
    lap = [2.83, 3.89, 5.03, 6.2, 7.41, 8.64, 9.89]
    gau = [1.71, 2.15, 2.55, 2.93, 3.28, 3.61, 3.92]
    for b, (l, g) in enumerate(zip(lap, gau), start=2):
        assert optimal_clip_ratio(b, "laplace") == pytest.approx(l, abs=0.01)
        assert optimal_clip_ratio(b, "gaussian") == pytest.approx(g, abs=0.01)


def test_aciq_clip_minimises_real_quantization_error_on_laplace_samples():
    torch.manual_seed(0)
    x = torch.distributions.Laplace(0.0, 1.0).sample((400_000,)).double()
    q = UniformQuantizer(3, signed=True, grid="midrise")
    beta = fit_scale(x, "laplace")
    assert beta.item() == pytest.approx(1.0, abs=0.01)
    a_star = aciq_alpha(beta, 3, "laplace").float()
    err = {f: (q.quantize_with_alpha(x.float(), a_star * f) - x.float()).square().mean().item() for f in (0.7, 1, 1.4)}
    assert err[1] < err[0.7] and err[1] < err[1.4]
    # at 6 bits the uniform-rounding-noise approximation (Eq. 2) predicts the real error within a few %
    q6 = UniformQuantizer(6, signed=True, grid="midrise")
    a6 = aciq_alpha(beta, 6, "laplace").float()
    err6 = (q6.quantize_with_alpha(x.float(), a6) - x.float()).square().mean().item()
    assert err6 == pytest.approx(clip_mse(a6.item(), 6, "laplace", beta.item()), rel=0.05)


def test_aciq_bad_input():
    with pytest.raises(QreproError, match="laplace"):
        optimal_clip_ratio(4, "cauchy")


# ------------------------------------------------------------------------------------------------ quantizers
def test_uniform_midrise_is_symmetric_and_int_has_zero():
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(0)) * 2  # no exact bin boundaries
    mid = UniformQuantizer(3, signed=True, grid="midrise")
    mid.set_alpha(2.0)
    y = mid(x)
    assert torch.allclose(mid(-x), -y)
    assert sorted(set(y.tolist())) == pytest.approx([(k + 0.5) * 0.5 for k in range(-4, 4)])
    i = UniformQuantizer(3, signed=True, grid="int")
    i.set_alpha(2.0)
    assert sorted(set(i(x).tolist())) == pytest.approx([k * 0.5 for k in range(-4, 4)])
    u = UniformQuantizer(2, signed=False)
    u.set_alpha(3.0)
    assert sorted(set(u(x).tolist())) == pytest.approx([0.0, 1.0, 2.0, 3.0])


def test_uniform_step_gradient_is_lsq():
    q = UniformQuantizer(4, signed=False, learn_step=True)
    q.step.data.fill_(0.1)
    x = torch.tensor([0.234, 0.871, 5.0])
    q(x).sum().backward()
    v = x / 0.1
    expect = (torch.round(v) - v)[:2].sum() + 15  # inside: round(v) − v ; clipped: q_max
    assert q.step.grad.item() == pytest.approx(expect.item(), rel=1e-4)


def test_qdrop_drops_about_p_of_elements_in_training_only():
    q = UniformQuantizer(2, signed=True)
    q.set_alpha(1.0)
    q.drop_prob = 0.5
    x = torch.rand(100_000) * 0.9 + 0.05
    torch.manual_seed(0)
    kept_fp = (q.train()(x) == x).float().mean().item()
    assert kept_fp == pytest.approx(0.5, abs=0.01)
    assert not torch.equal(q.eval()(x), x) and (q(x) == x).float().mean().item() < 0.01


def test_adaround_init_reproduces_weights_and_hard_rounds_to_neighbours():
    torch.manual_seed(0)
    w = torch.randn(64) * 0.3
    base = UniformQuantizer(4, signed=True, grid="midrise")
    base.set_alpha(w.abs().max())
    ada = AdaRoundWeight(base, w)
    s = base.step.item()
    top = w.abs().max().item() - s / 2  # midrise: largest level α − s/2
    assert torch.allclose(ada(w), w.clamp(-top, top), atol=1e-3)  # h(V) = fractional part at init
    ada.hard = True
    wq = ada(w)
    lo = (torch.floor(w / s - 0.5) + 0.5) * s
    inside = w.abs() < top
    near = ((wq - lo).abs() < 1e-6).logical_or((wq - lo - s).abs() < 1e-6)
    assert bool(near[inside].all())
    assert ada.round_loss(2.0).item() > 0


def test_pot_and_kmeans_levels():
    lv = pot_levels(3, 1.0)
    assert lv.tolist() == [-1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0]
    assert pot_levels(2, 2.0).tolist() == [-2.0, 0.0, 2.0]
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([-1.0, -0.2, 0.3, 2.0])
    x = centers[torch.randint(0, 4, (4000,), generator=g)] + 0.01 * torch.randn(4000, generator=g)
    km = kmeans_levels(x, 2)
    assert torch.allclose(km, centers, atol=0.01)
    uni = torch.linspace(x.min(), x.max(), 4)
    assert (project(x, km) - x).square().mean() < 0.1 * (project(x, uni) - x).square().mean()
    lq = LevelQuantizer(km)
    assert torch.equal(lq(x), project(x, km))


# ------------------------------------------------------------------------------------------------ models
class _Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


def _model() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Sequential(_Block(8), _Block(8)),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    )
    with torch.no_grad():  # non-trivial BN statistics
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 2.0)
    return m.eval()


def _calib(n: int = 64) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def test_find_blocks_opens_containers():
    q = prepare(_model(), build_method("fp", 32, 32))
    from qrepro.ptq.core import ptq_method

    q = prepare(q, ptq_method(PTQConfig(w_bits=4, a_bits=4)))
    assert find_blocks(q) == ["0", "2.0", "2.1", "5"]


def _out_mse(q: nn.Module, fp: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return (q(x) - fp(x)).square().mean().item()


def test_adaquant_and_qdrop_reduce_output_mse_vs_minmax():
    fp, calib = _model(), _calib()
    test_x = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    kw = dict(w_bits=3, a_bits=4, first_last_bits=None, batch_size=16, seed=0)
    err = {}
    sym_lr = dict(lr_weight=1e-3, lr_weight_qparams=1e-2, lr_act_qparams=1e-2)
    for alg, extra in [
        ("minmax", {}),
        ("aciq", {}),
        ("adaquant", dict(iters=60)),
        ("adaquant", dict(iters=60, asymmetric=False, weight_granularity="tensor", init="minmax", **sym_lr)),
        ("qdrop", dict(iters=120, lr_act_step=1e-3, lr_round=1e-2)),
        ("qdrop", dict(iters=120, asymmetric=False, weight_granularity="tensor", init="minmax", lr_round=1e-2)),
    ]:
        q = quantize_model(fp, calib, PTQConfig(algorithm=alg, **kw, **extra))
        err[alg + ("_sym" if extra.get("asymmetric") is False else "")] = _out_mse(q, fp, test_x)
    for alg in ("adaquant", "adaquant_sym", "qdrop", "qdrop_sym"):
        assert err[alg] < 0.8 * err["minmax"], err
    assert err["aciq"] < err["minmax"], err


def test_quantize_model_leaves_fp_model_untouched_and_32_bits_is_identity():
    fp, calib = _model(), _calib(16)
    before = {k: v.clone() for k, v in fp.state_dict().items()}
    q = quantize_model(fp, calib, PTQConfig(algorithm="qdrop", w_bits=2, a_bits=2, iters=3, batch_size=8))
    assert all(torch.equal(before[k], v) for k, v in fp.state_dict().items())
    assert not any(True for _ in quantized_layers(fp))
    assert len(list(quantized_layers(q))) == 6
    ident = quantize_model(fp, calib, PTQConfig(algorithm="minmax", w_bits=32, a_bits=32))
    assert torch.equal(ident(calib), fp(calib))


def test_first_last_policy_and_nonuniform():
    fp, calib = _model(), _calib(16)
    q = quantize_model(fp, calib, PTQConfig(algorithm="minmax", w_bits=4, a_bits=4, first_last_bits=8))
    layers = dict(quantized_layers(q))
    assert layers["0"].aq is None and layers["0"].wq.bits == 8 and layers["5"].wq.bits == 8
    assert layers["5"].aq.bits == 8 and layers["2.0.conv1"].wq.bits == 4 and layers["2.0.conv1"].aq.bits == 4
    for alg in ("pot", "kmeans"):
        q = quantize_model(fp, calib, PTQConfig(algorithm=alg, w_bits=3, a_bits=32, first_last_bits=None))
        w = dict(quantized_layers(q))["2.0.conv1"]
        assert isinstance(w.wq, LevelQuantizer) and w.aq is None
        assert w.effective_weight().unique().numel() <= 8
    with pytest.raises(QreproError, match="ptq algorithm"):
        quantize_model(fp, calib, PTQConfig(algorithm="gptq"))


def test_fold_satnl_into_weights_before_ptq():
    net = prepare(_model(), build_method("satnl", 32, 32, d=0.1))
    x = _calib(4)
    with torch.no_grad():
        ref = net(x)
    folded = fold_weight_transforms(__import__("copy").deepcopy(net))
    assert not any(True for _ in quantized_layers(folded))
    assert torch.allclose(folded(x), ref)
    assert folded[0].weight.abs().max().item() < 0.1
    q = quantize_model(net, x, PTQConfig(algorithm="minmax", w_bits=8, a_bits=32))
    assert math.isfinite(_out_mse(q, folded, x))


# ------------------------------------------------------------------------------------------------ end to end
FAST = ["logger=none", "trainer.progress=false", "trainer.batch_size=128", "model.width=8", "trainer.epochs=1"]


@pytest.fixture(scope="module")
def digits_ckpt(tmp_path_factory):
    """A 1-epoch digits FP checkpoint trained with SatNL + SymReg + ASAM (the 'Ours' recipe, tiny)."""
    from qrepro.train import compose, train

    tmp = tmp_path_factory.mktemp("fp")
    cfg = compose(["+experiment=symreg_digits_ours", *FAST, f"out_root={tmp}"])
    res = train(cfg, run_dir=tmp / "fp", experiment="symreg_digits_ours", overrides=[])
    assert res.record["complete"] and res.record["method"] == "satnl"
    return tmp / "fp" / "checkpoints" / "last.pt"


def _ptq_cfg(tmp_path, ckpt, *extra):
    from qrepro.train import compose

    over = ["+experiment=symreg_digits_ours", *FAST, f"out_root={tmp_path}", f"init_from={ckpt}"]
    return compose([*over, "ptq.calib_size=32", "ptq.batch_size=16", "ptq.iters=4", *extra], "ptq")


@pytest.mark.parametrize("alg", ["minmax", "mse", "aciq", "adaquant", "qdrop", "pot", "kmeans"])
def test_ptq_command_writes_records_and_leaves_checkpoint_identical(tmp_path, digits_ckpt, alg):
    import hashlib
    import json

    from qrepro.ptq.__main__ import run_ptq

    before = digits_ckpt.read_bytes()
    mtime = digits_ckpt.stat().st_mtime_ns
    over = [f"ptq.algorithm={alg}", "ptq.bits=[[4,32],[3,3]]"]
    paths = run_ptq(_ptq_cfg(tmp_path, digits_ckpt, *over), experiment="symreg_digits_ours", overrides=over)
    assert digits_ckpt.read_bytes() == before and digits_ckpt.stat().st_mtime_ns == mtime  # byte-identical
    assert [p.parent.name for p in paths] == ["w4a32", "w3a3"]
    for p, (w, a) in zip(paths, [(4, 32), (3, 3)]):
        rec = json.loads(p.read_text())
        assert rec["complete"] and rec["method"] == f"ptq_{alg}" and (rec["w_bits"], rec["a_bits"]) == (w, a)
        assert rec["experiment"] == "symreg_digits_ours" and rec["train_method"] == "satnl"
        assert rec["ptq"]["source_sha256"] == hashlib.sha256(before).hexdigest()
        assert 0 <= rec["metrics"]["last_top1"] <= 100 and rec["metrics"]["best_top1"] == rec["metrics"]["last_top1"]
        assert rec["ptq"]["weights"] == "model" and rec["ptq"]["fp_top1"] is not None
        assert rec["overrides"] == sorted([f"ptq.algorithm={alg}", f"precision=w{w}a{a}"])  # = the table cell


def test_ptq_bad_input_is_one_line_error(tmp_path, digits_ckpt):
    from qrepro.ptq.__main__ import run_ptq

    with pytest.raises(QreproError, match="unknown ptq algorithm 'gptq'"):
        run_ptq(_ptq_cfg(tmp_path, digits_ckpt, "ptq.algorithm=gptq"))
    with pytest.raises(QreproError, match="does not exist"):
        run_ptq(_ptq_cfg(tmp_path, tmp_path / "nope.pt"))
    with pytest.raises(QreproError, match="pairs"):
        run_ptq(_ptq_cfg(tmp_path, digits_ckpt, "ptq.bits=[4,4]"))


def test_ptq_cli_prints_record_line_last(tmp_path, digits_ckpt):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "qrepro.ptq", "+experiment=symreg_digits_ours", *FAST, f"out_root={tmp_path}"]
    cmd += [f"init_from={digits_ckpt}", "precision=w4a4", "ptq.calib_size=32", "ptq.eval_fp=false"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("record: ") and "/ptq/" in last and last.endswith("record.json")


def _ptq_main(argv, capsys, monkeypatch):
    """``python -m qrepro.ptq <argv>`` in this process: (exit code, stdout, stderr)."""
    import sys

    from qrepro.ptq.__main__ import main

    monkeypatch.setattr(sys, "argv", ["qrepro.ptq", *argv])
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out = capsys.readouterr()
    assert "Traceback" not in out.err + out.out, out.err
    return code, out.out, out.err


def test_bad_ptq_launch_is_one_line_and_writes_nothing(tmp_path, digits_ckpt, capsys, monkeypatch):
    """The PTQ launch is checked like the trainer's (validation.check_launch before Hydra runs; checkpoint,
    dataset and FP model before the run directory is taken): exit 2, one line, nothing under out_root."""
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    out_root = tmp_path / "runs"
    base = ["+experiment=symreg_digits_ours", *FAST, f"out_root={out_root}", "ptq.calib_size=32"]
    cases = {
        "unknown ptq algorithm 'gptq'": [f"init_from={digits_ckpt}", "ptq.algorithm=gptq"],
        "use a list of [w_bits, a_bits] pairs": [f"init_from={digits_ckpt}", "ptq.bits=[4,4]"],
        "ptq a_bits=40 out of range": [f"init_from={digits_ckpt}", "ptq.bits=[[4,40]]"],
        "ptq.use_ema='maybe' is invalid": [f"init_from={digits_ckpt}", "ptq.use_ema=maybe"],
        "ptq.round_warmup must be in [0, 1), got 1.0": [f"init_from={digits_ckpt}", "ptq.round_warmup=1.0"],
        "ptq needs the FP checkpoint": [],
        "is corrupt": [f"init_from={corrupt}"],
        "does not exist": [f"init_from={tmp_path / 'nope.pt'}"],
        "holds no CIFAR-10 data": [f"init_from={digits_ckpt}", "dataset=cifar10", f"dataset.root={tmp_path / 'no'}"],
    }
    for needle, extra in cases.items():
        code, _, err = _ptq_main([*base, *extra], capsys, monkeypatch)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], (needle, err)
        assert not out_root.exists(), (needle, sorted(out_root.rglob("*")))  # no run directory, .hydra/ or .lock


def test_ptq_runs_are_named_by_value_like_training_runs(tmp_path, digits_ckpt, capsys, monkeypatch):
    from qrepro.config import run_subdir

    cell = ["+experiment=symreg_digits_ours", "precision=w4a4"]
    # values in one spelling, explicit defaults (ptq.algorithm=aciq) and non-semantic keys (ptq.eval_fp) left out
    name = run_subdir([*cell, "ptq.algorithm=aciq", "ptq.calib_size=32", "ptq.eval_fp=false"], "ptq")
    assert name == run_subdir([*cell, "ptq.calib_size=32"], "ptq") == "precision=w4a4,ptq.calib_size=32"
    assert run_subdir([*cell, "ptq.lr_round=1e-2"], "ptq") == run_subdir([*cell, "ptq.lr_round=0.01"], "ptq")
    assert run_subdir([*cell, "ptq.algorithm=minmax"], "ptq") == "precision=w4a4,ptq.algorithm=minmax"
    # the command line's directory is that name (configs/ptq.yaml's run_subdir resolver)
    argv = [*cell, *FAST, f"out_root={tmp_path}", f"init_from={digits_ckpt}", "ptq.algorithm=minmax"]
    code, out, err = _ptq_main([*argv, "ptq.calib_size=32", "ptq.eval_fp=False"], capsys, monkeypatch)
    assert code == 0, err
    record = out.strip().splitlines()[-1].removeprefix("record: ")
    sub = run_subdir([*cell, *FAST, "ptq.algorithm=minmax", "ptq.calib_size=32"], "ptq")
    assert record == str(tmp_path / "symreg_digits_ours" / "ptq" / sub / "record.json")
    code, out, err = _ptq_main([*argv, "ptq.calib_size=3.2e1", "ptq.eval_fp=true"], capsys, monkeypatch)
    assert code == 2 and "ptq.calib_size=32.0 is invalid" in err  # a float is not an image count
    code, out, err = _ptq_main([*argv, "ptq.calib_size=32", "ptq.eval_fp=true"], capsys, monkeypatch)
    assert code == 0 and f"skip: {os.path.dirname(record)} already has a complete record" in out


# ------------------------------------------------------------------------------------------------ configs
def test_symreg_configs_are_generated_and_ptq_cells_compose(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    from qrepro.train import compose

    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(root / "scripts" / "gen_symreg_configs.py")], cwd=tmp_path)
    assert r.returncode == 0
    gen = sorted((tmp_path / "configs").rglob("*.yaml"))
    assert len(gen) > 40
    for p in gen:  # committed files == generator output (edit the generator, not the YAML)
        assert (root / p.relative_to(tmp_path)).read_text() == p.read_text(), p.name
    t = yaml.safe_load((root / "configs/table/symreg_table2a_r18.yaml").read_text())
    cells = {c["id"]: c for c in t["cells"]}
    assert len(cells) == 88 and sum(c["paper"] is not None for c in cells.values()) == 82
    assert cells["r18_qdrop_ours_kure_w3a3"]["paper"] == 67.47 and cells["r18_aciq_baseline_w4a4"]["paper"] == 38.46
    c = cells["r18_adaquant_kure_w2a32"]
    assert (
        c["paper"] == 62.21
        and c["paper_fp"] == 69.39
        and c["ptq"] == {"algorithm": "adaquant", "from_cell": "r18_kure_fp"}
    )
    cfg = compose([f"+experiment={c['experiment']}", *c["overrides"]], "ptq")
    assert cfg.ptq.algorithm == "adaquant" and (cfg.precision.w_bits, cfg.precision.a_bits) == (2, 32)
    assert cfg.quantizer.name == "kure" and cfg.optimizer.name == "asam_sgd"


@pytest.mark.parametrize("alg", ["aciq", "qdrop", "kmeans"])
def test_quantized_models_trace_without_graph_breaks(alg):
    torch._dynamo.reset()
    fp, calib = _model(), _calib(16)
    q = quantize_model(fp, calib, PTQConfig(algorithm=alg, w_bits=4, a_bits=4, iters=2, batch_size=8))
    compiled = torch.compile(q, backend="eager", fullgraph=True)
    assert torch.allclose(compiled(calib), q(calib))


def test_per_channel_weight_quantization():
    from qrepro.quant.calibrate import weight_alpha, weight_quantizer_for

    fp, calib = _model(), _calib(32)
    layer = fp[2][0].conv1
    with torch.no_grad():  # channels of different scales (where per-channel steps matter)
        layer.weight.mul_(torch.logspace(-1, 1, 8).view(8, 1, 1, 1))
    w = layer.weight.detach()

    wq = weight_quantizer_for(layer, 3, "midrise", "channel")
    assert wq.step.shape == (8, 1, 1, 1)
    amax = weight_alpha(wq, w, "minmax", "laplace")
    assert torch.allclose(amax.flatten(), w.abs().flatten(1).amax(1))
    err = {}
    for gran in ("tensor", "channel"):
        q = weight_quantizer_for(layer, 3, "midrise", gran)
        q.set_alpha(weight_alpha(q, w, "mse", "laplace"))
        err[gran] = (q(w) - w).square().sum().item()
        for c in range(8):  # every channel uses at most 2^3 levels
            assert q(w)[c].unique().numel() <= 8
    assert err["channel"] < 0.5 * err["tensor"]
    aciq = weight_alpha(wq, w, "aciq", "gaussian")
    ratio = optimal_clip_ratio(3, "gaussian")
    expect = torch.minimum(ratio * w.double().square().mean((1, 2, 3), keepdim=True).sqrt(), amax.double())
    assert torch.allclose(aciq.double(), expect, rtol=1e-5)
    for alg in ("adaquant", "qdrop"):
        cfg = PTQConfig(algorithm=alg, w_bits=3, a_bits=4, weight_granularity="channel", iters=3, batch_size=8)
        q = quantize_model(fp, calib, cfg)
        assert dict(quantized_layers(q))["2.0.conv1"].wq.step.shape == (8, 1, 1, 1)


# ------------------------------------------------------------------------------------------------ reference fidelity
# AdaQuant and QDrop follow their reference implementations (CalibTIP; wimh966/QDrop). The oracles below restate
# the reference maths independently, in float64, on tiny models, and are compared with quantize_model.
def _rnd(x: torch.Tensor) -> torch.Tensor:  # round with an identity gradient
    return x + (torch.round(x) - x).detach()


@pytest.fixture
def f64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _chain_model(bn: bool) -> nn.Sequential:
    torch.manual_seed(3)
    mods = [nn.Conv2d(2, 3, 3, padding=1)] + ([nn.BatchNorm2d(3)] if bn else []) + [nn.ReLU()]
    mods += [nn.Conv2d(3, 4, 3, padding=1)] + ([nn.BatchNorm2d(4)] if bn else []) + [nn.ReLU()]
    mods += [nn.Flatten(), nn.Linear(4 * 5 * 5, 5)]
    m = nn.Sequential(*mods).double()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.3, 0.3)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.2, 0.2)
    return m.eval()


def _calibtip_quant(x, rng, zp, bits):
    """CalibTIP quantize_with_grad (unsigned grid, zero point rounded to the grid): the reference formula."""
    qmax = 2**bits - 1
    scale = rng.clamp(1e-6, 1e5) / qmax
    zq = (0 - _rnd(0 - zp / scale).clamp(0, qmax)) * scale
    v = _rnd(((x + (0 * scale - zq)) / scale).clamp(0, qmax))
    return v * scale + (zq - 0 * scale)


def test_adaquant_matches_calibtip_reference_maths(f64):
    """Per layer, in order: per-channel asymmetric weights (range, zero point) from min/max, input range and
    zero point from the mean over images of each image's min/max; Adam on W (1e-5), b (1e-3), weight range +
    zero point (1e-3), input range + zero point (1e-1); batches of 50 distinct images; MSE after the layer's
    BatchNorm and the ReLU the network applies. Inputs from the quantized prefix, targets from the FP model."""
    fp, bits, iters, n = _chain_model(bn=True), 3, 6, 64
    calib = torch.randn(n, 2, 5, 5, generator=torch.Generator().manual_seed(4))
    cfg = PTQConfig(
        algorithm="adaquant", w_bits=bits, a_bits=bits, first_last_bits=None, iters=iters, seed=5, keep_best=False
    )
    q = quantize_model(fp, calib, cfg)

    # ---- oracle
    import copy

    ref = copy.deepcopy(fp)
    convs = [0, 3, 7]  # conv, conv, linear indices in the Sequential
    post = {0: lambda y: torch.relu(ref[1](y)), 3: lambda y: torch.relu(ref[4](y)), 7: lambda y: y}
    qp = {}
    for i in convs:
        w = ref[i].weight.detach().flatten(1)
        lo, hi = w.amin(1).clamp(max=0), w.amax(1).clamp(min=0)
        shape = (-1,) + (1,) * (ref[i].weight.dim() - 1)
        qp[i] = {"w_rng": (hi - lo).reshape(shape).clone(), "w_zp": lo.reshape(shape).clone()}
    with torch.no_grad():  # input statistics of the FP model
        acts, h = {}, calib
        for j, m in enumerate(ref):
            if j in convs:
                acts[j] = h.flatten(1)
            h = m(h)
    for i in convs[1:]:
        lo, hi = acts[i].amin(1).mean().clamp(max=0), acts[i].amax(1).mean().clamp(min=0)
        qp[i].update(a_rng=(hi - lo).clone(), a_zp=lo.clone())

    def qforward(upto: int, x: torch.Tensor) -> torch.Tensor:
        for j, m in enumerate(ref):
            if j == upto:
                return x
            if j in convs:
                p = qp[j]
                xin = _calibtip_quant(x, p["a_rng"], p["a_zp"], bits) if "a_rng" in p else x
                wq = _calibtip_quant(m.weight, p["w_rng"], p["w_zp"], bits)
                x = F.conv2d(xin, wq, m.bias, padding=1) if isinstance(m, nn.Conv2d) else F.linear(xin, wq, m.bias)
            else:
                x = m(x)
        return x

    gen = torch.Generator().manual_seed(5)
    for i in convs:
        m = ref[i]
        with torch.no_grad():
            x_in = qforward(i, calib)
            h = calib
            for j in range(i):
                h = fp[j](h)
            target = post[i](fp[i](h))
        p = qp[i]
        for t in p.values():
            t.requires_grad_(True)
        groups = [{"params": [m.weight], "lr": 1e-5}, {"params": [m.bias], "lr": 1e-3}]
        groups.append({"params": [p["w_rng"], p["w_zp"]], "lr": 1e-3})
        if "a_rng" in p:
            groups.append({"params": [p["a_rng"], p["a_zp"]], "lr": 1e-1})
        for g in groups:
            for t in g["params"]:
                t.requires_grad_(True)
        opt = torch.optim.Adam(groups)
        for _ in range(iters):
            idx = torch.randperm(n, generator=gen)[:50]
            x = x_in[idx]
            xin = _calibtip_quant(x, p["a_rng"], p["a_zp"], bits) if "a_rng" in p else x
            wq = _calibtip_quant(m.weight, p["w_rng"], p["w_zp"], bits)
            out = F.conv2d(xin, wq, m.bias, padding=1) if isinstance(m, nn.Conv2d) else F.linear(xin, wq, m.bias)
            loss = F.mse_loss(post[i](out), target[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        for t in [m.weight, m.bias, *p.values()]:
            t.requires_grad_(False)

    layers = dict(quantized_layers(q))
    for i in convs:
        lay = layers[str(i)]
        assert torch.allclose(lay.weight, ref[i].weight, rtol=0, atol=1e-12), i
        assert torch.allclose(lay.bias, ref[i].bias, rtol=0, atol=1e-12), i
        assert lay.wq.range.shape == qp[i]["w_rng"].shape  # one range per output channel
        assert torch.allclose(lay.wq.range, qp[i]["w_rng"], rtol=0, atol=1e-12), i
        assert torch.allclose(lay.wq.zero_point, qp[i]["w_zp"], rtol=0, atol=1e-12), i
        if i != 0:
            assert torch.allclose(lay.aq.range, qp[i]["a_rng"], rtol=0, atol=1e-12), i
            assert torch.allclose(lay.aq.zero_point, qp[i]["a_zp"], rtol=0, atol=1e-12), i
    with torch.no_grad():
        assert torch.allclose(q(calib), qforward(len(ref), calib), rtol=0, atol=1e-10)


def test_range_quantizer_is_calibtip_quantizer(f64):
    from qrepro.quant.quantizers import RangeQuantizer

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 3, 5, 5, generator=g) * 2).requires_grad_(True)
    rq = RangeQuantizer(3, channels=4, ndim=4)
    lo, hi = torch.tensor([-1.0, -0.3, 0.2, -2.0]), torch.tensor([1.5, 0.7, 2.0, -0.1])
    rq.set_bounds(lo.view(4, 1, 1, 1), hi.view(4, 1, 1, 1))
    assert rq.range.flatten().tolist() == pytest.approx([2.5, 1.0, 2.0, 2.0])  # lo <= 0 <= hi
    assert rq.zero_point.flatten().tolist() == pytest.approx([-1.0, -0.3, 0.0, -2.0])
    rq.range.requires_grad_(True)
    rq.zero_point.requires_grad_(True)
    y = rq(x)
    rng, zp = rq.range.detach().clone().requires_grad_(True), rq.zero_point.detach().clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    y_ref = _calibtip_quant(x2, rng, zp, 3)
    assert torch.equal(y, y_ref)
    for c in range(4):  # 2^3 asymmetric levels per channel
        assert y[c].unique().numel() <= 8
    gy = torch.randn(y.shape, generator=g)
    gs = torch.autograd.grad(y, (x, rq.range, rq.zero_point), gy)
    gr = torch.autograd.grad(y_ref, (x2, rng, zp), gy)
    for a, b in zip(gs, gr):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)
    rq.rescale_step(0.5)  # Fig. 5A: the step halves, the integer zero point stays
    assert torch.allclose(rq.range.detach().flatten(), torch.tensor([1.25, 0.5, 1.0, 1.0]))


def test_layer_post_ops_find_the_networks_bn_and_relu():
    from qrepro.ptq.core import layer_post_ops

    ops = layer_post_ops(_model())
    assert ops == {
        "0": (None, "relu"),
        "2.0.conv1": ("2.0.bn1", "relu"),
        "2.0.conv2": ("2.0.bn2", None),  # the block's ReLU acts on the sum with the shortcut
        "2.1.conv1": ("2.1.bn1", "relu"),
        "2.1.conv2": ("2.1.bn2", None),
        "5": (None, None),
    }
    assert layer_post_ops(_chain_model(bn=True))["3"] == ("4", "relu")


def _qdrop_lp_search(x: torch.Tensor, bits: int, p: float, per_channel: bool):
    """QDrop MSEObserver, brute force: returns (step, integer zero point) minimising mean |Q(x) − x|^p."""
    qmax = 2**bits - 1
    rows = x.flatten(1) if per_channel else x.reshape(1, -1)
    out = []
    for r in rows:
        lo, hi = r.min(), r.max()
        if per_channel:
            lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        one_sided = bool(x.min() >= 0)
        best = (math.inf, None)
        cands = []
        if one_sided:
            rng = torch.maximum(lo.abs(), hi)
            cands = [(torch.zeros(()), rng / 100 * i) for i in range(1, 101)]
        else:
            for i in range(1, 101):
                width = (hi - lo) / 100 * i
                d = (width - 0) / qmax
                cands += [(0 - z * d, width - z * d) for z in range(qmax + 1)]
        for a, b in cands:
            s = torch.clamp((torch.clamp(b, min=0) - torch.clamp(a, max=0)) / qmax, min=1e-8)
            z = torch.clamp(0 - torch.round(torch.clamp(a, max=0) / s), 0, qmax)
            err = ((torch.clamp(torch.round(r / s) + z, 0, qmax) - z) * s - r).abs().pow(p).mean().item()
            if err < best[0]:
                best = (err, (s, z))
        out.append(best[1])
    return torch.stack([o[0] for o in out]), torch.stack([o[1] for o in out])


def test_lp_observer_matches_brute_force_search(f64):
    from qrepro.quant.calibrate import lp_weight_bounds
    from qrepro.quant.quantizers import affine_qparams

    w = torch.randn(3, 2, 3, 3, generator=torch.Generator().manual_seed(0)) * torch.tensor([0.1, 1.0, 3.0]).view(
        3, 1, 1, 1
    )
    w[1] += 0.4  # an asymmetric channel
    for per_channel in (True, False):
        lo, hi = lp_weight_bounds(w, 3, per_channel, 2.4)
        s, z = affine_qparams(lo, hi, 3)
        s_ref, z_ref = _qdrop_lp_search(w, 3, 2.4, per_channel)
        assert torch.allclose(s.flatten(), s_ref, rtol=1e-12) and torch.equal(z.flatten(), z_ref)
    # activations: post-ReLU inputs (one-sided) through the PTQ init on a model
    fp, calib = _chain_model(bn=False), torch.randn(40, 2, 5, 5, generator=torch.Generator().manual_seed(1))
    cfg = PTQConfig(algorithm="qdrop", w_bits=3, a_bits=3, first_last_bits=None, iters=0)
    q = quantize_model(fp, calib, cfg)
    x = torch.relu(fp[0](calib))
    s_ref, z_ref = _qdrop_lp_search(x, 3, 2.4, False)
    aq = dict(quantized_layers(q))["2"].aq
    assert torch.allclose(aq.step.reshape(1), s_ref, rtol=1e-12) and float(aq.zero_point) == 0.0


def _qdrop_oracle(fp, calib, bits, iters, seed, lr_round, lr_act, drop):
    """wimh966/QDrop reconstruction of a chain of stand-alone layers (conv-ReLU, conv-ReLU, linear) with the
    reference maths: Lp-observer ranges, AdaRound on a per-channel asymmetric grid, LSQ activation step with
    gradient scale 1/sqrt(N·q_max) and a cosine-annealed lr, Σ_channels loss averaged over batch/positions,
    rounding loss from step 0.2·iters with β 20→2. Drop: element kept full precision with probability p."""
    import copy

    ref, qmax, zeta, gamma = copy.deepcopy(fp), 2**bits - 1, 1.1, -0.1
    ref.requires_grad_(False)
    convs, post = [0, 2, 5], {0: torch.relu, 2: torch.relu, 5: lambda y: y}
    wq = {i: _qdrop_lp_search(ref[i].weight, bits, 2.4, True) for i in convs}
    with torch.no_grad():
        x = torch.relu(ref[0](calib))
        s_a1, _ = _qdrop_lp_search(x, bits, 2.4, False)
        x = ref[3](torch.relu(ref[2](x)))
        s_a2, _ = _qdrop_lp_search(x, bits, 2.4, False)
    act = {2: s_a1.reshape(()).clone(), 5: s_a2.reshape(()).clone()}
    alpha = {}

    def wquant(i, soft=True):
        s, z = wq[i]
        s, z = s.view(-1, *([1] * (ref[i].weight.dim() - 1))), z.view(-1, *([1] * (ref[i].weight.dim() - 1)))
        h = ((zeta - gamma) * torch.sigmoid(alpha[i]) + gamma).clamp(0, 1) if soft else (alpha[i] >= 0).double()
        return (torch.clamp(torch.floor(ref[i].weight / s) + h + z, 0, qmax) - z) * s

    def aquant(i, x, training):
        s = act[i]
        g = 1.0 / math.sqrt(x.numel() * qmax)
        s = (s - s * g).detach() + s * g
        q = (torch.clamp(_rnd(x / s) + 0, 0, qmax) - 0) * s
        return torch.where(torch.rand_like(x) < drop, x, q) if training and drop > 0 else q

    def layer(i, x, training=False, soft=False):
        xin = aquant(i, x, training) if i in act else x
        w = wquant(i, soft)
        y = F.conv2d(xin, w, ref[i].bias) if i != 5 else F.linear(xin, w, ref[i].bias)
        return post[i](y) if i != 0 else torch.relu(y)

    def qforward(upto, x):
        for j in convs:
            if j == upto:
                return x
            x = layer(j, x)
            if j == 2:
                x = ref[4](x)
        return x

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    for i in convs:
        with torch.no_grad():
            x_in = qforward(i, calib)
            h = calib
            for j in range(i):
                h = fp[j](h)
            target = post[i](fp[i](h)) if i != 0 else torch.relu(fp[0](h))
            s, _ = wq[i]
            s = s.view(-1, *([1] * (ref[i].weight.dim() - 1)))
            rest = ref[i].weight / s - torch.floor(ref[i].weight / s)
            alpha[i] = (-torch.log((zeta - gamma) / (rest - gamma) - 1)).requires_grad_(True)
        groups = [{"params": [alpha[i]], "lr": lr_round}]
        if i in act:
            act[i].requires_grad_(True)
            groups.append({"params": [act[i]], "lr": lr_act})
        opt = torch.optim.Adam(groups)
        for it in range(iters):
            if i in act:
                opt.param_groups[1]["lr"] = lr_act * (1 + math.cos(math.pi * it / iters)) / 2
            idx = torch.randint(0, len(calib), (min(32, len(calib)),), generator=gen)
            out = layer(i, x_in[idx], training=True, soft=True)
            loss = (out - target[idx]).abs().pow(2).sum(1).mean()
            count = it + 1
            if count >= 0.2 * iters:
                b = 2 + 18 * max(0.0, 1 - (count - 0.2 * iters) / (iters - 0.2 * iters))
                hv = ((zeta - gamma) * torch.sigmoid(alpha[i]) + gamma).clamp(0, 1)
                loss = loss + 0.01 * (1 - ((hv - 0.5).abs() * 2).pow(b)).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if i in act:
                with torch.no_grad():
                    act[i].abs_().clamp_(min=torch.finfo(torch.float32).eps)
        alpha[i] = alpha[i].detach()
        if i in act:
            act[i] = act[i].detach()
    with torch.no_grad():
        return {i: alpha[i] for i in convs}, act, qforward(99, calib)


def test_qdrop_matches_reference_maths(f64):
    torch.manual_seed(0)
    fp = nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 3, 5)
    ).eval()
    calib = torch.randn(40, 2, 7, 7, generator=torch.Generator().manual_seed(1))
    bits, iters, seed = 3, 10, 7
    kw = dict(lr_round=1e-2, lr_act_step=1e-2, drop_prob=0.5)
    cfg = PTQConfig(algorithm="qdrop", w_bits=bits, a_bits=bits, first_last_bits=None, iters=iters, seed=seed, **kw)
    q = quantize_model(fp, calib, cfg)
    alpha, act, out = _qdrop_oracle(fp, calib, bits, iters, seed, 1e-2, 1e-2, 0.5)
    layers = dict(quantized_layers(q))
    for i in (0, 2, 5):
        assert torch.allclose(layers[str(i)].wq.v, alpha[i], rtol=0, atol=1e-10), i
    for i in (2, 5):
        assert torch.allclose(layers[str(i)].aq.step.reshape(()), act[i], rtol=0, atol=1e-12), i
    with torch.no_grad():
        assert torch.allclose(q(calib), out, rtol=0, atol=1e-10)
    assert isinstance(layers["2"].wq.zero_point, torch.Tensor) and layers["2"].wq.step.shape == (4, 1, 1, 1)


def test_qdrop_reconstruction_loss_weighs_channels_not_positions(f64, monkeypatch):
    """Σ over channels, mean over batch and positions: a block whose output has H·W = 25 positions gets a
    reconstruction loss 25× smaller than Σ over C·H·W would give (so it does not outweigh the rounding loss)."""
    import qrepro.ptq.core as core

    seen = []
    orig = core.AdaRoundWeight.round_loss

    def spy(self, beta):
        r = orig(self, beta)
        seen.append(r.detach())
        return r

    monkeypatch.setattr(core.AdaRoundWeight, "round_loss", spy)
    fp = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1)).eval()
    calib = torch.randn(8, 2, 5, 5, generator=torch.Generator().manual_seed(0))
    losses = []
    monkeypatch.setattr(core.torch.Tensor, "backward", lambda self, *a, **k: losses.append(self.detach()))
    cfg = PTQConfig(algorithm="qdrop", w_bits=2, a_bits=32, first_last_bits=None, iters=1, batch_size=8)
    cfg = dataclasses_replace(cfg, round_warmup=0.0)
    core.quantize_model(fp, calib, cfg)
    # the one step's loss = rec + 0.01·round: recompute rec from the initial AdaRound output
    q = core.prepare(core.fold_weight_transforms(__import__("copy").deepcopy(fp)), core.ptq_method(cfg.resolved()))
    core.init_quantizers(q, calib, cfg.resolved(), "lp")
    lay = q[0]
    ada = core.AdaRoundWeight(lay.wq, lay.weight)
    idx = torch.randint(0, 8, (8,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        err = (F.conv2d(calib[idx], ada(lay.weight), lay.bias, padding=1) - fp(calib[idx])).square()
    rec = err.sum(1).mean()
    assert losses[0].item() == pytest.approx(rec.item() + 0.01 * seen[0].item(), rel=1e-10)
    assert losses[0].item() != pytest.approx(err.flatten(1).sum(1).mean().item() + 0.01 * seen[0].item(), rel=1e-3)
