"""``qrepro-runs`` (also ``qrepro-table runs``): what has run, without opening JSON.

One line per run record found under the run roots (default ``runs/`` and ``results/records/``): experiment,
the overrides that identify it, seed, status, epochs done, best and last top-1, wall time and the record's path.
Filters: ``--experiment GLOB``, ``--table NAME`` (only runs that belong to a cell of that table, labelled with
the cell id), ``--status complete|diverged|running|...`` (repeatable). ``--group`` aggregates seeds: one line per
experiment + overrides with the seeds, mean best/last top-1 and total wall time. ``--sort`` orders the lines;
``--json`` prints the same rows as JSON.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import statistics
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from qrepro.errors import QreproError, report
from qrepro.tables.records import DEFAULT_RUN_ROOTS, Record, load_records, match_cell, override_key
from qrepro.tables.render import fmt
from qrepro.tables.schema import default_configs, load_table, resolve_table

SORT_KEYS = ("experiment", "best", "last", "finished", "wall")


@dataclass(frozen=True)
class RunRow:
    experiment: str
    overrides: str  # the identifying overrides (seed aside), space-separated
    seeds: str  # one seed, or the grouped seeds "0,1,2"
    status: str
    epochs: str  # epochs done / planned
    best_top1: float | None
    last_top1: float | None
    wall_s: float | None
    finished: str
    cell: str  # the table cell the run belongs to (with --table), else ""
    record: str  # the record's path (first of a group)
    n: int = 1


def status_of(rec: Record) -> str:
    return "complete" if rec.complete else str(rec.data.get("status") or "incomplete")


def _epochs(rec: Record) -> str:
    done = (rec.data.get("metrics") or {}).get("epochs_done")
    planned = ((rec.data.get("config") or {}).get("trainer") or {}).get("epochs")
    if rec.data.get("ptq") is not None or str(rec.data.get("method") or "").startswith("ptq_"):
        return "ptq"
    if done is None and planned is None:
        return "—"
    return f"{'?' if done is None else done}/{'?' if planned is None else planned}"


def _overrides(rec: Record) -> str:
    ident = {key for _, key, _ in rec.canonical(keep_same_cell=True)}  # the seed is never among them
    return " ".join(str(o) for o in rec.data.get("overrides") or [] if override_key(str(o)) in ident)


def row_of(rec: Record, cell: str = "") -> RunRow:
    wall = rec.data.get("wall_time_s")
    return RunRow(
        experiment=str(rec.experiment or rec.data.get("name") or "?"),
        overrides=_overrides(rec),
        seeds=json.dumps(rec.seed) if rec.seed is not None else "—",
        status=status_of(rec),
        epochs=_epochs(rec),
        best_top1=rec.metric("best", "top1"),
        last_top1=rec.metric("last", "top1"),
        wall_s=float(wall) if isinstance(wall, (int, float)) and not isinstance(wall, bool) else None,
        finished=str(rec.data.get("finished") or ""),
        cell=cell,
        record=rec.path.as_posix(),
    )


def _mean(values: Sequence[float | None]) -> float | None:
    have = [v for v in values if v is not None]
    return statistics.fmean(have) if have else None


def group_rows(rows: Sequence[RunRow]) -> list[RunRow]:
    """One row per experiment + overrides (+ status): seeds joined, mean best/last top-1, total wall time."""
    groups: dict[tuple, list[RunRow]] = {}
    for r in rows:
        groups.setdefault((r.experiment, r.overrides, r.status, r.cell), []).append(r)
    out = []
    for rs in groups.values():
        walls = [r.wall_s for r in rs if r.wall_s is not None]
        out.append(
            replace(  # experiment, overrides, status, cell and the first record from the group's first row
                rs[0],
                seeds=",".join(r.seeds for r in rs),
                epochs=rs[0].epochs if len({r.epochs for r in rs}) == 1 else "mixed",
                best_top1=_mean([r.best_top1 for r in rs]),
                last_top1=_mean([r.last_top1 for r in rs]),
                wall_s=sum(walls) if walls else None,
                finished=max(r.finished for r in rs),
                n=len(rs),
            )
        )
    return out


def select_runs(
    records: Sequence[Record],
    *,
    experiments: Sequence[str] = (),
    table: str | None = None,
    statuses: Sequence[str] = (),
    configs: str | Path | None = None,
) -> list[RunRow]:
    """The records passing every filter, as rows (with ``table``: labelled with their cell ids)."""
    cells: dict[Path, str] = {}
    if table is not None:
        t = load_table(resolve_table(table, configs or default_configs()))
        for c in t.cells:
            for rec in match_cell(c, records):
                cells.setdefault(rec.path, c.id)
    return [
        row_of(rec, cells.get(rec.path, ""))
        for rec in records
        if (not experiments or any(fnmatch.fnmatchcase(str(rec.experiment or ""), p) for p in experiments))
        and (table is None or rec.path in cells)
        and (not statuses or status_of(rec) in statuses)
    ]


def _wall(v: float | None) -> str:
    if v is None:
        return "—"
    if v < 120:
        return f"{v:.0f}s"
    return f"{v / 60:.1f}m" if v < 7200 else f"{v / 3600:.1f}h"


def format_rows(rows: Sequence[RunRow], *, show_cell: bool) -> str:
    head = (["cell"] if show_cell else []) + ["experiment", "overrides", "seed", "status", "epochs"]
    head += ["best", "last", "wall", "record"]
    lines = [head]
    for r in rows:
        line = ([r.cell] if show_cell else []) + [r.experiment, r.overrides or "—", r.seeds, r.status, r.epochs]
        line += [fmt(r.best_top1), fmt(r.last_top1), _wall(r.wall_s), r.record]
        lines.append(line)
    widths = [max(len(x[i]) for x in lines) for i in range(len(head) - 1)]
    return "\n".join(
        "  ".join(x.ljust(w) for x, w in zip(line[:-1], widths)) + "  " + line[-1] for line in lines
    ).rstrip()


def _sort(rows: list[RunRow], key: str) -> list[RunRow]:
    if key == "experiment":
        return sorted(rows, key=lambda r: (r.experiment, r.overrides, r.seeds))
    field = {"best": "best_top1", "last": "last_top1", "finished": "finished", "wall": "wall_s"}[key]
    missing = [r for r in rows if getattr(r, field) in (None, "")]
    have = sorted((r for r in rows if getattr(r, field) not in (None, "")), key=lambda r: getattr(r, field))
    return list(reversed(have)) + missing  # highest / latest first


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qrepro-runs",
        description="List and compare run records: experiment, overrides, seed, status, epochs, best/last top-1, "
        "wall time. Also `qrepro-table runs`.",
    )
    p.add_argument("--experiment", "-e", action="append", default=[], metavar="GLOB", help="experiment name(s)")
    p.add_argument("--table", "-t", help="only runs of this table's cells (labelled with the cell)")
    p.add_argument(
        "--status",
        "-s",
        action="append",
        default=[],
        help="complete | diverged | running | interrupted | ... (repeatable)",
    )
    p.add_argument("--group", "-g", action="store_true", help="one line per experiment + overrides: seeds aggregated")
    p.add_argument("--sort", choices=SORT_KEYS, default="experiment", help="order (numbers: highest first)")
    p.add_argument("--json", action="store_true", help="the rows as JSON")
    p.add_argument(
        "--runs",
        action="append",
        metavar="DIR",
        help=f"roots searched for record.json; repeatable (default: {' '.join(DEFAULT_RUN_ROOTS)})",
    )
    p.add_argument("--configs", default=default_configs(), help="config root holding table/")
    return p


def run(argv: Sequence[str] | None = None, out=print) -> int:
    args = build_parser().parse_args(argv)
    records = load_records(args.runs or DEFAULT_RUN_ROOTS, complete_only=False)
    rows = select_runs(
        records, experiments=args.experiment, table=args.table, statuses=args.status, configs=args.configs
    )
    if args.group:
        rows = group_rows(rows)
    rows = _sort(rows, args.sort)
    if args.json:
        out(json.dumps([asdict(r) for r in rows], indent=1))
        return 0
    if not rows:
        roots = " ".join(args.runs or DEFAULT_RUN_ROOTS)
        out(f"no run records match (searched {roots}; `--runs DIR` adds a root)")
        return 0
    out(format_rows(rows, show_cell=args.table is not None))
    runs = sum(r.n for r in rows)
    done = sum(r.n for r in rows if r.status == "complete")
    out(f"{runs} run(s): {done} complete, {runs - done} other")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return run(argv)
    except QreproError as exc:
        return report(exc)
    except BrokenPipeError:  # `qrepro-runs | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
