"""Run every cell of a paper table: ``qrepro-table run <name> [--cells GLOB] [overrides...]``
(``python -m qrepro.table``; ``python -m qrepro.run_table`` is the same command under its older name).

How cells become runs, in which order, and how chains get their checkpoint: docs/results_section.md, "Running a
table". ``--members K`` (or ``trainer.members=K``) trains up to K consecutive seeds of a cell as one batched job
(``seed=S trainer.members=n``, qrepro/engine/members.py), each seed with its own run directory and record; cells
that start from another cell's checkpoint stay one job per seed (each seed starts from its own parent run).
"""

from __future__ import annotations

import argparse
import fnmatch
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from qrepro.config import run_subdir
from qrepro.engine.rundir import file_sha256
from qrepro.errors import QreproError, report
from qrepro.tables.compare import elsewhere
from qrepro.tables.records import (
    DEFAULT_RUN_ROOTS,
    Record,
    load_records,
    match_cell,
    override_key,
    override_value,
)
from qrepro.tables.render import cell_other_runs
from qrepro.tables.schema import Cell, Table, default_configs, load_table, resolve_table


@dataclass(frozen=True)
class RunResult:
    returncode: int
    record: Path | None  # the record.json the run reported (``record: <path>``), if any
    records: tuple[Path, ...] = ()  # every ``record: <path>`` line, in order (one per member of a batched job)


Runner = Callable[[list[str]], RunResult]


@dataclass
class Job:
    """One run of one cell (for one seed) and what it depends on."""

    cell: Cell
    seed: int | None
    overrides: list[str]  # the cell's overrides + extra overrides (+ seed), without init_from / logger
    parent: tuple[str, int | None] | None  # (cell id, seed) whose checkpoint initialises this run
    done: Record | None = None  # a complete record of this exact run (then it is skipped)
    run_dir: Path | None = None
    expected_dir: Path | None = None  # where the run will write (the trainer's run-directory rule), for ``plan``

    @property
    def module(self) -> str:
        return "qrepro.ptq" if self.cell.extra.get("ptq") else "qrepro.train"


def expand_cells(table: Table, patterns: Sequence[str]) -> list[str]:
    """Cell ids matching any of the fnmatch ``patterns`` (an exact id is a pattern too), in table order."""
    for pat in patterns:
        if not any(fnmatch.fnmatchcase(i, pat) for i in table.ids()):
            raise QreproError(f"table {table.name!r} has no cell matching {pat!r}; cells: {', '.join(table.ids())}")
    return [i for i in table.ids() if any(fnmatch.fnmatchcase(i, p) for p in patterns)]


def ordered_cells(table: Table, only: Sequence[str] | None = None) -> list[Cell]:
    """Runnable cells in table order, each moved after the cells it starts from (paper-only rows, which have a
    ``why`` and no experiment file, are left out).

    ``only`` restricts to those cells plus, transitively, the cells they start from.
    """
    keep = set(table.ids())
    if only is not None:
        keep, todo = set(), [table.cell(i).id for i in expand_cells(table, only)]
        while todo:
            cid = todo.pop()
            if cid not in keep:
                keep.add(cid)
                todo += table.cell(cid).sources
    out: list[Cell] = []
    placed: set[str] = set()

    def place(cell: Cell) -> None:  # the schema guarantees the chains are acyclic
        if cell.id in placed:
            return
        for parent in cell.sources:
            place(table.cell(parent))
        placed.add(cell.id)
        out.append(cell)

    for c in table.cells:
        if c.id in keep and c.runnable:
            place(c)
    return out


def plan(
    table: Table,
    records: Sequence[Record],
    extra: Sequence[str] = (),
    seeds: Sequence[int] | None = None,
    only: Sequence[str] | None = None,
    configs: str | Path | None = None,
) -> list[Job]:
    """The runs in execution order, with completed ones marked (``job.done``); with ``configs`` (the config
    root) each pending run also knows the directory it will write (``job.expected_dir``)."""
    extra = list(extra)
    if seeds and any(override_key(o) == "seed" for o in extra):
        raise QreproError("give the seed either as --seeds or as a seed=... override, not both")
    requested = next((override_value(o) for o in extra if override_key(o) == "seed"), None)
    jobs = []
    for cell in ordered_cells(table, only):
        parent_id = cell.init_from_cell or cell.ptq_from_cell
        for seed in seeds or [None]:
            overrides = list(cell.overrides) + extra + ([f"seed={seed}"] if seed is not None else [])
            want = seed if seed is not None else requested
            hits = [r for r in match_cell(cell, records, extra_overrides=extra) if _same_seed(r, want)]
            job = Job(cell, seed, overrides, (parent_id, seed) if parent_id else None, hits[0] if hits else None)
            if job.done is not None:
                job.run_dir = job.done.checkpoint_dir() or job.done.run_dir
            elif configs is not None:
                job.expected_dir = expected_run_dir(job, configs)
            jobs.append(job)
    return jobs


