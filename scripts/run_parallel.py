"""Run independent training cells side by side on one device (several runs per GPU).

    # three seeds of one cell, two at a time, on GPU 0
    python scripts/run_parallel.py --jobs 2 --device cuda:0 --sweep "+experiment=demo_digits_fp seed=0,1,2"
    # explicit override sets, one per argument (or one per line of --file cells.txt)
    python scripts/run_parallel.py --jobs 3 "+experiment=a" "+experiment=b precision=w2a2" "+experiment=c"

Each cell is one ``python -m qrepro.train <overrides>`` process (so it keeps its own run directory, record,
checkpoint and resume behaviour); at most ``--jobs`` run at once. A cell's stdout+stderr goes to
``<log-dir>/<k>.log`` while it runs and is copied to ``<run dir>/stdout.log`` when it ends. A summary
(exit codes, wall times, run dirs, images/s from each record and their sum) is printed and written to
``<log-dir>/summary.json``. See docs/speed.md for when this pays off and how to measure it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

RUN_LINE = re.compile(r"^run: (\S+)")


@dataclass
class Job:
    index: int
    overrides: list[str]
    log: Path
    run_dir: str | None = None
    returncode: int | None = None
    wall_s: float | None = None
    images_per_s: float | None = None
    started: float = 0.0
    proc: subprocess.Popen | None = field(default=None, repr=False)


def split_top_level(s: str, sep: str = ",") -> list[str]:
    """Split on ``sep`` outside brackets, braces and quotes (``a,[1,2],b`` -> ``a``, ``[1,2]``, ``b``)."""
    out, depth, quote, cur = [], 0, None, ""
    for ch in s:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == sep and depth == 0:
            out.append(cur)
            cur = ""
            continue
        cur += ch
    out.append(cur)
    return out


def expand_sweep(spec: str) -> list[list[str]]:
    """Hydra-multirun-style comma lists -> the cartesian product of override sets.

    ``"+experiment=x seed=0,1 precision=w2a2,w4a4"`` -> 4 sets. Only comma lists are expanded (not Hydra's
    ``range()``/``glob()`` sweeps)."""
    axes = []
    for tok in shlex.split(spec):
        key, eq, val = tok.partition("=")
        if not eq:
            axes.append([tok])
            continue
        axes.append([f"{key}={v}" for v in split_top_level(val)])
    return [list(c) for c in itertools.product(*axes)]


def read_cells(args: argparse.Namespace) -> list[list[str]]:
    cells = [shlex.split(c) for c in args.cells]
    if args.file:
        for line in Path(args.file).read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                cells.append(shlex.split(line))
    for spec in args.sweep or []:
        cells.extend(expand_sweep(spec))
    return cells


def _images_per_s(run_dir: str | None) -> float | None:
    if not run_dir:
        return None
    try:
        rec = json.loads((Path(run_dir) / "record.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return rec.get("images_per_s")


def _finish(job: Job) -> None:
    job.returncode = job.proc.returncode
    job.wall_s = time.perf_counter() - job.started
    try:
        for line in job.log.read_text(errors="replace").splitlines():
            m = RUN_LINE.match(line)
            if m:
                job.run_dir = m.group(1)
                break
    except OSError:
        pass
    if job.run_dir and Path(job.run_dir).is_dir():
        shutil.copyfile(job.log, Path(job.run_dir) / "stdout.log")
    job.images_per_s = _images_per_s(job.run_dir)
    job.proc = None


def run_all(
    cells: list[list[str]],
    jobs: int,
    log_dir: Path,
    command: list[str],
    env: dict[str, str] | None = None,
    poll_s: float = 0.5,
) -> list[Job]:
    """Run ``command + cell`` for every cell, at most ``jobs`` at once; returns the finished jobs."""
    log_dir.mkdir(parents=True, exist_ok=True)
    pending = [Job(k, c, log_dir / f"{k}.log") for k, c in enumerate(cells)]
    running: list[Job] = []
    done: list[Job] = []
    try:
        while pending or running:
            while pending and len(running) < jobs:
                job = pending.pop(0)
                job.started = time.perf_counter()
                with open(job.log, "wb") as fh:
                    job.proc = subprocess.Popen(command + job.overrides, stdout=fh, stderr=subprocess.STDOUT, env=env)
                print(f"[start {job.index}] {' '.join(job.overrides)}  (log {job.log})", flush=True)
                running.append(job)
            time.sleep(poll_s)
            for job in list(running):
                if job.proc.poll() is not None:
                    _finish(job)
                    running.remove(job)
                    done.append(job)
                    state = "ok" if job.returncode == 0 else f"exit {job.returncode}"
                    print(f"[done {job.index}] {state} in {job.wall_s:.0f} s  run dir {job.run_dir}", flush=True)
    except KeyboardInterrupt:
        for job in running:  # only the processes this script started
            job.proc.send_signal(signal.SIGINT)
        for job in running:
            job.proc.wait()
            _finish(job)
            done.append(job)
        raise
    return sorted(done, key=lambda j: j.index)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("cells", nargs="*", help="one override set per argument (quoted), e.g. '+experiment=x seed=1'")
    p.add_argument("--file", help="a file with one override set per line (# comments)")
    p.add_argument("--sweep", action="append", help="Hydra-style comma lists expanded to a grid (repeatable)")
    p.add_argument("--jobs", type=int, default=2, help="cells running at once (default 2)")
    p.add_argument("--device", default=None, help="trainer.device for every cell, e.g. cuda:0")
    p.add_argument("--threads", type=int, default=None, help="OMP/torch threads per cell (default: cores/jobs)")
    p.add_argument("--log-dir", default=None, help="default runs/_parallel/<timestamp>")
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    args = p.parse_args(argv)
    cells = read_cells(args)
    if not cells:
        p.error("no cells: give override sets as arguments, --file or --sweep")
    if args.jobs < 1:
        p.error("--jobs must be >= 1")
    extra = ["trainer.progress=false"] + ([f"trainer.device={args.device}"] if args.device else [])
    cells = [c + extra for c in cells]
    command = [args.python, "-m", "qrepro.train"]
    if args.dry_run:
        for c in cells:
            print(shlex.join(command + c))
        return 0
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    log_dir = Path(args.log_dir or Path("runs") / "_parallel" / time.strftime("%Y%m%d-%H%M%S"))
    t0 = time.perf_counter()
    done = run_all(cells, args.jobs, log_dir, command, env)
    wall = time.perf_counter() - t0
    ips = [j.images_per_s for j in done if j.images_per_s]
    summary = {
        "jobs": args.jobs,
        "cells": len(cells),
        "wall_s": wall,
        "failed": sum(j.returncode != 0 for j in done),
        "cells_per_hour": 3600.0 * len(cells) / wall,
        # per-run training img/s added up: the aggregate rate only while all runs overlap (see docs/speed.md)
        "sum_images_per_s": sum(ips) if ips else None,
        "runs": [{k: v for k, v in asdict(j).items() if k not in ("proc", "started")} for j in done],
    }
    (log_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    print(
        f"{len(cells)} cells, {args.jobs} at a time: {wall:.0f} s wall ({summary['cells_per_hour']:.1f} cells/h), "
        f"{summary['failed']} failed; summary {log_dir / 'summary.json'}",
        flush=True,
    )
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
