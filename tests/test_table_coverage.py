"""Paper-only rows (``why:``) and the coverage count (qrepro.tables.coverage), on a made-up config root."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from qrepro.errors import QreproError
from qrepro.run_table import ordered_cells
from qrepro.tables import check_experiments, compare, load_table, summary
from qrepro.tables.coverage import (
    BEGIN,
    END,
    NO_FP_ROW,
    coverage,
    coverage_line,
    coverage_markdown,
    load_coverage,
    update_readme_coverage,
)
from qrepro.tables.render import to_csv, to_markdown

REPO = Path(__file__).resolve().parents[1]
HEAD = {"paper": "P", "title": "T", "metric": "top1", "reported": "best", "tolerance": 1.0}


def _cell(cid, exp, w=4, a=4, paper=70.0, **kw):
    return {"id": cid, "experiment": exp, "model": "m", "dataset": "d", "method": kw.pop("method", "M"),
            "w_bits": w, "a_bits": a, "paper": paper, **kw}  # fmt: skip


def _root(tmp_path: Path, tables: dict[str, list[dict]], experiments=("e_fp", "e_q"), **head) -> Path:
    """A config root with ``experiment/<e>.yaml`` for ``experiments`` and one table file per entry."""
    (tmp_path / "experiment").mkdir(parents=True, exist_ok=True)
    (tmp_path / "table").mkdir(exist_ok=True)
    for e in experiments:
        (tmp_path / "experiment" / f"{e}.yaml").write_text("# @package _global_\n")
    for name, cells in tables.items():
        data = {"name": name, **HEAD, **head.get(name, {}), "cells": cells}
        (tmp_path / "table" / f"{name}.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return tmp_path


def _demo(tmp_path: Path) -> Path:
    return _root(
        tmp_path,
        {
            "t": [
                _cell("fp", "e_fp", 32, 32, 71.0, paper_top5=90.0),
                _cell("q4", "e_q", paper=70.0, paper_top5=89.0, paper_fp=71.0, fp_cell="fp"),
                _cell("lq_fp", "lq_fp", 32, 32, 72.0, method="lq", why="no experiment config yet"),
                _cell(
                    "lq4",
                    "lq_w4",
                    paper=69.0,
                    paper_top5=88.0,
                    paper_fp=72.0,
                    fp_cell="lq_fp",
                    method="lq",
                    why="no experiment config yet",
                ),  # fmt: skip
                _cell("lq3", "lq_w3", w=3, a=3, paper=None, method="lq", why="no experiment config yet"),  # NA
                _cell("h4", "h_w4", paper=68.0, paper_fp=70.5, method="haq", why="policy not published"),
                _cell("h5", "h_w5", w=5, a=5, paper=69.5, paper_fp=70.5, method="haq", why="policy not published"),
            ],
            "t_again": [_cell("q4", "e_q", paper=70.0)],
        },
        t_again={"same_numbers_as": "t"},
    )


# ----------------------------------------------------------------------------------------------- schema


def test_row_is_runnable_iff_its_experiment_exists(tmp_path):
    root = _demo(tmp_path)
    table = load_table(root / "table" / "t.yaml")
    assert [c.id for c in table.cells if c.runnable] == ["fp", "q4"]
    assert table.cell("lq4").why == "no experiment config yet" and table.cell("q4").why is None
    check_experiments(table, root)  # every row runnable or with a why
    (root / "experiment" / "lq_w4.yaml").write_text("# @package _global_\n")  # the method lands
    again = load_table(root / "table" / "t.yaml")
    assert again.cell("lq4").runnable and again.cell("lq4").why == "no experiment config yet"
    assert coverage([again]).stale == [("t", "lq4")]


def test_row_without_experiment_needs_a_why(tmp_path):
    root = _root(tmp_path, {"t": [_cell("fp", "e_fp", 32, 32), _cell("x", "nowhere")]})
    table = load_table(root / "table" / "t.yaml")
    with pytest.raises(QreproError, match="one-line why"):
        check_experiments(table, root)


def test_why_is_one_line_and_runnable_rows_do_not_start_from_paper_only_rows(tmp_path):
    root = _root(tmp_path, {"t": [_cell("fp", "e_fp", 32, 32, why="a\nb")]})
    with pytest.raises(QreproError, match="one line"):
        load_table(root / "table" / "t.yaml")
    root = _root(
        tmp_path, {"t": [_cell("src", "gone", 32, 32, why="not yet"), _cell("q", "e_q", init_from_cell="src")]}
    )
    with pytest.raises(QreproError, match="starts from 'src'"):
        check_experiments(load_table(root / "table" / "t.yaml"), root)


def test_paper_only_rows_are_rendered_and_skipped_by_plan_and_sweep(tmp_path, monkeypatch):
    root = _demo(tmp_path)
    table = load_table(root / "table" / "t.yaml")
    assert [c.id for c in ordered_cells(table)] == ["fp", "q4"]
    assert ordered_cells(table, ["lq*"]) == []
    rows = {r.cell.id: r for r in compare(table, [])}
    assert rows["lq4"].verdict == "paper only" and rows["q4"].verdict == "missing"
    assert rows["lq4"].paper_dfp == pytest.approx(-3.0)  # the paper's own FP row
    assert (
        summary(list(rows.values())) == "0/7 cells present: 0 pass, 0 fail, 2 missing, 5 paper only (not runnable here)"
    )
    md = to_markdown(table, list(rows.values()), "best", configs=root)
    line = next(x for x in md.splitlines() if x.startswith("| `lq4`"))
    assert "69.00" in line and "not runnable here: no experiment config yet" in line and "lq_w4](" not in line
    assert "not runnable here: policy not published" in to_csv(table, list(rows.values()), "best", configs=root)

    import qrepro.sweep as sweep

    monkeypatch.setattr(sweep, "CONFIG_DIR", str(root))
    assert [c["id"] for c in sweep.load_cells("t")] == ["fp", "q4"]


# --------------------------------------------------------------------------------------------- coverage


def test_coverage_counts_each_printed_number_once(tmp_path):
    root = _demo(tmp_path)
    cov = load_coverage(root)
    # t: fp 2 (top-1, top-5) + q4 2 (its paper_fp is fp's number) + lq_fp 1 + lq4 2 (lq3 prints NA: 0)
    #    + h4 1 + h5 1 + haq's FP 70.5, printed without a row of its own, once = 10; t_again: the same numbers, 0
    assert (cov.total, cov.runnable) == (10, 4)
    assert cov.by_table() == {"t": (10, 4)}
    assert cov.missing() == {
        "no experiment config yet": {"lq": 3},
        "policy not published": {"haq": 2},
        NO_FP_ROW: {"FP": 1},
    }
    line = coverage_line(cov)
    assert line.startswith("Coverage: 4 of 10 numbers printed in the papers' tables (40 %) have a runnable cell;")
    assert "6 do not: 3 no experiment config yet; 2 policy not published; 1 " in line
    md = coverage_markdown(cov)
    assert "| t | 10 | 4 | 6 |" in md and "| policy not published | haq | 2 |" in md

    (root / "experiment" / "lq_fp.yaml").write_text("# @package _global_\n")
    (root / "experiment" / "lq_w4.yaml").write_text("# @package _global_\n")
    assert load_coverage(root).runnable == 7


def test_readme_coverage_block(tmp_path):
    cov = load_coverage(_demo(tmp_path / "c"))
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{BEGIN}\nold\n{END}\n\nrest\n")
    assert update_readme_coverage(readme, cov)
    text = readme.read_text()
    assert "old" not in text and coverage_line(cov) in text and text.endswith(f"{END}\n\nrest\n")
    assert not update_readme_coverage(tmp_path / "none.md", cov)


def test_repo_coverage_is_computed_from_the_table_files():
    """Every number of the repo's table files is counted; every paper-only row says why."""
    cov = load_coverage(REPO / "configs")
    assert cov.total >= cov.runnable > 0
    assert all(n.why for n in cov.numbers if not n.runnable)