def expected_run_dir(job: Job, configs: str | Path) -> Path | None:
    """The directory the trainer (or ``qrepro.ptq``) will give this run: ``<out_root>/<experiment name>/[ptq/]``
    + the run-directory name of its overrides (the rule of configs/train.yaml, ``qrepro.sweep.run_subdir``).
    None when it cannot be told here (an ``out_root`` or ``hydra.*`` override that is not a plain path)."""
    out_root, name = "runs", job.cell.experiment
    for root in (Path(configs), Path(default_configs())):
        train, exp = root / "train.yaml", root / "experiment" / f"{job.cell.experiment}.yaml"
        if train.is_file():
            out_root = str(OmegaConf.load(train).get("out_root", out_root))
        if exp.is_file():
            name = str(OmegaConf.load(exp).get("name") or name)
            break
    for o in job.overrides:
        key = override_key(o)
        if key.startswith("hydra.") or key == "name":
            return None
        if key == "out_root":
            out_root = str(override_value(o))
    if "$" in out_root or "$" in name:
        return None
    try:
        entry = job.module.rsplit(".", 1)[1]  # train or ptq: the config the overrides compose with
        sub = run_subdir([f"+experiment={job.cell.experiment}", *job.overrides], entry)  # named as that run does
    except Exception:  # an override Hydra's grammar refuses: the run itself will say so
        return None
    return Path(out_root, name, *(["ptq"] if job.module == "qrepro.ptq" else []), sub)


def _same_seed(record: Record, seed: object) -> bool:
    """A run of the requested seed; without one, a run that did not override the seed (the default)."""
    if seed is None:
        return not any(override_key(str(o)) == "seed" for o in record.data.get("overrides") or [])
    return record.seed == seed


def group_members(jobs: Sequence[Job], members: int) -> list[Job | list[Job]]:
    """``jobs`` with the training runs of one cell over consecutive seeds gathered into groups of at most
    ``members`` (each group one batched job); runs already done, chained cells (their seeds start from different
    parent runs) and PTQ cells stay single. A group replaces its first job's place in the order."""
    if members <= 1:
        return list(jobs)
    out: list[Job | list[Job]] = []
    open_group: dict[str, list[Job]] = {}
    for job in jobs:
        batchable = job.seed is not None and job.done is None and job.parent is None and job.module == "qrepro.train"
        if not batchable:
            out.append(job)
            continue
        g = open_group.get(job.cell.id)
        if g is not None and len(g) < members and g[-1].seed is not None and job.seed == g[-1].seed + 1:
            g.append(job)
            continue
        g = [job]
        open_group[job.cell.id] = g
        out.append(g)
    return [g[0] if isinstance(g, list) and len(g) == 1 else g for g in out]


def parse_record_lines(lines: Sequence[str]) -> list[Path]:
    """Every ``record: <path>`` line, in order."""
    return [Path(line[len("record: ") :].strip()) for line in lines if line.startswith("record: ")]


def parse_record_line(lines: Sequence[str]) -> Path | None:
    """The path on the last ``record: <path>`` line (the trainer prints it last), or None."""
    return (parse_record_lines(lines) or [None])[-1]


def command(
    job: Job, table: Table, init_from: str | None = None, python: str = sys.executable, members: int = 0
) -> list[str]:
    """The run of ``job``; with ``members``, one batched job of that many seeds from ``job.seed`` on."""
    cmd = [python, "-m", job.module, f"+experiment={job.cell.experiment}", *job.overrides]
    cmd += [f"trainer.members={members}"] if members else []
    cmd.append(f"++logger.group={table.name}")
    if init_from is not None:
        cmd.append(f"init_from={hydra_quote(init_from)}")
    return cmd


def hydra_quote(value: str) -> str:
    """Quote a value for a Hydra override: run directories contain ``=`` and ``,`` (``precision=w4a4,seed=1``),
    which the override grammar would otherwise parse."""
    if '"' not in value:
        return f'"{value}"'
    if "'" not in value:
        return f"'{value}'"
    raise QreproError(f"cannot pass the path {value!r} to Hydra: it holds both quote characters; rename it")


def subprocess_runner(cmd: list[str]) -> RunResult:
    """Run ``cmd``, streaming its output, and pick up the ``record: <path>`` line."""
    lines: list[str] = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            lines.append(line.rstrip("\n"))
    return RunResult(proc.returncode, parse_record_line(lines), tuple(parse_record_lines(lines)))


