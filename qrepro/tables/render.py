"""Compared rows as Markdown, CSV and LaTeX. Deterministic: table order, fixed float formats, no dates."""

from __future__ import annotations

import csv
import io
import json
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from qrepro.tables.compare import CHANCE_MARGIN, Row, other_metric, override_diff, summary
from qrepro.tables.records import Record
from qrepro.tables.schema import Cell, Table, experiment_file

METRIC_LABEL = {"top1": "top-1 accuracy (%)", "top5": "top-5 accuracy (%)", "ap": "COCO average precision AP (%)"}
SELECT_LABEL = {"best": "the best test accuracy over epochs", "last": "the last epoch's test accuracy"}

LEGEND = (
    "Columns: *paper* = the paper's number; *ours* = mean ± sample std over the *n* seeds we ran; "
    "*Δ* = ours − paper; *paper ΔFP* / *ours ΔFP* = this cell minus the full-precision cell of the same row "
    "(paper's numbers / ours); *gap* = ours ΔFP − paper ΔFP. "
    "Verdict: when both FP values exist the basis is the gap (*dFP*), which survives a different dataset "
    "copy or FP recipe; otherwise the absolute difference Δ (*abs*). pass = |basis| ≤ tolerance (exactly at "
    "the tolerance passes), fail otherwise (in either direction); *missing* = no complete run record yet "
    "(never filled in); *diverged* = the only runs stopped on a non-finite loss; *n/a* = the paper prints no "
    "number; *paper only* = a row of the paper that is not runnable here (its config column says why)."
)

CSV_COLUMNS = tuple(
    "table cell experiment overrides model dataset method optimizer w_bits a_bits metric select paper paper_fp "
    "paper_dfp ours_mean ours_std n ours_fp ours_dfp diff gap basis tolerance verdict paper_other ours_other_mean "
    "note seeds records config".split()
)


def fmt(value: float | None, digits: int = 2, *, signed: bool = False, empty: str = "—") -> str:
    if value is None:
        return empty
    if round(value, digits) == 0:
        value = 0.0  # no "-0.00"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def posix_relpath(path: str | Path, base: str | Path) -> str:
    """``path`` relative to ``base`` with forward slashes (a link in a generated file)."""
    return Path(os.path.relpath(Path(path), Path(base))).as_posix()


def _seed_label(seed: object) -> str:
    return f"s{seed}" if seed is not None else "run"


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def ours_text(row: Row, *, other: bool = False, pm: str = " ± ", empty: str = "—") -> str:
    """``mean ± std`` over seeds (just the mean for one seed, ``empty`` for none)."""
    stats = row.other if other else row.ours
    if stats.n == 0:
        return empty
    text = fmt(stats.mean) if stats.std is None else f"{fmt(stats.mean)}{pm}{fmt(stats.std)}"
    return f"{text} (chance)" if row.at_chance and not other else text


def run_notes(row: Row) -> list[str]:
    """What sets the cell's counted runs apart from its recipe as written (``qrepro.config.SAME_CELL_KEYS``, e.g.
    gradient accumulation), each note once with the seeds it concerns (all the cell's runs: no seeds named)."""
    seeds: dict[str, list[str]] = {}
    for rec in row.records:
        for note in rec.same_cell_notes():
            seeds.setdefault(note, []).append(_seed_label(rec.seed))
    n = len(row.records)
    return [note[0].upper() + note[1:] if len(s) == n else f"{', '.join(s)}: {note}" for note, s in seeds.items()]


def cell_notes(row: Row) -> list[str]:
    """The cell's own note (table file), the notes of its runs (:func:`run_notes`) and, when its runs sit at
    chance level, the chance note."""
    note = row.cell.extra.get("note")
    notes = ([note] if isinstance(note, str) else []) + run_notes(row)
    if row.at_chance:
        n = round(100.0 / row.chance) if row.chance else 0
        notes.append(
            f"At chance level: every run of this cell is within {CHANCE_MARGIN:.0f} points of guessing "
            f"({fmt(row.chance)} % with {n} classes); the quantized model does not work, the number is not a result."
        )
    return notes