def test_runnable_rows_with_overrides_compose():
    """Every runnable row's experiment builds and steps in tests/test_experiments_step.py; here the rows' overrides
    on top of it compose too: one row per distinct override shape (the keys, and the values of group choices)."""
    from qrepro.builders import compose
    from qrepro.tables import table_paths

    shapes: dict[tuple, tuple] = {}
    for path in table_paths(REPO / "configs"):
        for c in load_table(path).cells:
            if c.runnable and c.overrides and not c.extra.get("ptq"):
                shape = tuple(o if "." not in o.split("=", 1)[0] else o.split("=", 1)[0] for o in c.overrides)
                shapes.setdefault(shape, (c.experiment, c.overrides))
    assert shapes
    for experiment, overrides in shapes.values():
        cfg = compose([f"+experiment={experiment}", *overrides, "logger=none"])
        assert cfg.name


def test_plan_prints_the_coverage_line_and_skips_paper_only_rows(tmp_path, capsys):
    from qrepro.table import main

    assert main(["plan", "sat_table1", "--cells", "pact_mbv1_w4*,mbv1_fp", "--runs", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    cell = load_table(REPO / "configs" / "table" / "sat_table1.yaml").cell("pact_mbv1_w4a4")
    runnable = cell.runnable
    assert any("+experiment=sat_mbv1_fp" in x for x in lines)
    assert any(f"+experiment={cell.experiment}" in x for x in lines if "qrepro.train" in x) == runnable
    assert ("paper-only row(s) not runnable here, skipped: pact_mbv1_w4a4" in out) != runnable
    assert lines[-1].startswith("# Coverage: ") and lines[-1].endswith("(breakdown: qrepro-table coverage)")
    assert main(["coverage"]) == 0
    breakdown = capsys.readouterr().out
    assert breakdown.startswith("Coverage: ") and "| table | numbers | runnable | missing |" in breakdown
    assert "| object detection is not implemented | TR | 48 |" in breakdown  # TR Table S2 stays paper-only