def run_table(
    table: Table,
    jobs: Sequence[Job],
    *,
    runner: Runner = subprocess_runner,
    dry_run: bool = False,
    python: str = sys.executable,
    out: Callable[[str], None] = print,
    members: int = 1,
    records: Sequence[Record] = (),
) -> int:
    """Run (or, with ``dry_run``, print) the jobs in order; returns 0, or 1 when a run failed. ``members``: up to
    that many consecutive seeds of a cell run as one batched job (``group_members``)."""
    by_key = {(j.cell.id, j.seed): j for j in jobs}
    failed: list[str] = []
    for unit in group_members(jobs, members):
        if isinstance(unit, list):
            _run_group(unit, table, runner, dry_run, python, out, failed)
            continue
        job = unit
        label = f"{table.name}/{job.cell.id}" + (f" seed={job.seed}" if job.seed is not None else "")
        parent = by_key.get(job.parent) if job.parent else None
        init_from = None
        if job.parent is not None:
            if parent is None or (parent.run_dir is None and not dry_run):
                failed.append(label)
                out(f"# {label}: skipped, its source cell {job.parent[0]} did not produce a run")
                continue
            known = parent.run_dir or (parent.expected_dir if dry_run else None)
            run_dir = known.as_posix() if known else f"<run dir of {job.parent[0]}>"
            init_from = f"{run_dir}/checkpoints/last.pt"
        if job.done is not None:
            stale = _stale_init(job.done, init_from) if init_from and not dry_run else None
            if stale:
                out(
                    f"# {label}: its complete record was initialised from another checkpoint of {job.parent[0]} "
                    f"({stale}); to rerun it, move {job.done.run_dir.as_posix()} away"
                )
                failed.append(label)
                continue
            out(f"# {label}: complete, skipped ({job.done.path.as_posix()})")
            continue
        if parent is not None and parent.done is not None and parent.done.checkpoint_dir() is None:
            out(
                f"# {label}: warning: no {init_from} (only a copied record of {job.parent[0]}); recreate it "
                f"with: qrepro-table run {table.name} --cells {job.parent[0]} --runs runs"
            )
        cmd = command(job, table, init_from, python)
        out(shlex.join(cmd))
        if dry_run:
            if job.expected_dir is not None:
                out(f"#   -> {job.expected_dir.as_posix()}")
            for line in elsewhere_lines(job, table, records):
                out(f"#   {line}")
            continue
        result = runner(cmd)
        if result.returncode != 0 or result.record is None:
            why = f"exit code {result.returncode}" if result.returncode else "no 'record: <path>' line"
            out(f"# {label}: failed ({why})")
            failed.append(label)
            continue
        job.run_dir = result.record.parent
    if failed:
        out(f"# {len(failed)} run(s) failed or were skipped: {', '.join(failed)}")
        return 1
    if not dry_run:
        out(f"# done; build the table with: qrepro-table render {table.name}")
    return 0


def elsewhere_lines(job: Job, table: Table, records: Sequence[Record]) -> list[str]:
    """For a pending run: the complete runs of its experiment under other overrides (seed aside), and how
    to count them (``qrepro-table render <table> <the extra overrides>``)."""
    extra = [o for o in job.overrides if o not in job.cell.overrides and override_key(o) != "seed"]
    lines = cell_other_runs(table, job.cell, elsewhere(job.cell, records, extra, table), markdown=False)
    return [f"not run with these overrides; {line.split(': ', 1)[1]}" for line in lines]


def _run_group(
    group: list[Job], table: Table, runner: Runner, dry_run: bool, python: str, out: Callable[[str], None], failed: list
) -> None:
    seeds = [j.seed for j in group]
    label = f"{table.name}/{group[0].cell.id} seeds={seeds[0]}..{seeds[-1]}"
    cmd = command(group[0], table, python=python, members=len(group))
    out(shlex.join(cmd))
    if dry_run:
        return
    result = runner(cmd)
    records = list(result.records) or ([result.record] if result.record else [])
    if len(records) != len(group):
        why = f"exit code {result.returncode}" if result.returncode else f"{len(records)} 'record:' lines"
        out(f"# {label}: failed ({why})")
        failed.append(label)
        return
    for job, rec in zip(group, records):
        job.run_dir = rec.parent
    if result.returncode != 0:  # some member diverged: its record says so; the others feed their chains
        out(f"# {label}: a member failed (exit code {result.returncode}); see its record")
        failed.append(label)