def cell_other_runs(table: Table, cell: Cell, records: Sequence[Record], *, markdown: bool = True) -> list[str]:
    """The runs of the cell's experiment under other overrides (``records``), grouped by how their overrides
    differ from the cell's, and how to count them."""
    q = (lambda x: f"`{x}`") if markdown else str
    # (the overrides the runs add, the cell's they lack) -> how many runs
    diffs = Counter(tuple(tuple(side) for side in override_diff(cell, rec)) for rec in records)
    out = []
    for (extra, lacking), n in diffs.items():
        what = [f"{word} " + " ".join(map(q, os)) for word, os in (("with", extra), ("without", lacking)) if os]
        line = f"{q(cell.id)}: {n} run(s) of {cell.experiment} {' and '.join(what)}"
        if extra and not lacking:
            line += f"; to count them: {q('qrepro-table render ' + table.name + ' ' + ' '.join(extra))}"
        else:
            line += "; they are another experiment: rerun the cell (qrepro-table plan " + table.name + ")"
        out.append(line)
    return out


def other_runs_lines(table: Table, rows: Sequence[Row], *, markdown: bool = True) -> list[str]:
    """For each cell without runs: the runs of its experiment under other overrides, and how to count them."""
    return [line for r in rows for line in cell_other_runs(table, r.cell, r.elsewhere, markdown=markdown)]


def verdict_text(row: Row) -> str:
    return f"{row.verdict} ({row.basis})" if row.basis else row.verdict


