"""Commands that train every cell of a paper table: ``python -m qrepro.sweep <table> [--launcher ...]``.

Prints a shell script (run it with ``| bash``, inside tmux/screen for long tables). Cells are ordered in waves by
``init_from_cell`` / ``ptq.from_cell`` (a cell starts from another cell's last checkpoint, so it runs in a later
wave). PTQ cells (a ``ptq:`` field) run ``python -m qrepro.ptq`` in one process (one SLURM task).

* ``--launcher submitit_slurm`` (or ``submitit_local``): one Hydra multirun per (wave, overrides, initialising
  cell), i.e. one SLURM job array through the submitit launcher (``configs/hydra/launcher/submitit_slurm.yaml``);
  each array element is one cell trained with DDP on ``gpus_per_node x nodes`` GPUs. The launcher waits for its
  array, so the waves run in order.
* ``--launcher torchrun``: one ``torchrun --standalone --nproc_per_node=<gpus>`` command per cell, one after the
  other on this node.

Every command carries ``resume=true``: an interrupted or requeued cell continues from its last epoch, and a cell with
a complete record is skipped.

``--seeds 0,1,2`` trains every selected cell once per seed; with ``--members K`` consecutive seeds are grouped K at
a time into batched jobs (``seed=S trainer.members=K``, one process each, qrepro/engine/members.py). Cells that start
from another cell's checkpoint need one chain per seed: ``qrepro-table run <table> --seeds ... --members K``
runs those (``--seeds`` here refuses them).
"""

from __future__ import annotations

import argparse
import fnmatch
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from omegaconf import OmegaConf

from qrepro.cli import one_line_errors
from qrepro.config import CONFIG_DIR, run_subdir  # noqa: F401  (run_subdir: re-exported)
from qrepro.errors import QreproError
from qrepro.tables.schema import derive_sources


def _experiment_name(experiment: str) -> str:
    path = next(Path(CONFIG_DIR, "experiment").rglob(f"{experiment}.yaml"), None)
    if path is None:
        raise QreproError(f"table cell experiment {experiment!r} has no configs/experiment/{experiment}.yaml")
    return str(OmegaConf.load(path).get("name", experiment))


def load_cells(table: str) -> list[dict]:
    path = Path(table) if table.endswith(".yaml") else Path(CONFIG_DIR, "table", f"{table}.yaml")
    if not path.is_file():
        known = sorted(p.stem for p in Path(CONFIG_DIR, "table").glob("*.yaml"))
        raise QreproError(f"unknown table {table!r}; choose one of: {', '.join(known)}")

    cells = derive_sources(OmegaConf.to_container(OmegaConf.load(path).cells, resolve=False))
    # paper-only rows (a why and no experiment file) are not runnable here: no job
    root = path.parent.parent if path.parent.name == "table" else Path(CONFIG_DIR)
    cells = [c for c in cells if not c.get("why") or Path(root, "experiment", f"{c['experiment']}.yaml").is_file()]
    ids = {c["id"] for c in cells}
    for c in cells:
        src = source(c)
        if src and src not in ids:
            raise QreproError(f"table {table}: cell {c['id']} starts from {src}, which is not a cell id")
    return cells


def source(cell: dict) -> str | None:
    """The cell whose checkpoint this cell starts from: ``init_from_cell`` (QAT) or ``ptq.from_cell`` (PTQ)."""
    return cell.get("init_from_cell") or (cell.get("ptq") or {}).get("from_cell")


def waves(cells: list[dict]) -> list[list[dict]]:
    """Cells grouped so that every cell comes after the cell it is initialised from."""
    by_id, depth = {c["id"]: c for c in cells}, {}

    def level(cid: str, seen: tuple[str, ...] = ()) -> int:
        if cid in seen:
            raise QreproError(f"init_from_cell cycle: {' -> '.join((*seen, cid))}")
        if cid not in depth:
            src = source(by_id[cid])
            # a source cell outside the selection (--cells) is taken as trained already
            depth[cid] = 0 if not src or src not in by_id else level(src, (*seen, cid)) + 1
        return depth[cid]

    out: list[list[dict]] = []
    for c in cells:
        d = level(c["id"])
        out.extend([] for _ in range(d + 1 - len(out)))
        out[d].append(c)
    return out


def init_path(cell: dict, by_id: dict[str, dict]) -> str | None:
    src = source(cell)
    if not src:
        return None
    s = by_id[src]
    sub = run_subdir([f"+experiment={s['experiment']}", *(s.get("overrides") or [])])  # named as the trainer does
    path = f"${{out_root}}/{_experiment_name(s['experiment'])}/{sub}"
    return f'"{path}/checkpoints/last.pt"'  # quoted for Hydra: run directory names contain '=' and ','


def seed_groups(seeds: Sequence[int], members: int) -> list[tuple[int, int]]:
    """(first seed, K) per batched job: runs of consecutive seeds cut into groups of at most ``members``."""
    out: list[tuple[int, int]] = []
    for s in sorted(set(seeds)):
        if out and s == out[-1][0] + out[-1][1] and out[-1][1] < max(1, members):
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((s, 1))
    return out


