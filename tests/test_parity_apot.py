"""APoT parity suite (qrepro/parity/apot.py) against the authors' CIFAR-10 code, on their released checkpoints.

Skipped where ../shared (the authors' code, their checkpoints, CIFAR-10) is absent. The full grid (2, 3 and 4 bits,
20 steps) is ``python -m qrepro.parity apot``; here 2 bits (where alpha_w may cross 0) with a small batch.
"""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REFERENCE = SHARED / "reference" / "apot"
RELEASE = SHARED / "data" / "apot-cifar10-release"
CIFAR = SHARED / "data" / "cifar10-jpeg.tar.gz"

pytestmark = pytest.mark.skipif(
    not ((REFERENCE / "CIFAR10" / "models").is_dir() and RELEASE.is_dir() and CIFAR.exists()),
    reason="../shared/reference/apot, ../shared/data/apot-cifar10-release or CIFAR-10 not present",
)


def test_apot_parity_passes_at_2_bits():
    from qrepro.parity import run_suite

    reports = run_suite("apot", REFERENCE, quick=True, steps=20, batch=8, data=CIFAR, release=RELEASE)
    text = "\n\n".join(r.render() for r in reports)
    assert len(reports) == 1 and "W2A2" in reports[0].title and "10 steps" in reports[0].title, text
    rep = reports[0]
    assert rep.ok, text
    names = [r.name for r in rep.rows]
    for expected in (
        "step 1: train-mode forward output (logits)",
        "step 1: grad conv/fc",
        "step 1: BN stats bn",
        "alpha_w < 0: grad conv/fc",
        "after 10 steps: momentum alpha_w",
        "after 10 steps: BN stats bn",
        "after 10 steps: alpha_w layer2.0.shortcut.0",
    ):
        assert any(n.startswith(expected) for n in names), (expected, text)
    # the comparison is not vacuous: the models moved, and the rows compare tensors, not empty dicts
    assert "largest parameter change" in text and all(r.numel > 0 for r in rep.rows)


def test_apot_parity_fails_when_qrepro_deviates():
    """The clipped weight-gradient reading (``quantizer.w_grad=clipped``, not the authors' CIFAR code) must FAIL on
    the gradients while the forward still matches."""
    from qrepro.parity.apot import suite

    (rep,) = suite(
        REFERENCE, steps=1, bits=(3,), batch=8, data=CIFAR, release=RELEASE, overrides=["quantizer.w_grad=clipped"]
    )
    bad = {r.name.split(" (")[0] for r in rep.rows if not r.ok}
    assert not rep.ok, rep.render()
    assert "step 1: grad conv/fc" in bad, rep.render()
    assert all(r.ok for r in rep.rows if r.name.startswith(("step 1: train-mode", "step 1: loss", "normalised"))), (
        rep.render()
    )


def test_apot_parity_catches_a_weight_gradient_that_depends_on_the_sign_of_alpha(monkeypatch):
    """The earlier form of the straight-through weight gradient (the clip's gradient inside, plus 1 added back where
    |W| > alpha) agrees at the checkpoint's alpha_w > 0 but doubles the gradient inside the clip range once alpha_w
    is <= 0: the suite must FAIL on the negated-alpha_w rows only."""
    import torch

    from qrepro.parity.apot import suite
    from qrepro.quant import apot as qa

    def earlier_rcf_weight(w, alpha, magnitudes, *, grad="ste"):
        c = torch.clamp(w / alpha, -1.0, 1.0)
        q = qa.project_signed(c, magnitudes)
        out = alpha * (c + (q - c).detach())
        return out + (w - w.detach()) * (w.abs() > alpha).detach().to(w.dtype)

    monkeypatch.setattr(qa, "rcf_weight", earlier_rcf_weight)
    (rep,) = suite(REFERENCE, steps=1, bits=(2,), batch=8, data=CIFAR, release=RELEASE)
    bad = {r.name.split(" (")[0] for r in rep.rows if not r.ok}
    assert "alpha_w < 0: grad conv/fc" in bad, rep.render()
    assert not any(n.startswith("step 1:") for n in bad), rep.render()
