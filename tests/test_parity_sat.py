"""``python -m qrepro.parity sat``: qrepro against the SAT authors' code (the reduced grid of --quick), float64.

Needs the authors' code and the CIFAR-10 copy next to the checkout (``../shared``); skipped without them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REF = SHARED / "reference" / "sat"
DATA = SHARED / "data" / "cifar10-jpeg.tar.gz"

pytestmark = pytest.mark.skipif(
    not (REF.is_dir() and DATA.is_file()), reason="needs ../shared/reference/sat and ../shared/data (CIFAR-10)"
)


def test_sat_parity_passes():
    from qrepro.parity import run_suite

    reports = run_suite("sat", REF, steps=20, quick=True, data=DATA)
    titles = [r.title for r in reports]
    assert len(reports) == 5 and any("sat_cifar_resnet20_4bit_sat" in t for t in titles)
    assert all(r.ok for r in reports), "\n\n".join(r.render() for r in reports)
    # the comparison is real: forward, gradients, clips, several steps and the optimizer state are all there
    rows = [row.name for r in reports for row in r.rows]
    for want in ("train logits (step 1)", "grad input", "grad alpha", "loss, steps 1..20", "momentum", "eval logits"):
        assert any(n.startswith(want) for n in rows), want


def test_sat_parity_fails_with_the_papers_variance():
    """The paper's VAR (mean of squares) instead of the authors' torch.std: the harness must say FAIL."""
    from qrepro.parity import run_suite

    reports = run_suite("sat", REF, steps=1, quick=True, data=DATA, quantizer={"variance": "mean_square"})
    assert not all(r.ok for r in reports)
    first = reports[0]  # modified levels at 2 bits: the factors differ by several per cent
    assert "modified" in first.title and not first.ok
    logits = next(row for row in first.rows if row.name == "train logits (step 1)")
    assert logits.max_rel > 1e-3
