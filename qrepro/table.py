"""One command for a paper table: ``qrepro-table plan|run|sweep|render <table> [--cells GLOB ...] [overrides...]``.

* ``plan``: the runs in order (progressive chains after their sources), complete ones marked, nothing trained;
* ``run``: train them on this machine, one after the other (complete cells skipped, chains fed their sources);
* ``sweep``: print the same work as a shell script of SLURM job arrays (``--launcher submitit_slurm``, default) or
  torchrun commands (``--launcher torchrun``); run it with ``| bash``;
* ``render``: build the table from the run records (``render --all``: every table and results/README.md);
* ``coverage``: how many numbers of the papers' tables have a runnable cell, and why the others do not.

``--cells`` takes cell ids or fnmatch globs (``'r18_*'``), repeated or comma-separated, in every subcommand;
``python -m qrepro.table`` is the same command. ``python -m qrepro.run_table``, ``python -m qrepro.sweep``,
``python -m qrepro.tables`` and ``python -m qrepro.train +table=<name>`` are older names of run, sweep and render.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from qrepro.errors import QreproError
from qrepro.run_table import main as run_main
from qrepro.sweep import main as sweep_main
from qrepro.tables.cli import main as render_main
from qrepro.tables.coverage import coverage_line, load_coverage
from qrepro.tables.coverage import main as coverage_main

SUBCOMMANDS = ("plan", "run", "sweep", "render", "coverage")
USAGE = "usage: qrepro-table {plan,run,sweep,render,coverage} <table> [--cells GLOB ...] [options] [overrides...]"


def merge_cells(argv: Sequence[str]) -> list[str]:
    """``--cells a --cells 'b*,c'`` -> one ``--cells a,b*,c`` (what each subcommand's parser takes)."""
    rest, cells, it = [], [], iter(argv)
    for a in it:
        if a == "--cells":
            cells.append(next(it, ""))
        elif a.startswith("--cells="):
            cells.append(a.split("=", 1)[1])
        else:
            rest.append(a)
    patterns = [p.strip() for c in cells for p in c.split(",") if p.strip()]
    return rest + (["--cells", ",".join(patterns)] if patterns else [])


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        print(__doc__)
        return 0 if argv else 2
    sub, rest = argv[0], merge_cells(argv[1:])
    if sub not in SUBCOMMANDS:  # `qrepro-table <table>` (the older render entry)
        sub, rest = "render", merge_cells(argv)
    if sub == "coverage":
        return coverage_main(rest)
    if sub in ("run", "plan"):
        code = run_main([*rest, "--dry-run"] if sub == "plan" else rest)
        if sub == "plan" and code == 0:
            _print_coverage()
        return code
    if sub == "sweep":
        sweep_main(rest)
        return 0

    if "--cells" in rest:
        print("error: render builds whole tables; --cells is for plan, run and sweep", file=sys.stderr)
        return 2
    return render_main(rest)


def _print_coverage() -> None:
    """The project's coverage line (``qrepro-table coverage`` for the breakdown)."""
    try:
        print(f"# {coverage_line(load_coverage())} (breakdown: qrepro-table coverage)")
    except QreproError as exc:  # another table file is broken: the plan above is still valid
        print(f"# coverage not computed: {exc}")


if __name__ == "__main__":
    sys.exit(main())
