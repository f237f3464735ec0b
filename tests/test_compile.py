"""The fast path (qrepro.engine.fast) computes what eager mode computes, for every registered quantizer.

Parametrized over ``method_names()``, so methods added later are covered without editing this file. CPU tests
use the ``aot_eager`` backend (Dynamo + AOTAutograd, the part of ``torch.compile`` that captures forward and
backward; Inductor's C++ compilation takes minutes on a CI CPU); the CUDA test checks the trainer's actual
GPU path (Inductor + CUDA graphs) and runs wherever a GPU is present.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from qrepro.bench import method_options
from qrepro.engine.fast import compile_forward_loss, compile_mode, make_forward_loss
from qrepro.errors import QreproError
from qrepro.hooks import Context
from qrepro.quant import build_method, prepare
from qrepro.quant.methods import method_names

# first precision (W=A) the method supports; 1 for binary-only methods (reactnet), 32 for FP-only ones (KURE...)
BITS_TRIED = (4, 2, 8, 3, 1, 32)


class TinyNet(nn.Module):
    """First conv, an inverted-residual-like block (depthwise conv, linear-bottleneck pointwise conv whose
    output goes negative, residual add), global pool and FC: the structures the methods' policies look at."""

    def __init__(self, c: int = 8, num_classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.pw = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))
        self.head = nn.Sequential(nn.Conv2d(c, 2 * c, 1, bias=False), nn.BatchNorm2d(2 * c), nn.ReLU())
        self.fc = nn.Linear(2 * c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = h + self.pw(self.dw(h))
        h = self.head(h).mean((2, 3))
        return self.fc(h)


def _ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits, y)


def _prepared(name: str, device: str = "cpu"):
    """(model, method, x, y) with the method's start-of-training hooks run, or pytest.skip with the reason."""
    torch.manual_seed(0)
    opts = method_options(name)
    errors = []
    for b, a in [(w, a) for w in BITS_TRIED for a in (w, 32)]:  # W=A, else weight-only (k-means: w{b}a32)
        try:
            method = build_method(name, b, a, **opts)
            break
        except QreproError as e:
            errors.append(str(e))
    else:
        pytest.skip(f"quantizer={name} accepts none of W=A in {BITS_TRIED}: {errors[-1]}")
    model = prepare(TinyNet(), method).to(device).train()
    x = torch.randn(6, 3, 8, 8, device=device)
    y = torch.randint(0, 5, (6,), device=device)
    ctx = Context(model=model, sample_batch=(x, y), data=None)
    for h in method.hooks:
        h.on_train_start(ctx)
    return model, method, x, y


