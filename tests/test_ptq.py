"""Post-training quantization: ACIQ maths, quantizers, level sets and the PTQ algorithms on a small model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate, optimize, stats
from torch import nn

from qrepro.errors import QreproError
from qrepro.ptq.aciq import aciq_alpha, clip_mse, fit_scale, optimal_clip_ratio
from qrepro.ptq.core import PTQConfig, find_blocks, fold_weight_transforms, quantize_model
from qrepro.ptq.levels import kmeans_levels, pot_levels, project
from qrepro.ptq.quantizers import AdaRoundWeight, LevelQuantizer, UniformQuantizer
from qrepro.quant import build_method, prepare
from qrepro.quant.layers import quantized_layers

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
    for alg, extra in [
        ("minmax", {}),
        ("aciq", {}),
        ("adaquant", dict(iters=60, init="minmax", lr_weight=1e-3, lr_step=1e-2)),
        ("qdrop", dict(iters=120, init="minmax", lr_act_step=1e-3, lr_round=1e-2)),
    ]:
        q = quantize_model(fp, calib, PTQConfig(algorithm=alg, **kw, **extra))
        err[alg] = _out_mse(q, fp, test_x)
    assert err["adaquant"] < 0.8 * err["minmax"], err
    assert err["qdrop"] < 0.8 * err["minmax"], err
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
    from qrepro.ptq.core import weight_alpha, weight_quantizer_for

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
