"""AdaQuant ``keep_best``: each layer ends at the iterate with the lowest MSE over all calibration images, so
never worse than where it started; without it (the reference's last iterate) a large input-range learning rate
can drive a range below zero, after which its gradient is zero (the W2A2 digits collapse, docs/symreg.md)."""

from __future__ import annotations

import torch
from torch import nn

from qrepro.ptq import core
from qrepro.ptq.core import PTQConfig, quantize_model
from qrepro.quant.layers import quantized_layers


def _run(keep_best: bool, monkeypatch, lr_act: float = 5.0):
    """Quantize a tiny float64 network; returns the quantized model and, per layer, the arguments of its
    loss and every calibration MSE measured while it was optimised."""
    seen: dict[int, tuple] = {}
    values: dict[int, list[float]] = {}
    real = core._calib_mse

    def spy(layer, post, x_in, target, chunk):
        seen.setdefault(id(layer), (layer, post, x_in, target, chunk))
        value = real(layer, post, x_in, target, chunk)
        values.setdefault(id(layer), []).append(value)
        return value

    monkeypatch.setattr(core, "_calib_mse", spy)
    torch.manual_seed(0)
    fp = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 5 * 5, 3),
    ).double().eval()  # fmt: skip
    calib = torch.rand(40, 2, 5, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    cfg = PTQConfig(
        algorithm="adaquant", w_bits=2, a_bits=2, first_last_bits=None, iters=30, batch_size=8,
        lr_act_qparams=lr_act, keep_best=keep_best, seed=0,
    )  # fmt: skip
    q = quantize_model(fp, calib, cfg)
    monkeypatch.setattr(core, "_calib_mse", real)
    return q, seen, values


def test_keep_best_ends_each_layer_at_its_best_checked_iterate(monkeypatch):
    q, seen, values = _run(True, monkeypatch)
    assert len(seen) == 3
    for key, (layer, post, x_in, target, chunk) in seen.items():
        checked = values[key]
        assert len(checked) == 1 + 10  # the start, then every iters/10 = 3 steps
        final = core._calib_mse(layer, post, x_in, target, chunk)
        assert abs(final - min(checked)) <= 1e-12 * max(1.0, final)
        assert final <= checked[0]


def test_last_iterate_can_leave_an_input_range_dead(monkeypatch):
    """The failure keep_best guards against: with the reference's last iterate and a large input-range lr, a
    range ends at or below the clamp (1e-6), where its gradient is zero and every input quantizes alike."""
    q_last, _, values = _run(False, monkeypatch)
    assert values == {}  # keep_best=false measures nothing extra
    ranges = [float(layer.aq.range.min()) for _, layer in quantized_layers(q_last) if layer.aq is not None]
    assert min(ranges) <= 1e-6