def _run(fn, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    loss, correct = fn(x, y)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach().clone(), correct.clone(), grads


def _compare(name: str, eager, compiled, rtol: float, atol: float) -> None:
    (le, ce, ge), (lc, cc, gc) = eager, compiled
    torch.testing.assert_close(lc, le, rtol=rtol, atol=atol, msg=lambda m: f"{name} loss: {m}")
    assert int(cc) == int(ce), name
    assert ge.keys() == gc.keys(), f"{name}: different parameters received gradients"
    assert ge, f"{name}: no parameter received a gradient"
    for k in ge:
        torch.testing.assert_close(gc[k], ge[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{name} grad {k}: {m}")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()  # every test compiles the same inner function of make_forward_loss
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("name", method_names())
def test_compiled_matches_eager(name: str) -> None:
    """Loss, accuracy count and every parameter gradient agree between eager and compiled (aot_eager)."""
    model, method, x, y = _prepared(name)
    twin = copy.deepcopy(model)  # same weights, buffers and calibrated quantizer state
    eager = _run(make_forward_loss(model, _ce, method.regularizer), model, x, y)
    fn = compile_forward_loss(make_forward_loss(twin, _ce, method.regularizer), "default", backend="aot_eager")
    compiled = _run(fn, twin, x, y)
    _compare(name, eager, compiled, rtol=1e-5, atol=1e-6)
    for (k, b1), b2 in zip(model.named_buffers(), twin.buffers()):  # BN statistics and quantizer state
        if b1.is_floating_point():
            torch.testing.assert_close(b2, b1, rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{name} buffer {k}: {m}")
        else:
            assert torch.equal(b1, b2), f"{name} buffer {k}"


@pytest.mark.parametrize("name", method_names())
def test_no_graph_breaks(name: str) -> None:
    """The train-step forward (model + loss + regularizer) is one graph: a break would split CUDA-graph
    capture and fusion. ``fullgraph=True`` raises on any break, naming the offending line."""
    model, method, x, y = _prepared(name)
    fn = torch.compile(make_forward_loss(model, _ce, method.regularizer), backend="eager", fullgraph=True)
    loss, _ = fn(x, y)
    loss.backward()
    expl = torch._dynamo.explain(make_forward_loss(model, _ce, method.regularizer))(x, y)
    assert expl.graph_break_count == 0, f"{name}: {expl.break_reasons}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the trainer's GPU path (Inductor + CUDA graphs) needs CUDA")
@pytest.mark.parametrize("name", method_names())
def test_cuda_graphs_match_eager(name: str) -> None:
    """On GPU: the trainer's default fast path (Inductor, reduce-overhead) over three steps agrees with eager
    (Inductor may reorder float sums, so a value on a rounding boundary can move: looser tolerance)."""
    model, method, x, y = _prepared(name, "cuda")
    twin = copy.deepcopy(model)
    mode = compile_mode("auto", torch.device("cuda"))
    fn = compile_forward_loss(make_forward_loss(twin, _ce, method.regularizer), mode)
    eager_fn = make_forward_loss(model, _ce, method.regularizer)
    for _ in range(3):  # warm-up, record, replay
        for m in (model, twin):
            m.zero_grad(set_to_none=True)
        eager = _run(eager_fn, model, x, y)
        compiled = _run(fn, twin, x, y)
    _compare(name, eager, compiled, rtol=1e-3, atol=1e-4)


def test_compile_mode() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert compile_mode("auto", cpu) is None
    assert compile_mode("auto", cuda) == "reduce-overhead"
    assert compile_mode(True, cpu) == "default"
    assert compile_mode(True, cuda) == "reduce-overhead"
    assert compile_mode(False, cuda) is None
    assert compile_mode(None, cuda) is None
    assert compile_mode("max-autotune-no-cudagraphs", cpu) == "max-autotune-no-cudagraphs"
    with pytest.raises(QreproError, match="trainer.compile"):
        compile_mode("fast", cpu)


def test_graph_break_check_can_fail() -> None:
    """The check above catches a quantizer with a data-dependent Python branch (host sync + graph break)."""

    class Branchy(nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return w.round() if w.abs().max().item() > 0 else w

    fn = torch.compile(lambda w: Branchy()(w), backend="eager", fullgraph=True)
    with pytest.raises(Exception, match="(?i)graph break|data-dependent|item"):
        fn(torch.randn(4))


def test_ema_multi_tensor_update_matches_per_tensor() -> None:
    """EMA.update (multi-tensor lerp/copy) equals the per-tensor rule, BN buffers and counters included."""
    from qrepro.engine.ema import EMA

    torch.manual_seed(0)
    model = TinyNet()
    ema = EMA(model, 0.9)
    ref = copy.deepcopy(ema.module)
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model(torch.randn(4, 3, 8, 8))  # BN running statistics and num_batches_tracked move
        ema.update(model)
        for r, m in zip(ref.state_dict().values(), model.state_dict().values()):
            r.lerp_(m, 0.1) if r.dtype.is_floating_point else r.copy_(m)
    for (k, a), b in zip(ema.module.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), k


def test_trainer_fast_path_trains_like_eager(tmp_path, monkeypatch) -> None:
    """``trainer.compile=true`` routes the step through ``compile_forward_loss`` (here with the aot_eager
    backend: Inductor's C++ build is too slow for CI) and trains exactly like eager mode on digits + SAT."""
    import qrepro.engine.fast as fast
    from qrepro.train import compose, train

    if "sat" not in method_names():
        pytest.skip("needs a quantizer with learnable parameters (sat)")
    calls = []
    original = fast.compile_forward_loss

    def aot_eager(fn, mode, backend="inductor"):
        calls.append(mode)
        return original(fn, mode, backend="aot_eager")

    monkeypatch.setattr(fast, "compile_forward_loss", aot_eager)
    common = ["logger=none", "trainer.progress=false", "model.width=4", "trainer.epochs=1", "trainer.log_every=5"]
    common += ["quantizer=sat", "precision=w4a4", "trainer.batch_size=128"]
    recs = {}
    for setting in ("false", "true"):
        extra = [*common, f"trainer.compile={setting}"]
        recs[setting] = train(compose(extra), run_dir=tmp_path / setting, experiment="unit", overrides=extra).record
    assert calls == ["default"]  # true on CPU -> mode "default"; false -> never compiled
    for key in ("train_loss", "train_top1", "test_loss", "test_top1"):
        assert recs["true"]["curves"][key] == pytest.approx(recs["false"]["curves"][key], rel=1e-5, abs=1e-6), key
