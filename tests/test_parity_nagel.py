"""Nagel et al. parity suite against the authors' quantizer code (../shared/reference/oscillations-qat): PASS as
configured (dampening and freezing, 20 steps, weights frozen within them), FAIL under a wrong reading."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REFERENCE = SHARED / "reference" / "oscillations-qat"
CIFAR = SHARED / "data" / "cifar10-jpeg.tar.gz"
needs_reference = pytest.mark.skipif(
    not (REFERENCE / "utils" / "oscillation_tracking_utils.py").is_file() or not CIFAR.is_file(),
    reason="../shared/reference/oscillations-qat or ../shared/data/cifar10-jpeg.tar.gz not present",
)


def _suite(**kw):
    for mod in ("timm", "scipy", "click"):  # imported by the authors' modules
        pytest.importorskip(mod)
    from qrepro.parity.nagel import suite

    return suite(REFERENCE, data=CIFAR, batch=4, **kw)


@needs_reference
def test_nagel_parity_passes():
    damp, freeze = _suite(steps=20)
    for r in (damp, freeze):
        assert r.ok, r.render()
    names = " | ".join(row.name for row in freeze.rows)
    for what in ("initial scales", "freezing threshold of each step", "oscillation frequency EMA", "frozen mask"):
        assert what in names
    assert "dampening weight λ of each step" in " | ".join(row.name for row in damp.rows)
    # not vacuous: weights oscillated and some were frozen within the compared steps
    n_frozen = int(freeze.notes[0].split(" weights frozen")[0].split(", ")[-1])
    assert n_frozen > 0, freeze.notes


@needs_reference
@pytest.mark.parametrize(
    "cell,override,failing_row",
    [
        ("freeze", "quantizer.freeze_use_ema=false", "frozen integers"),  # freeze at the current integer, not the EMA
        ("damp", "quantizer.damp_aggregation=sum", "loss"),  # sum instead of the authors' kernel_mean
    ],
)
def test_nagel_parity_fails_under_a_wrong_reading(cell, override, failing_row):
    (report,) = _suite(steps=8, cells=(cell,), overrides=[override])  # freezing and λ > 0 start after step 5
    assert not report.ok
    assert any(row.name.startswith(failing_row) and not row.ok for row in report.rows), report.render()
