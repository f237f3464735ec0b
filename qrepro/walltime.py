"""Expected wall time of a paper table, derived from a measured benchmark: ``python -m qrepro.walltime``.

    python -m qrepro.walltime apot_table2 --bench results/bench/cpu-amd-epyc-2t.json
    python -m qrepro.walltime tr_table_s1 --bench results/bench/<gpu>.json --gpus 8 --out results/walltime

For every cell of the table the experiment config is composed exactly as ``python -m qrepro.train`` would
(model, quantizer, bit-widths, global batch size, epochs, dataset), and its training throughput is looked up in
a ``python -m qrepro.bench`` result file (rows with status ``ok``; the fastest compiled or eager mode measured).
The estimate is

    T_cell  = E * (N_train / X + N_test / (eval_factor * X)) / (G * efficiency)
    T_table = sum of T_cell                   (one node of G GPUs, the cells one after the other)
    T_waves = sum over waves of max T_cell    (SLURM: one job array per wave, enough nodes for each array)

with X the measured images/s of one device at the per-device batch (global batch / G), E the epochs, N the
dataset sizes. ``eval_factor`` (forward-only evaluation vs a training step, default 2.4: measured with the compiled
evaluation on the 2-core CPU, docs/scaling.md) and ``efficiency`` (multi-GPU scaling, default 1 = linear) are
*assumptions*, printed with the result. A cell whose model/method/precision is not in the benchmark file is listed
as ``not measured`` and left out of the sums (said so in the totals). A row measured at another batch size or
bit-width of the same method is used with a ``~`` mark.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qrepro.bench import FP_METHOD, FP_PRECISION
from qrepro.cli import one_line_errors
from qrepro.config import compose
from qrepro.errors import QreproError
from qrepro.sweep import load_cells, waves
from qrepro.tables.records import portable_str, portable_text

# compiled evaluation / training images/s: ResNet-20 at batch 1000 vs 128 on the 2-core CPU (FP, SAT, APoT: 2.3-2.4)
EVAL_FACTOR = 2.4
DATASET_SIZES = {  # (train images, test images)
    "cifar10": (50_000, 10_000),
    "cifar100": (50_000, 10_000),
    "imagenet": (1_281_167, 50_000),
    "digits": (1_438, 359),
}


@dataclass
class CellEstimate:
    cell: str
    model: str
    method: str
    precision: str
    batch_size: int
    epochs: int
    dataset: str
    image_size: int
    images_per_s: float | None = None  # one device, at the per-device batch
    source: str = ""  # the benchmark row used ("" if none)
    approx: bool = False  # measured at another batch size or bit-width of the same method
    hours: float | None = None


def load_bench(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise QreproError(f"benchmark file {p} not found; create it with: python -m qrepro.bench --out {p.parent}")
    try:
        data = json.loads(p.read_text())
        rows = [r for r in data["rows"] if r.get("status") == "ok" and r.get("images_per_s")]
        # one run in float32: rows of batched members (K runs per step) or of trainer.amp time something else
        rows = [r for r in rows if r.get("members", 1) == 1 and r.get("amp", "off") == "off"]
    except (ValueError, KeyError, TypeError) as e:
        why = type(e).__name__
        raise QreproError(f"benchmark file {p} is not a qrepro.bench result ({why}); re-run the bench") from None
    data["rows"] = rows
    return data


def lookup(rows: list[dict], model: str, method: str, precision: str, batch: int, image_size: int):
    """The fastest matching row: same model, method, image size; the same precision and batch size if measured,
    else (marked approximate) FP's row for a method's W32A32 cell, else the same method at the nearest batch
    size and any bit-width. Never another method's quantized row."""
    cand = [r for r in rows if r["model"] == model and r["method"] == method and r.get("image_size", 32) == image_size]
    exact = [r for r in cand if r["precision"] == precision and r["batch_size"] == batch]
    if exact:
        return max(exact, key=lambda r: r["images_per_s"]), False
    if precision == FP_PRECISION and method != FP_METHOD:  # a method's unquantized cell trains like FP
        fp, _ = lookup(rows, model, FP_METHOD, FP_PRECISION, batch, image_size)
        if fp is not None:
            return fp, True
    if not cand:
        return None, False
    same_prec = [r for r in cand if r["precision"] == precision] or cand
    nearest = min(abs(r["batch_size"] - batch) for r in same_prec)
    best = max((r for r in same_prec if abs(r["batch_size"] - batch) == nearest), key=lambda r: r["images_per_s"])
    return best, True


