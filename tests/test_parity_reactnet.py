"""ReActNet-18 parity suite against the authors' code (../shared/reference/reactnet): PASS as configured, FAIL under
a wrong reading of the binarization (plain STE for the sign, one scale per tensor).

Measured on the shared 2-core CPU: ~18 s of CPU time for the passing run (step 2, 20 Adam steps, batch 4; most of
it is binarizing and stepping ReActNet-18's 11M float64 weights on both sides) and a few seconds per negative run.
"""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REFERENCE = SHARED / "reference" / "reactnet"
CIFAR = SHARED / "data" / "cifar10-jpeg.tar.gz"
needs_reference = pytest.mark.skipif(
    not (REFERENCE / "resnet" / "2_step2" / "birealnet.py").is_file() or not CIFAR.is_file(),
    reason="../shared/reference/reactnet or ../shared/data/cifar10-jpeg.tar.gz not present",
)


def _suite(**kw):
    pytest.importorskip("torchvision")  # the teacher (a torchvision ResNet-18) on both sides
    from qrepro.parity.reactnet import suite

    return suite(REFERENCE, data=CIFAR, batch=4, **kw)


@needs_reference
def test_reactnet_parity_passes():
    (report,) = _suite(steps=20, quick=True)
    assert report.title.startswith("ReActNet-18 W1A1 (step 2)")
    assert report.ok, report.render()
    names = " | ".join(row.name for row in report.rows)
    for what in ("1st step: grad", "loss of each of the 20 steps", "after 20 steps: param", "Adam exp_avg_sq"):
        assert what in names
    flips = int(report.notes[0].split(" of ")[0])
    assert flips > 0  # binary weights changed sign: the comparison is not vacuous


@needs_reference
@pytest.mark.parametrize(
    "override,failing_row",
    [
        ("quantizer.act_grad=ste", "1st step: grad"),  # the clipped identity instead of the polynomial's slope
        ("quantizer.weight_scale=tensor", "1st step: train-mode forward output"),  # one mean|W| per tensor
    ],
)
def test_reactnet_parity_fails_under_a_wrong_reading(override, failing_row):
    (report,) = _suite(steps=1, cells=("step2",), overrides=[override])
    assert not report.ok
    assert any(row.name.startswith(failing_row) and not row.ok for row in report.rows), report.render()


def test_reactnet_parity_refuses_a_wrong_reference(tmp_path):
    from qrepro.errors import QreproError
    from qrepro.parity.reactnet import suite

    with pytest.raises(QreproError, match="liuzechun/ReActNet"):
        suite(tmp_path)
