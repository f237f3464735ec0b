"""Paper vs ours, cell by cell: aggregation over seeds, differences and the tolerance verdict.

Verdict rule (printed in every generated table; docs/results_section.md, "Verdict rule"): the basis is the
FP-difference ``gap = (ours − our FP) − (paper − paper FP)`` when the cell names an ``fp_cell`` that has records and
the paper's FP value is known (``paper_fp``, else the FP cell's ``paper``), else ``ours − paper``; ``pass`` when
``|basis| <= tolerance`` (a 1e-9 slack absorbs float round-off), ``fail`` otherwise, in either direction.
``missing`` / ``diverged`` / ``n/a`` / ``paper only``: no complete record / only diverged runs / no paper number /
a row not runnable here.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from qrepro.errors import QreproError
from qrepro.tables.records import Record, canonical_overrides, match_cell
from qrepro.tables.schema import SELECTIONS, Cell, Table

EPS = 1e-9
CHANCE_MARGIN = 2.0  # points above chance (100·k/num_classes for top-k) still counted as chance level
PASS, FAIL, MISSING, NA, DIVERGED, PAPER_ONLY = "pass", "fail", "missing", "n/a", "diverged", "paper only"


@dataclass(frozen=True)
class Stats:
    """Mean, sample standard deviation (None for a single seed) and count over seeds."""

    mean: float | None
    std: float | None
    n: int

    @staticmethod
    def of(values: Sequence[float]) -> Stats:
        if not values:
            return Stats(None, None, 0)
        std = statistics.stdev(values) if len(values) > 1 else None
        return Stats(statistics.fmean(values), std, len(values))


@dataclass(frozen=True)
class Row:
    cell: Cell
    records: tuple[Record, ...]  # the complete records the values come from
    ours: Stats
    paper_fp: float | None  # the paper's FP value for this row (paper_fp, else the FP cell's paper value)
    ours_fp: float | None  # mean of our FP cell
    diff: float | None  # ours − paper
    paper_dfp: float | None  # paper − paper FP
    ours_dfp: float | None  # ours − our FP
    gap: float | None  # ours_dfp − paper_dfp
    basis: str | None  # "dFP" | "abs" | None
    verdict: str
    diverged: tuple[Record, ...] = ()  # diverged runs of the cell (no values)
    select: str | None = None  # best | last: which value of each record the row shows
    other: Stats = Stats(None, None, 0)  # ours on the other metric (top-5 for a top-1 table), no verdict
    metric: str = "top1"  # the table's metric
    elsewhere: tuple[Record, ...] = ()  # complete runs of the cell's experiment under other overrides (not counted)

    @property
    def chance(self) -> float | None:
        """The accuracy of guessing (100·k/num_classes for top-k) when the records name their class count."""
        counts = {r.num_classes for r in self.records} - {None}
        if len(counts) != 1:
            return None
        k = 5 if self.metric == "top5" else 1
        return min(100.0, 100.0 * k / counts.pop())

    @property
    def at_chance(self) -> bool:
        """Every seed of the cell sits at chance level (within ``CHANCE_MARGIN`` points): never a plain number."""
        values = cell_values(self.records, self.select, self.metric) if self.select else []
        return self.chance is not None and bool(values) and max(values) <= self.chance + CHANCE_MARGIN

    @property
    def paper_other(self) -> float | None:
        """The paper's value on the other metric, when transcribed (``paper_top5`` / ``paper_top1``)."""
        value = self.cell.extra.get(f"paper_{other_metric(self.metric)}")
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def other_metric(metric: str) -> str:
    return "top5" if metric == "top1" else "top1"


def within(value: float, tolerance: float) -> bool:
    """``|value| <= tolerance``; exactly at the tolerance passes."""
    return abs(value) <= tolerance + EPS