def estimate_cell(
    cell: dict, rows: list[dict], *, gpus: int = 1, efficiency: float = 1.0, eval_factor: float = EVAL_FACTOR
) -> CellEstimate:
    if cell.get("ptq"):  # post-training quantization of another cell's checkpoint: no training epochs
        e = cell.get("experiment", "?")
        return CellEstimate(cell["id"], "—", "ptq", "—", 0, 0, "—", 0, source=f"PTQ of {e} (calibration, not timed)")
    cfg = compose([f"+experiment={cell['experiment']}", *(cell.get("overrides") or []), "logger=none"])
    dataset = str(cfg.dataset.name)
    if dataset not in DATASET_SIZES:
        raise QreproError(f"no image counts for dataset {dataset!r}; add it to qrepro.walltime.DATASET_SIZES")
    image_size = int(cfg.dataset.get("image_size", 224 if dataset == "imagenet" else 32))
    names = (str(cfg.model.name), str(cfg.quantizer.name), str(cfg.precision.name))
    batch = int(cfg.trainer.batch_size)
    est = CellEstimate(cell["id"], *names, batch, int(cfg.trainer.epochs), dataset, image_size)
    row, est.approx = lookup(rows, *names, max(1, batch // gpus), image_size)
    if row is None:
        return est
    est.images_per_s = float(row["images_per_s"])
    est.source = f"{row['model']} {row['method']} {row['precision']} b{row['batch_size']} {row['mode']}"
    n_train, n_test = DATASET_SIZES[dataset]
    per_epoch_s = (n_train / est.images_per_s + n_test / (eval_factor * est.images_per_s)) / (gpus * efficiency)
    est.hours = est.epochs * per_epoch_s / 3600.0
    return est


def _h(hours: float | None) -> str:
    if hours is None:
        return "not measured"
    if hours >= 48:
        return f"{hours / 24:.1f} d"
    if hours >= 1:
        return f"{hours:.1f} h"
    return f"{hours * 60:.0f} min"


def table_markdown(
    table: str, bench: dict, *, gpus: int, efficiency: float, eval_factor: float
) -> tuple[str, dict[str, Any]]:
    cells = load_cells(table)
    ests = {
        c["id"]: estimate_cell(c, bench["rows"], gpus=gpus, efficiency=efficiency, eval_factor=eval_factor)
        for c in cells
    }
    measured = any(e.hours is not None for e in ests.values())
    ptq = [e.cell for e in ests.values() if e.method == "ptq"]
    missing = [e.cell for e in ests.values() if e.hours is None and e.method != "ptq"]
    total = sum(e.hours or 0.0 for e in ests.values()) if measured else None
    w = sum(max((ests[c["id"]].hours or 0.0) for c in wave) for wave in waves(cells)) if measured else None
    lines = [
        f"### {table}: expected wall time on {gpus} x {bench.get('device', '?')}",
        "",
        f"Throughput from `{bench.get('command', 'python -m qrepro.bench')}` (git "
        f"{str(bench.get('git', {}).get('commit', '?'))[:7]}, {bench.get('finished', '?')}). Assumptions: "
        f"evaluation at {eval_factor:g}x the training images/s, {efficiency:.0%} multi-device scaling. "
        "`~`: measured at another batch size or bit-width of the same method.",
        "",
        "| cell | model | method | bits | batch | epochs | img/s per device | benchmark row | wall time |",
        "|---|---|---|---|---:|---:|---:|---|---:|",
    ]
    for e in ests.values():
        ips = "—" if e.images_per_s is None else f"{'~' if e.approx else ''}{e.images_per_s:.0f}"
        when = "PTQ" if e.method == "ptq" else _h(e.hours)
        lines.append(
            f"| {e.cell} | {e.model} | {e.method} | {e.precision} | {e.batch_size} | {e.epochs} | {ips} | "
            f"{e.source or '—'} | {when} |"
        )
    note = f" ({len(missing)} cell(s) not measured, left out: {', '.join(missing)})" if missing else ""
    if ptq:
        note += f" ({len(ptq)} PTQ cell(s), calibration only, not timed)"
    lines += [
        "",
        f"- one node, cells one after the other: **{_h(total)}**{note}",
        f"- SLURM, one job array per wave: **{_h(w)}** plus queueing",
        "",
    ]
    summary = {
        "table": table,
        "device": bench.get("device"),
        "gpus": gpus,
        "efficiency": efficiency,
        "eval_factor": eval_factor,
        "total_hours": total,
        "waves_hours": w,
        "not_measured": missing,
        "ptq_cells": ptq,
        "cells": [e.__dict__ for e in ests.values()],
    }
    return "\n".join(lines), summary


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m qrepro.walltime", description=__doc__.split("\n\n")[0])
    p.add_argument("tables", nargs="+", help="configs/table/<name> names")
    p.add_argument("--bench", required=True, help="a python -m qrepro.bench result (results/bench/<device>.json)")
    p.add_argument("--gpus", type=int, default=1, help="devices per cell (the global batch is split over them)")
    p.add_argument("--efficiency", type=float, default=1.0, help="assumed multi-device scaling efficiency")
    p.add_argument("--eval-factor", type=float, default=EVAL_FACTOR, help="eval images/s over training images/s")
    p.add_argument("--out", default=None, help="folder for <device>-<gpus>x.md/.json (default: print only)")
    a = p.parse_args(argv)

    @one_line_errors
    def run() -> None:
        if a.gpus < 1 or not 0 < a.efficiency <= 1 or a.eval_factor <= 0:
            raise QreproError("--gpus must be >= 1, --efficiency in (0, 1], --eval-factor > 0")
        bench = load_bench(a.bench)
        opts = {"gpus": a.gpus, "efficiency": a.efficiency, "eval_factor": a.eval_factor}
        parts, summaries = zip(*(table_markdown(t, bench, **opts) for t in a.tables))
        text = "\n".join(parts)
        print(text)
        if a.out:
            out = Path(a.out)
            out.mkdir(parents=True, exist_ok=True)
            stem = f"{bench.get('device_slug', Path(a.bench).stem)}-{a.gpus}x"
            (out / f"{stem}.md").write_text(portable_str(f"# Expected wall time per table\n\n{text}"))
            (out / f"{stem}.json").write_text(portable_text(list(summaries)))
            print(f"wrote {out / stem}.md / .json", file=sys.stderr)

    run()


if __name__ == "__main__":
    main()
