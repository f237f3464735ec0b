"""How many of the numbers printed in the papers' tables have a runnable cell, computed from the table files.

The counting rule (one *number* = one accuracy value the paper prints in a table) is in docs/architecture.md,
"Tables" ("Coverage"). A number *has a runnable cell* when its row is runnable (a ``paper_fp`` number: when its FP
row is); every other number is grouped by its row's ``why`` and the row's method.
"""

from __future__ import annotations

import argparse
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from qrepro.errors import QreproError, report
from qrepro.tables.schema import Cell, Table, default_configs, load_table, table_paths

NO_FP_ROW = "the FP value has no row of its own in the table"


@dataclass(frozen=True)
class Number:
    """One accuracy value printed in a paper table."""

    table: str
    cell: str
    column: str  # the metric (top1/top5/AP...) or "fp"
    value: float
    runnable: bool
    why: str | None  # why it has no runnable cell (None when it has one)
    method: str


@dataclass
class Coverage:
    numbers: list[Number] = field(default_factory=list)
    stale: list[tuple[str, str]] = field(default_factory=list)  # (table, cell): a why on a runnable row

    @property
    def total(self) -> int:
        return len(self.numbers)

    @property
    def runnable(self) -> int:
        return sum(n.runnable for n in self.numbers)

    def missing(self) -> dict[str, Counter]:
        """why -> Counter(method -> numbers), largest reason first."""
        out: dict[str, Counter] = defaultdict(Counter)
        for n in self.numbers:
            if not n.runnable:
                out[n.why or "no reason given"][n.method] += 1
        return dict(sorted(out.items(), key=lambda kv: (-sum(kv[1].values()), kv[0])))

    def by_table(self) -> dict[str, tuple[int, int]]:
        """table -> (numbers, numbers with a runnable cell), in table order."""
        runnable = Counter(n.table for n in self.numbers if n.runnable)
        return {t: (k, runnable[t]) for t, k in Counter(n.table for n in self.numbers).items()}


def _why(cell: Cell) -> str | None:
    return None if cell.runnable else (cell.why or "no reason given")


def table_numbers(table: Table) -> list[Number]:
    """The numbers ``table`` transcribes from its paper, by the counting rule of this module."""
    if table.extra.get("same_numbers_as"):
        return []
    out: list[Number] = []
    copied = set(table.extra.get("copied_rows") or ())
    seen_fp: set[tuple[str, str, str, float]] = set()
    for c in table.cells:
        if c.id in copied:
            continue
        if c.paper is not None:
            out.append(Number(table.name, c.id, table.metric, c.paper, c.runnable, _why(c), c.method))
        for key, value in c.extra.items():
            if key.startswith("paper_") and isinstance(value, (int, float)) and not isinstance(value, bool):
                out.append(Number(table.name, c.id, key[6:], float(value), c.runnable, _why(c), c.method))
        if c.paper_fp is None:
            continue
        fp = table.cell(c.fp_cell) if c.fp_cell else None
        if fp is not None and fp.paper == c.paper_fp:
            continue
        key = (c.model, c.dataset, c.method, c.paper_fp)
        if key in seen_fp:
            continue
        seen_fp.add(key)
        runnable = fp is not None and fp.runnable
        why = None if runnable else (_why(fp) if fp is not None else NO_FP_ROW)
        out.append(Number(table.name, c.id, "fp", c.paper_fp, runnable, why, "FP"))
    return out


def coverage(tables: Iterable[Table]) -> Coverage:
    cov = Coverage()
    for t in tables:
        cov.numbers += table_numbers(t)
        cov.stale += [(t.name, c.id) for c in t.cells if c.why is not None and c.runnable]
    return cov


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.0f} %" if whole else "—"


def coverage_line(cov: Coverage) -> str:
    """``Coverage: <n> of <total> numbers printed in the papers' tables (<%>) have a runnable cell; <k> do not:
    <count> <why>; ...`` (reasons largest first)."""
    head = (
        f"Coverage: {cov.runnable} of {cov.total} numbers printed in the papers' tables "
        f"({_pct(cov.runnable, cov.total)}) have a runnable cell"
    )
    missing = cov.missing()
    if not missing:
        return head + "."
    parts = [f"{sum(c.values())} {why}" for why, c in missing.items()]
    return f"{head}; {cov.total - cov.runnable} do not: " + "; ".join(parts) + "."


def coverage_markdown(cov: Coverage) -> str:
    """The breakdown: per table, and the missing numbers by reason and method."""
    lines = [coverage_line(cov), "", "| table | numbers | runnable | missing |", "|---|---|---|---|"]
    for name, (n, r) in cov.by_table().items():
        lines.append(f"| {name} | {n} | {r} | {n - r} |")
    missing = cov.missing()
    if missing:
        lines += ["", "| why not runnable | method | numbers |", "|---|---|---|"]
        for why, methods in missing.items():
            text = why.replace("|", "\\|")
            for method, k in sorted(methods.items(), key=lambda kv: (-kv[1], kv[0])):
                lines.append(f"| {text} | {method} | {k} |")
    if cov.stale:
        lines += ["", "Rows with a `why` whose experiment now exists (runnable; drop the `why`): "]
        lines[-1] += ", ".join(f"{t}/{c}" for t, c in cov.stale)
    return "\n".join(lines) + "\n"


BEGIN = "<!-- coverage:begin (generated by `make tables`) -->"
END = "<!-- coverage:end -->"


def replace_block(path: str | Path, begin: str, end: str, body: str) -> bool:
    """Rewrite the text between the ``begin`` and ``end`` markers of a file (if it has them) with ``body``, a blank
    line either side. Returns whether it wrote."""
    path = Path(path)
    if not path.exists():
        return False
    text = path.read_text(encoding="utf-8")
    if begin not in text or end not in text:
        return False
    head, rest = text.split(begin, 1)
    path.write_text(f"{head}{begin}\n\n{body}\n\n{end}{rest.split(end, 1)[1]}", encoding="utf-8")
    return True


def update_readme_coverage(path: str | Path, cov: Coverage) -> bool:
    """Rewrite the block between the coverage markers of a README (if it has them) with the coverage line and the
    per-reason breakdown. Returns whether it wrote."""
    return replace_block(path, BEGIN, END, coverage_markdown(cov).rstrip("\n"))


def load_coverage(configs: str | Path | None = None) -> Coverage:
    """Coverage of every ``<configs>/table/*.yaml`` (default: the config root the table commands use)."""
    return coverage(load_table(p) for p in table_paths(configs or default_configs()))


def main(argv: Sequence[str] | None = None) -> int:
    """``qrepro-table coverage [--configs DIR]``: the coverage line, per table, and the missing numbers by reason."""
    p = argparse.ArgumentParser(prog="qrepro-table coverage", description=main.__doc__)
    p.add_argument("--configs", default=default_configs(), help="config root holding table/ and experiment/")
    args = p.parse_args(argv)
    try:
        print(coverage_markdown(load_coverage(args.configs)), end="")
    except QreproError as exc:
        return report(exc)
    return 0
