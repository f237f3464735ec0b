"""One command for a paper table: ``qrepro-table plan|run|sweep|render <table> [--cells GLOB ...] [overrides...]``.

* ``plan``: the runs in order (progressive chains after their sources), complete ones marked, each pending run
  with the directory it will write, runs of a cell's experiment under other overrides named; nothing trained;
* ``run``: train them on this machine, one after the other (complete cells skipped, chains fed their sources);
* ``sweep``: print the same work as a shell script of SLURM job arrays (``--launcher submitit_slurm``, default) or
  torchrun commands (``--launcher torchrun``); run it with ``| bash``;
* ``render``: build the table from the run records (``render --all``: every table and results/README.md, with a
  one-line summary); ``render <table> key=value`` counts the runs made with those extra overrides as the cells;
* ``coverage``: how many numbers of the papers' tables have a runnable cell, and why the others do not.

* ``runs``: list and compare run records (also ``qrepro-runs``): ``--experiment GLOB --table T --status S --group``;
* ``completion bash``: a shell completion script: ``eval "$(qrepro-table completion bash)"`` (zsh: run
  ``autoload -U bashcompinit && bashcompinit`` first); completes subcommands, tables, options and, after
  ``--cells``, the table's cell ids.

``--cells`` takes cell ids or fnmatch globs (``'r18_*'``), repeated or comma-separated, in plan, run and sweep.
``qrepro-table <subcommand> --help`` lists each subcommand's options; ``python -m qrepro.table`` is the same
command.
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
from qrepro.tables.runs import SORT_KEYS
from qrepro.tables.runs import main as runs_main
from qrepro.tables.schema import default_configs, load_table, resolve_table, table_paths

SUBCOMMANDS = ("plan", "run", "sweep", "render", "coverage", "runs", "completion")
USAGE = (
    "usage: qrepro-table {plan,run,sweep,render,coverage} <table> [--cells GLOB ...] [options] [overrides...]\n"
    "       qrepro-table runs [--experiment GLOB] [--table T] [--status S] [--group]\n"
    "       qrepro-table completion bash"
)
_RUN_OPTIONS = "--cells --seeds --members --runs --configs --python --help"
_RENDER_OPTIONS = (
    "--all --select --format --verify --runs --out --figures --collect --no-figures --verbose --configs --help"
)
# options offered by the shell completion, per subcommand
OPTIONS = {
    sub: tuple(options.split())
    for sub, options in {
        "plan": _RUN_OPTIONS,
        "run": _RUN_OPTIONS,
        "sweep": "--cells --seeds --members --launcher --help",
        "render": _RENDER_OPTIONS,
        "runs": "--experiment --table --status --group --sort --json --runs --configs --help",
        "coverage": "--help",
    }.items()
}
# the values the shell completion offers after an option
VALUES = {
    "--status": ("complete", "diverged", "running", "interrupted", "incomplete"),
    "--sort": SORT_KEYS,
    "--select": ("best", "last"),
    "--launcher": ("submitit_slurm", "torchrun"),
}
VALUES["-s"] = VALUES["--status"]
BASH_COMPLETION = """_qrepro_table() {
    local IFS=$'\\n'
    COMPREPLY=($(qrepro-table __complete "$COMP_CWORD" "${COMP_WORDS[@]}" 2>/dev/null))
}
complete -o default -F _qrepro_table qrepro-table
"""


def candidates(words: Sequence[str], index: int) -> list[str]:
    """What the shell may complete at ``words[index]`` (``words[0]`` is the command name)."""
    words = list(words) + [""] * max(0, index + 1 - len(words))
    cur, prev = words[index], words[index - 1] if index > 0 else ""
    if index == 1:
        options = [*SUBCOMMANDS, "--help"]
    else:
        sub = words[1]
        if prev in ("--table", "-t") or (sub in ("plan", "run", "sweep", "render") and index == 2):
            options = [p.stem for p in table_paths(default_configs())] + (["--all"] if sub == "render" else [])
        elif prev == "--cells" and sub in ("plan", "run", "sweep") and len(words) > 2:
            options = _cell_ids(words[2])
        elif prev in VALUES:
            options = list(VALUES[prev])
        elif sub == "completion":
            options = ["bash"]
        else:
            options = list(OPTIONS.get(sub, ()))
    if "," in cur and prev == "--cells":  # comma-separated cells: complete the last item
        head, _, last = cur.rpartition(",")
        return [f"{head},{o}" for o in options if o.startswith(last)]
    return [o for o in options if o.startswith(cur)]


def _cell_ids(table: str) -> list[str]:
    try:
        return load_table(resolve_table(table, default_configs())).ids()
    except Exception:  # an unfinished or unknown table name: nothing to offer
        return []


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
    if argv[0] == "__complete":  # the shell completion's callback: __complete <index> <words...>
        index = int(argv[1]) if len(argv) > 1 and argv[1].isdigit() else 0
        print("\n".join(candidates(argv[2:], index)))
        return 0
    if argv[0] == "completion":
        if argv[1:] not in ([], ["bash"], ["zsh"]):
            print(
                "error: qrepro-table completion bash (zsh: autoload -U bashcompinit && bashcompinit)", file=sys.stderr
            )
            return 2
        print(BASH_COMPLETION, end="")
        return 0
    if argv[0] == "runs":
        return runs_main(argv[1:])
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