def to_markdown(
    table: Table,
    rows: Sequence[Row],
    select: str,
    *,
    configs: str | Path = "configs",
    link_base: str | Path = ".",
    heading: str = "#",
) -> str:
    """The table as GitHub Markdown; links are relative to ``link_base`` (the folder the file lands in)."""
    show_opt = any(r.cell.optimizer for r in rows)
    show_ds = len({r.cell.dataset for r in rows}) > 1
    show_other = any(r.paper_other is not None for r in rows)
    other = other_metric(table.metric)
    cols = ["cell", "model"] + (["dataset"] if show_ds else []) + ["method"] + (["optimizer"] if show_opt else [])
    cols += ["W/A", "paper", "ours", "n", "Δ", "paper ΔFP", "ours ΔFP", "gap", "verdict"]
    cols += [f"paper {other}", f"ours {other}"] if show_other else []
    cols += ["records", "config"]
    src = table.path if table.path is not None else Path(configs, "table", f"{table.name}.yaml")
    out = [
        f"{heading} {table.paper} — {table.title}",
        "",
        f"Generated by `python -m qrepro.tables {table.name}` from local run records — do not edit by hand. "
        f"Table file: [{Path(src).as_posix()}]({posix_relpath(src, link_base)}).",
        "",
        f"Metric: {METRIC_LABEL[table.metric]}; ours = {SELECT_LABEL[select]} (`--select {select}`); "
        f"the paper reports {SELECT_LABEL[table.reported]}. Tolerance: ±{table.tolerance:.2f} points.",
    ]
    if select != table.reported:
        out += [
            "",
            f"**Note:** ours uses `--select {select}` but the paper reports `{table.reported}`: not like for like.",
        ]
    if not show_ds:
        out[-1] += f" Dataset: {rows[0].cell.dataset}." if rows else ""
    if isinstance(table.extra.get("note"), str):
        out += ["", f"Note: {table.extra['note']}"]
    # cell notes as numbered footnotes; equal texts share a number
    notes = {note: i + 1 for i, note in enumerate(dict.fromkeys(n for r in rows for n in cell_notes(r)))}
    out += ["", "| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        c = r.cell
        mark = "".join(f" [{notes[n]}]" for n in cell_notes(r))
        links = [f"[{_seed_label(rec.seed)}]({posix_relpath(rec.path, link_base)})" for rec in r.records]
        links += [f"[{_seed_label(rec.seed)} diverged]({posix_relpath(rec.path, link_base)})" for rec in r.diverged]
        cfg = f"[{c.experiment}]({posix_relpath(experiment_file(c.experiment, configs), link_base)})"
        cfg += "".join(f" `{_md_escape(o)}`" for o in c.overrides)
        cfg = cfg if c.runnable else f"not runnable here: {c.why}"
        cells = [f"`{c.id}`{mark}", c.model] + ([c.dataset] if show_ds else []) + [c.method]
        cells += [c.optimizer or "—"] if show_opt else []
        cells += [c.precision, fmt(c.paper), f"**{ours_text(r)}**" if r.at_chance else ours_text(r), str(r.ours.n)]
        cells += [fmt(v, signed=True) for v in (r.diff, r.paper_dfp, r.ours_dfp, r.gap)]
        cells += [f"**{verdict_text(r)}**" if r.verdict in ("fail", "diverged") else verdict_text(r)]
        cells += [fmt(r.paper_other), ours_text(r, other=True)] if show_other else []
        cells += [" ".join(links) or "—", cfg]
        out.append("| " + " | ".join(_md_escape(x) if "](" not in x else x for x in cells) + " |")
    out += ["", summary(rows) + "."]
    others = other_runs_lines(table, rows)
    if others:
        out += ["", "Runs under other overrides (not counted as the cell):", ""] + [f"- {x}" for x in others]
    if notes:
        out += [""] + [f"[{i}] {_md_escape(text)}  " for text, i in notes.items()]
    return "\n".join(out) + "\n\n"


def to_csv(table: Table, rows: Sequence[Row], select: str, *, configs: str | Path = "configs") -> str:
    """One line per cell, floats with 4 decimals, empty fields for missing values."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    other = other_metric(table.metric)
    w.writerow([col.replace("other", other) if col.endswith(("_other", "_other_mean")) else col for col in CSV_COLUMNS])
    for r in rows:
        c = r.cell
        w.writerow(
            [table.name, c.id, c.experiment, " ".join(c.overrides), c.model, c.dataset, c.method, c.optimizer or ""]
            + [c.w_bits, c.a_bits, table.metric, select]
            + [fmt(v, 4, empty="") for v in (c.paper, r.paper_fp, r.paper_dfp, r.ours.mean, r.ours.std)]
            + [r.ours.n]
            + [fmt(v, 4, empty="") for v in (r.ours_fp, r.ours_dfp, r.diff, r.gap)]
            + [r.basis or "", fmt(table.tolerance, 4), r.verdict]
            + [fmt(r.paper_other, 4, empty=""), fmt(r.other.mean, 4, empty=""), " ".join(cell_notes(r))]
            + [" ".join(json.dumps(rec.seed) for rec in r.records), " ".join(rec.path.as_posix() for rec in r.records)]
            + [experiment_file(c.experiment, configs).as_posix() if c.runnable else f"not runnable here: {c.why}"]
        )
    return buf.getvalue()


_TEX = {ch: "\\" + ch for ch in "&%$#_{}"} | {
    "\\": r"\textbackslash{}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}


def tex_escape(text: str) -> str:
    return "".join(_TEX.get(ch, ch) for ch in text)


def to_latex(table: Table, rows: Sequence[Row], select: str) -> str:
    """A booktabs ``table`` environment (needs ``\\usepackage{booktabs}``)."""

    def f(v: float | None, signed: bool = False) -> str:
        return fmt(v, signed=signed, empty="--")

    caption = tex_escape(f"{table.paper} — {table.title}") + f" ({tex_escape(table.metric)}, ours = {select}, "
    lines = [
        "% Generated by python -m qrepro.tables " + table.name + " -- do not edit by hand.",
        r"\begin{table}[t]",
        r"\centering",
        r"\caption{" + caption + f"paper = {table.reported}, tolerance {table.tolerance:.2f})" + "}",
        r"\label{tab:" + tex_escape(table.name) + "}",
        r"\begin{tabular}{llllrrrrrrl}",
        r"\toprule",
        r"Cell & Model & Method & W/A & Paper & Ours & $n$ & $\Delta$ & Paper $\Delta$FP & Ours $\Delta$FP "
        r"& Verdict \\",
        r"\midrule",
    ]
    for r in rows:
        c = r.cell
        ours = ours_text(r, pm=r" $\pm$ ", empty="--") + (r"$^\dagger$" if run_notes(r) else "")
        fields = [tex_escape(c.id), tex_escape(c.model), tex_escape(c.method), c.precision, f(c.paper), ours]
        fields += [str(r.ours.n), f(r.diff, True), f(r.paper_dfp, True), f(r.ours_dfp, True)]
        lines.append(" & ".join([*fields, tex_escape(verdict_text(r))]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    notes = list(dict.fromkeys(f"{r.cell.id}: {n}" for r in rows for n in run_notes(r)))
    if notes:  # runs that count as their cell but differ from its recipe (e.g. gradient accumulation)
        lines += [r"\par\footnotesize $^\dagger$ " + tex_escape("; ".join(notes)) + "."]
    lines += [r"\end{table}", ""]
    return "\n".join(lines)
