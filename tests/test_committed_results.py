"""`make tables` regenerates the committed tables from the committed records (no network, no runs/ needed)."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_committed_tables_regenerate_identically(tmp_path):
    out = tmp_path / "tables"
    p = subprocess.run(
        [sys.executable, "-m", "qrepro.tables", "--all", "--runs", "results/records", "--out", str(out),
         "--figures", str(tmp_path / "figures"), "--readme", str(tmp_path / "README.md"), "--verify"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    committed = sorted((ROOT / "results" / "tables").glob("*.md"))
    assert committed, "no committed tables"

    def strip_links(text: str) -> str:  # link targets are relative to the output folder
        return re.sub(r"\]\([^)]*\)", "]()", text)

    for f in committed:
        new, old = strip_links((out / f.name).read_text()), strip_links(f.read_text())
        assert new == old, f"{f.name} differs from its regeneration"