def _sub(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def cell_values(records: Sequence[Record], select: str, metric: str) -> list[float]:
    return [v for v in (r.metric(select, metric) for r in records) if v is not None]


def compare(
    table: Table, records: Sequence[Record], select: str | None = None, *, extra_overrides: Sequence[str] = ()
) -> list[Row]:
    """One :class:`Row` per cell, in the table's order. ``select`` defaults to what the paper reports;
    ``extra_overrides`` are added to every cell's overrides (runs made with them count as the cell)."""
    select = select or table.reported
    if select not in SELECTIONS:
        raise QreproError(f"--select must be one of {', '.join(SELECTIONS)}, got {select!r}")
    hits = {c.id: match_cell(c, records, extra_overrides=extra_overrides) for c in table.cells}
    matched = {cid: tuple(r for r in recs if r.complete) for cid, recs in hits.items()}
    stats = {cid: Stats.of(cell_values(recs, select, table.metric)) for cid, recs in matched.items()}
    other = other_metric(table.metric)
    rows = []
    for c in table.cells:
        ours = stats[c.id]
        fp = table.cell(c.fp_cell) if c.fp_cell else None
        paper_fp = c.paper_fp if c.paper_fp is not None else (fp.paper if fp is not None else None)
        ours_fp = stats[fp.id].mean if fp is not None else None
        diff = _sub(ours.mean, c.paper)
        paper_dfp = _sub(c.paper, paper_fp)
        ours_dfp = _sub(ours.mean, ours_fp)
        gap = _sub(ours_dfp, paper_dfp)
        diverged = tuple(r for r in hits[c.id] if r.diverged)
        if not c.runnable:
            basis, verdict = None, PAPER_ONLY
        elif ours.n == 0:
            basis, verdict = None, DIVERGED if diverged and not matched[c.id] else MISSING
        elif c.paper is None:
            basis, verdict = None, NA
        elif gap is not None:
            basis, verdict = "dFP", PASS if within(gap, table.tolerance) else FAIL
        else:
            basis, verdict = "abs", PASS if within(diff, table.tolerance) else FAIL
        rows.append(
            Row(
                c,
                matched[c.id],
                ours,
                paper_fp,
                ours_fp,
                diff,
                paper_dfp,
                ours_dfp,
                gap,
                basis,
                verdict,
                diverged,
                select,
                Stats.of(cell_values(matched[c.id], select, other)),
                table.metric,
                elsewhere(c, records, extra_overrides, table) if ours.n == 0 else (),
            )
        )
    return rows


def elsewhere(
    cell: Cell, records: Sequence[Record], extra_overrides: Sequence[str], table: Table
) -> tuple[Record, ...]:
    """Complete records of the cell's experiment (a cell of ``table``) whose overrides are no cell's of ``table``
    (e.g. a smaller batch): they do not count as the cell, but a reader should hear that they exist."""
    claimed = {
        canonical_overrides(list(c.overrides) + list(extra_overrides))
        for c in table.cells
        if c.experiment == cell.experiment
    }
    return tuple(r for r in records if r.complete and r.experiment == cell.experiment and r.canonical() not in claimed)


def override_diff(cell: Cell, record: Record) -> tuple[list[str], list[str]]:
    """(assignments the record has beyond the cell's, the cell's assignments the record lacks), as overrides."""
    have, want = record.canonical(), canonical_overrides(cell.overrides)

    def text(items: frozenset) -> list[str]:
        return sorted(f"~{k}" if kind == "del" else f"{k}={_value_text(v)}" for kind, k, v in items)

    return text(have - want), text(want - have)


def _value_text(value_json: str) -> str:
    value = json.loads(value_json)
    return value if isinstance(value, str) else json.dumps(value)


def failures(rows: Sequence[Row]) -> list[Row]:
    """Cells that miss the paper: outside tolerance, or diverged where the paper has a number."""
    return [r for r in rows if r.verdict == FAIL or (r.verdict == DIVERGED and r.cell.paper is not None)]


def summary(rows: Sequence[Row]) -> str:
    """``'5/8 cells present: 4 pass, 1 fail, 3 missing'`` (n/a counted when present)."""
    count = {v: sum(r.verdict == v for r in rows) for v in (PASS, FAIL, MISSING, NA, DIVERGED, PAPER_ONLY)}
    present = len(rows) - count[MISSING] - count[PAPER_ONLY]
    parts = [f"{count[PASS]} pass", f"{count[FAIL]} fail", f"{count[MISSING]} missing"]
    when_present = {
        "diverged": count[DIVERGED],
        "without a paper number": count[NA],
        "paper only (not runnable here)": count[PAPER_ONLY],
        "at chance level": sum(r.at_chance for r in rows),
    }
    parts += [f"{n} {what}" for what, n in when_present.items() if n]
    return f"{present}/{len(rows)} cells present: " + ", ".join(parts)