def _stale_init(record: Record, init_from: str) -> str | None:
    """How the checkpoint a chained cell starts from now differs from the one its record was initialised from
    (None: the same content, or not known: a record without hashes, or no checkpoint at hand)."""
    old = record.data.get("init_from_sha256") or ((record.data.get("ptq") or {}).get("source_sha256"))
    path = Path(init_from)
    if not old or not path.is_file():
        return None
    now = file_sha256(path)
    return None if now == old else f"sha256 {old[:12]} -> {now[:12]}"


def _int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _str_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qrepro-table run",
        description="Run every cell of a paper table (progressive chains in order, complete cells skipped); "
        "`qrepro-table plan` (= run --dry-run) prints the commands and the run directory each will write.",
    )
    p.add_argument("name", help="table name (configs/table/<name>.yaml) or a path to a table YAML")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run (e.g. trainer.device=cuda)")
    p.add_argument("--dry-run", action="store_true", help="print the commands in order without running them")
    p.add_argument("--seeds", type=_int_list, help="comma-separated seeds, e.g. 0,1,2: every cell once per seed")
    p.add_argument(
        "--cells",
        type=_str_list,
        help="comma-separated cell ids or fnmatch globs ('r18_*'): only these (and their sources)",
    )
    p.add_argument(
        "--members",
        type=int,
        default=None,
        help="train up to K consecutive seeds of a cell as one batched job (trainer.members=K; off by default)",
    )
    p.add_argument(
        "--runs",
        action="append",
        metavar="DIR",
        help=f"where complete records are looked up; repeatable (default: {' '.join(DEFAULT_RUN_ROOTS)})",
    )
    p.add_argument("--configs", default=default_configs(), help="config root holding table/")
    p.add_argument("--python", default=sys.executable, help="python executable for the runs")
    return p


def table_argv(train_argv: Sequence[str]) -> list[str] | None:
    """``python -m qrepro.train +table=<name> [args...]`` -> this module's argv (``<name> [args...]``), or
    None when no ``+table=`` is given. Lets the trainer's entry point hand a whole table over to :func:`main`."""
    names = [a.split("=", 1)[1] for a in train_argv if a.lstrip("+").startswith("table=")]
    if not names:
        return None
    if len(names) > 1 or not names[0]:
        raise QreproError("give exactly one table: +table=<name>")
    return [names[0], *(a for a in train_argv if not a.lstrip("+").startswith("table="))]


def from_train_argv(train_argv: Sequence[str], runner: Runner = subprocess_runner) -> int | None:
    """For ``qrepro.train``'s entry point: run the table named by ``+table=<name>`` and return the exit code,
    or None when the command line names no table (then the trainer proceeds as usual)."""
    try:
        argv = table_argv(train_argv)
    except QreproError as exc:
        return report(exc)
    return None if argv is None else main(argv, runner=runner)


def _members(flag: int | None, overrides: Sequence[str]) -> tuple[int, list[str]]:
    """K from ``--members`` or an override ``trainer.members=K`` (taken out of the per-run overrides: the runner
    sets it per group of seeds)."""
    given = [o for o in overrides if override_key(o) == "trainer.members"]
    rest = [o for o in overrides if override_key(o) != "trainer.members"]
    values = [int(str(override_value(o))) for o in given] + ([flag] if flag is not None else [])
    if len(set(values)) > 1:
        raise QreproError(f"--members and trainer.members disagree ({values}); give one")
    k = values[0] if values else 1
    if k < 1:
        raise QreproError(f"--members must be >= 1, got {k}")
    return k, rest


def main(argv: Sequence[str] | None = None, runner: Runner = subprocess_runner) -> int:
    try:
        args = build_parser().parse_intermixed_args(argv)
        bad = [o for o in args.overrides if "=" not in o and not o.startswith("~")]
        if bad:
            raise QreproError(f"extra overrides must look like key=value, got {' '.join(bad)}")
        members, overrides = _members(args.members, args.overrides)
        table = load_table(resolve_table(args.name, args.configs))
        records = load_records(args.runs or DEFAULT_RUN_ROOTS)
        jobs = plan(table, records, overrides, args.seeds, args.cells, configs=args.configs)
        chosen = set(expand_cells(table, args.cells)) if args.cells else set(table.ids())
        skipped = [c.id for c in table.cells if c.id in chosen and not c.runnable]
        if skipped:
            print(f"# {table.name}: {len(skipped)} paper-only row(s) not runnable here, skipped: {', '.join(skipped)}")
        return run_table(
            table, jobs, runner=runner, dry_run=args.dry_run, python=args.python, members=members, records=records
        )
    except QreproError as exc:
        return report(exc)


if __name__ == "__main__":
    sys.exit(main())
