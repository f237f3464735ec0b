"""The project stands on its own: nothing a user reads (README, docs, configs, code and its messages, scripts,
committed results) points at files outside the project (a ``../shared`` folder, paper text files, private notes)
or says what was "not available" instead of what was measured where."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = re.compile(
    r"\.\./shared|/work/shared|\bpapers/[\w.-]+\.md|REFERENCE\.md|not available here|no GPU was available",
    re.IGNORECASE,
)


def _product_files() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "Makefile", ROOT / "pyproject.toml"]
    for folder, pattern in (("docs", "*.md"), ("configs", "*.yaml"), ("qrepro", "*.py"), ("scripts", "*")):
        files += [p for p in (ROOT / folder).rglob(pattern) if p.is_file() and "__pycache__" not in p.parts]
    files += [p for p in (ROOT / "results").rglob("*") if p.suffix in (".md", ".txt", ".json", ".csv")]
    return files


def test_no_reference_outside_the_project():
    hits = []
    for path in _product_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        for i, line in enumerate(text.splitlines(), 1):
            if FORBIDDEN.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()[:100]}")
    assert not hits, "\n".join(hits)