def seed_overrides(seeds: Sequence[int], members: int) -> list[str]:
    """The overrides that train ``seeds`` in batches of ``members``: a sweep over the groups' first seeds."""
    groups = seed_groups(seeds, members)
    sizes = {k for _, k in groups}
    if members > 1 and len(sizes) > 1:
        raise QreproError(
            f"--seeds {','.join(map(str, seeds))} do not split into groups of --members {members} (got sizes "
            f"{sorted(sizes)}); give a multiple of {members} consecutive seeds"
        )
    out = [f"seed={','.join(str(s) for s, _ in groups)}"]
    return out + ([f"trainer.members={groups[0][1]}"] if members > 1 and groups[0][1] > 1 else [])


def commands(
    table: str,
    launcher: str = "submitit_slurm",
    gpus: int = 8,
    extra: Sequence[str] = (),
    only: Sequence[str] = (),
    seeds: Sequence[int] = (),
    members: int = 1,
) -> list[str]:
    """The shell commands for ``table``; ``only``: fnmatch patterns of cell ids to keep (e.g. ``r18_*``);
    ``seeds``/``members``: the first wave's training cells once per seed, ``members`` seeds per batched job."""
    if members > 1 and not seeds:
        raise QreproError("--members needs --seeds (the seeds a batched job trains), e.g. --seeds 0,1,2 --members 3")
    seeded = seed_overrides(seeds, members) if seeds else []
    batched = any(o.startswith("trainer.members=") for o in seeded)
    all_cells = load_cells(table)
    if not all_cells:
        return [f"# {table}: no runnable cell (paper-only rows; qrepro-table coverage says why)"]
    by_id = {c["id"]: c for c in all_cells}
    cells = [c for c in all_cells if not only or any(fnmatch.fnmatchcase(c["id"], p) for p in only)]
    if not cells:
        raise QreproError(f"--cells {','.join(only)} matches no cell of {table}; ids: {', '.join(by_id)}")
    chained = [c["id"] for c in cells if source(c)]
    if seeds and chained:
        raise QreproError(
            f"--seeds with chained cells ({', '.join(chained[:3])} start from another cell's run, one per seed): "
            f"run qrepro-table run {table} --seeds {','.join(map(str, seeds))}"
            + (f" --members {members}" if members > 1 else "")
            + ", or select unchained cells with --cells"
        )
    lines = [f"# {table}: {len(cells)} of {len(all_cells)} cells; launcher={launcher}"]
    for w, wave in enumerate(waves(cells)):
        lines.append(f"# wave {w}: {', '.join(c['id'] for c in wave)}")
        # torchrun: one command per cell; submitit: one multirun per (PTQ or not, overrides, initialising cell)
        groups: dict[tuple, list[str]] = {}
        for i, c in enumerate(wave):
            key = (bool(c.get("ptq")), tuple(c.get("overrides") or []), init_path(c, by_id))
            groups.setdefault((*key, i) if launcher == "torchrun" else key, []).append(c["experiment"])
        for (ptq, overrides, ip, *_), exps in groups.items():
            sd = [] if ptq else seeded
            one = ptq or batched and bool(sd)  # PTQ calibrates on one rank; a batched job is one process (no DDP)
            module = ["-m", "qrepro.ptq" if ptq else "qrepro.train"]
            if launcher == "torchrun":
                argv = ["python"] if one else ["torchrun", "--standalone", f"--nproc_per_node={gpus}"]
                argv += module + (["-m"] if sd and "," in sd[0] else [])
            else:
                argv = ["python", *module, "-m", f"hydra/launcher={launcher}"]
                argv += ["hydra.launcher.gpus_per_node=1"] if one else []
            argv += [f"+experiment={','.join(exps)}", *overrides, *sd, *([f"init_from={ip}"] if ip else [])]
            argv += [*([] if ptq else ["resume=true"]), *extra]
            lines.append(shlex.join(argv))
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="qrepro-table sweep", description=__doc__.splitlines()[0])
    p.add_argument("table", help="configs/table/<name>.yaml name, or a path to a table YAML")
    p.add_argument("--launcher", choices=["submitit_slurm", "submitit_local", "torchrun"], default="submitit_slurm")
    p.add_argument("--gpus", type=int, default=8, help="GPUs per cell with --launcher torchrun (default 8)")
    p.add_argument("--cells", default="", help="comma-separated cell ids to keep (fnmatch patterns, e.g. 'r18_*')")
    p.add_argument("--seeds", default="", help="comma-separated seeds for the first wave's training cells")
    p.add_argument("--members", type=int, default=1, help="seeds per batched job (trainer.members; needs --seeds)")
    p.add_argument("extra", nargs="*", help="overrides added to every command, e.g. dataset.root=/data/imagenet")
    a = p.parse_intermixed_args(argv)
    only = [c for c in a.cells.split(",") if c]
    seeds = [int(x) for x in a.seeds.split(",") if x.strip()]
    print("\n".join(one_line_errors(commands)(a.table, a.launcher, a.gpus, a.extra, only, seeds, a.members)))


if __name__ == "__main__":
    main(sys.argv[1:])
