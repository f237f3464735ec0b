"""Mixed precision (``trainer.amp``) and channels-last (``trainer.channels_last``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from qrepro.errors import QreproError

DIGITS = ["+experiment=demo_digits_apot_w4a4", "model.width=4", "logger=none", "trainer.device=cpu"]
DIGITS += ["trainer.progress=false", "trainer.num_threads=1", "trainer.epochs=2"]


def _quantized(method: str, bits: int = 4, model_name: str = "small_cnn") -> nn.Module:
    from qrepro.models import build_model
    from qrepro.quant import build_method, prepare

    torch.manual_seed(0)
    model = build_model(model_name, num_classes=10, **({"width": 4} if model_name == "small_cnn" else {}))
    prepare(model, build_method(method, bits, bits))
    return model.train()


@pytest.mark.parametrize("method", ["apot", "sat", "tr"])
def test_fake_quantizers_run_in_float32_under_autocast(method):
    """Under bf16 autocast every weight and activation quantizer sees and returns float32 (its scaling, clipping
    and rounding are float32 arithmetic); only the convolutions run in bfloat16."""
    from qrepro.quant.layers import quantized_layers

    model = _quantized(method)
    seen: list[tuple[str, torch.dtype, torch.dtype]] = []
    for name, layer in quantized_layers(model):
        for q in (layer.wq, layer.aq):
            if q is not None:
                q.register_forward_hook(lambda m, a, o, n=name: seen.append((n, a[0].dtype, o.dtype)))
    x = torch.randn(8, 3, 32, 32)
    if method == "tr":
        from qrepro.quant.methods.tr import calibrate_scales

        calibrate_scales(model, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16  # the convolutions and the classifier ran in bf16
    assert seen and all(i == torch.float32 and o == torch.float32 for _, i, o in seen), seen


def test_act_quantizer_rounds_exactly_under_autocast():
    """The quantized activations under autocast are those of the float32 quantizer applied to the (bf16) input."""
    from qrepro.quant.layers import quantized_layers

    model = _quantized("apot")
    _, layer = [ly for ly in quantized_layers(model) if ly[1].aq is not None][0]
    x = torch.rand(4, layer.in_channels, 8, 8) * 3
    xb = x.to(torch.bfloat16)
    got = {}
    layer.aq.register_forward_hook(lambda m, a, o: got.update(out=o))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(xb)
    assert torch.equal(got["out"], layer.aq(xb.float()))


def test_amp_setting_is_validated():
    from qrepro.engine.precision import amp_mode

    assert [amp_mode(v) for v in ("off", False, None, "bf16", "fp16", "bfloat16")] == [
        "off",
        "off",
        "off",
        "bf16",
        "fp16",
        "bf16",
    ]
    with pytest.raises(QreproError, match="trainer.amp='fp8'"):
        amp_mode("fp8")


def _train(tmp_path, extra):
    from qrepro.config import run_subdir as override_dirname
    from qrepro.train import compose, train

    ov = DIGITS + extra
    cfg = compose(ov + [f"out_root={tmp_path}"])
    return train(cfg, run_dir=Path(tmp_path) / cfg.name / override_dirname(ov), overrides=ov)


def test_fp16_trains_with_loss_scaling_and_resumes_its_scale(tmp_path, monkeypatch):
    """fp16: the GradScaler's state is checkpointed with the run and restored on resume."""
    import qrepro.engine.trainer as tr

    orig = tr.Trainer.end_epoch

    def stop_after_first(self, epoch, t, t0):
        orig(self, epoch, t, t0)
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(tr.Trainer, "end_epoch", stop_after_first)
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path, ["trainer.amp=fp16"])
    monkeypatch.setattr(tr.Trainer, "end_epoch", orig)
    last = next(Path(tmp_path).glob("*/*/checkpoints/last.pt"))
    ck = torch.load(last, weights_only=True)
    assert ck["scaler"]["scale"] > 0 and "_growth_tracker" in ck["scaler"]
    loaded = []
    orig_load = torch.amp.GradScaler.load_state_dict
    monkeypatch.setattr(torch.amp.GradScaler, "load_state_dict", lambda s, d: (loaded.append(d), orig_load(s, d)))
    res = _train(tmp_path, ["trainer.amp=fp16", "resume=true"])
    assert loaded and loaded[0]["scale"] == ck["scaler"]["scale"]
    rec = res.record
    assert rec["complete"] and rec["config"]["trainer"]["amp"] == "fp16" and rec["segments"] == 2
    assert all(v == v for v in rec["curves"]["train_loss"])  # finite


@pytest.mark.parametrize("method", ["fp", "apot", "tr"])
def test_channels_last_step_matches_nchw(method):
    """channels_last changes the memory layout, not the step (float64: equal to rounding; a ResNet, since a
    max-pool over quantized activations may break exact ties differently in the two layouts)."""
    from qrepro.engine.fast import make_forward_loss
    from qrepro.engine.precision import channels_last, input_transform

    a, b = _quantized(method, model_name="resnet20").double(), _quantized(method, model_name="resnet20").double()
    channels_last(b)
    assert b.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(8, 3, 16, 16, dtype=torch.float64)
    y = torch.randint(0, 10, (8,))
    if method == "tr":
        from qrepro.quant.methods.tr import calibrate_scales

        calibrate_scales(a, x)
        calibrate_scales(b, x)
    ce = nn.functional.cross_entropy
    la, _ = make_forward_loss(a, ce)(x, y)
    lb, _ = make_forward_loss(b, ce, input_transform=input_transform(True))(x, y)
    la.backward()
    lb.backward()
    assert float(la) == pytest.approx(float(lb), rel=1e-12)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-9, atol=1e-12), n


def test_members_with_bf16(tmp_path):
    """Batched members under bf16 autocast: each member trains and writes its record."""
    results = _train(tmp_path, ["trainer.amp=bf16", "trainer.members=2", "trainer.epochs=1"])
    for r in results:
        rec = json.loads(Path(r.record_path).read_text())
        assert rec["complete"] and rec["config"]["trainer"]["amp"] == "bf16" and rec["members"]["size"] == 2
