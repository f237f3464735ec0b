"""Paper tables from run records (qrepro.tables) and running a table (qrepro.run_table), on fixture records.

Fixture table ``tests/fixtures/tables/configs/table/demo.yaml`` (made-up numbers) and its records:
fp: seeds 0/1/2 at 90/91/92 (best), w4: seeds 0/1 at 90.0/90.4 (seed 1's overrides carry every ignored key),
w3: 88.0, w2: only an incomplete record, w4_sgdt: TR curves and no paper number, ptq_w4: no record; plus a
w4 record with another recipe (must not match) and a copy of fp seed 0 under a second root (counted once).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from qrepro.errors import QreproError
from qrepro.run_table import RunResult, ordered_cells, parse_record_line, plan
from qrepro.run_table import main as run_table_main
from qrepro.tables import (
    canonical_overrides,
    check_experiments,
    compare,
    load_records,
    load_table,
    parse_table,
    table_paths,
)
from qrepro.tables.cli import main as tables_main
from qrepro.tables.compare import failures, within

FIX = Path(__file__).parent / "fixtures" / "tables"
CONFIGS = FIX / "configs"
ROOTS = [FIX / "runs_local", FIX / "records"]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def table():
    return load_table(CONFIGS / "table" / "demo.yaml")


@pytest.fixture(scope="module")
def records():
    return load_records(ROOTS)


@pytest.fixture(scope="module")
def rows(table, records):
    return {r.cell.id: r for r in compare(table, records)}


def _raw() -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(CONFIGS / "table" / "demo.yaml"))


# ----------------------------------------------------------------------------------------------- schema


def test_fixture_table_loads(table):
    assert table.ids() == ["fp", "w4", "w3", "w2", "w4_sgdt", "ptq_w4"]
    assert table.cell("w4").overrides == ("precision=w4a4",)
    assert table.cell("ptq_w4").ptq_from_cell == "fp"  # unknown extra fields kept, not rejected
    assert table.cell("w4_sgdt").paper is None and table.cell("w4_sgdt").extra["note"] == "not reported"
    assert [table.cell(i).precision for i in ("fp", "w4", "ptq_w4")] == ["FP", "W4A4", "W4A32"]
    check_experiments(table, CONFIGS)


def _broken(edit) -> dict:
    data = copy.deepcopy(_raw())
    edit(data)
    return data


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.pop("tolerance"), "missing table field(s) tolerance"),
        (lambda d: d["cells"][1].pop("paper"), "cell 'w4': missing field(s) paper"),
        (lambda d: d["cells"][1].pop("experiment"), "missing field(s) experiment"),
        (lambda d: d["cells"][2].update(id="w4"), "duplicate cell id 'w4'"),
        (lambda d: d["cells"][1].update(fp_cell="fp32"), "fp_cell 'fp32' points to no cell"),
        (
            lambda d: d["cells"][1].update(init_from_cell="nowhere"),
            "init_from_cell 'nowhere' points to no cell",
        ),
        (lambda d: d["cells"][5]["ptq"].update(from_cell="x"), "ptq.from_cell 'x' points to no cell"),
        (lambda d: d["cells"][1].update(init_from_cell="w2"), "cycle"),
        (lambda d: d["cells"][1].update(fp_cell="w4"), "points to the cell itself"),
        (lambda d: d.update(metric="top2"), "metric must be one of"),
        (lambda d: d.update(reported="mean"), "reported must be one of"),
        (lambda d: d.update(tolerance=-1), "tolerance must be >= 0"),
        (lambda d: d.update(cells=[]), "cells must be a non-empty list"),
        (lambda d: d["cells"][1].update(w_bits=0), "w_bits must be an integer 1..32"),
        (lambda d: d["cells"][1].update(a_bits="4"), "a_bits must be an integer 1..32"),
        (lambda d: d["cells"][1].update(paper="70,5"), "paper must be a number"),
        (lambda d: d["cells"][1].update(overrides="precision=w4a4"), "overrides must be a list"),
        (lambda d: d["cells"][1].update(overrides=["precision"]), "overrides must be a list of 'key=value'"),
        (lambda d: d["cells"][1].update(ptq="aciq"), "ptq must be a mapping"),
        (lambda d: d.update(name="other"), "must equal the file name"),
    ],
)
def test_malformed_table_is_a_one_line_error(edit, message):
    with pytest.raises(QreproError) as err:
        parse_table(_broken(edit), CONFIGS / "table" / "demo.yaml")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_yaml_syntax_error_and_missing_experiment(tmp_path, table):
    bad = tmp_path / "table" / "bad.yaml"
    bad.parent.mkdir()
    bad.write_text("name: bad\ncells: [\n")
    with pytest.raises(QreproError, match="cannot parse the table YAML"):
        load_table(bad)
    with pytest.raises(QreproError, match="has no file"):
        check_experiments(table, tmp_path)


# ------------------------------------------------------------------------------------ repo table files


REPO_TABLES = table_paths(REPO / "configs")


@pytest.mark.parametrize("path", REPO_TABLES, ids=[p.stem for p in REPO_TABLES])
def test_every_repo_table_is_valid(path):
    """Every configs/table/*.yaml loads, validates and names existing experiments (no-op while none exist)."""
    table = load_table(path)
    check_experiments(table, REPO / "configs")
    rows = compare(table, [])
    assert rows and all(r.verdict == ("missing" if r.cell.runnable else "paper only") for r in rows)


def test_repo_table_check_would_catch_a_malformed_table(tmp_path):
    (tmp_path / "table").mkdir()
    (tmp_path / "table" / "t.yaml").write_text("name: t\npaper: X\ntitle: T\nmetric: top1\nreported: best\n")
    (path,) = table_paths(tmp_path)
    with pytest.raises(QreproError, match="missing table field"):
        load_table(path)


# ----------------------------------------------------------------------------------------- records


def test_override_canonicalisation():
    same = canonical_overrides(["precision=w4a4", "optimizer.lr=0.0001"])
    assert canonical_overrides(["+precision=w4a4", "++optimizer.lr=1e-4"]) == same
    ignored = [
        "seed=3",
        "dataset.root=/x",
        "init_from=a.pt",
        "resume=true",
        "trainer.device=cuda",
        "logger=wandb",
        "++logger.group=t",
        "hydra.run.dir=.",
        "+experiment=q",
        "trainer.compile=true",
        "force=true",
    ]
    assert canonical_overrides(["precision=w4a4", "optimizer.lr=1e-4", *ignored]) == same
    assert canonical_overrides(["precision=w4a4"]) != same
    assert canonical_overrides(["seed=3"], keep_seed=True) != canonical_overrides([], keep_seed=True)
    assert canonical_overrides(["~trainer.ema"]) != canonical_overrides(["trainer.ema=null"])


def test_records_complete_only_and_deduplicated(records):
    paths = [r.path.relative_to(FIX).as_posix() for r in records]
    assert "runs_local/demo_q/precision=w2a2/record.json" not in paths  # complete: false
    fp0 = [p for p in paths if "demo_fp/seed=0" in p]
    assert fp0 == ["runs_local/demo_fp/seed=0/record.json"]  # the newer of two copies of one run
    assert len(load_records(ROOTS, complete_only=False)) == len(records) + 1


def test_unreadable_record_is_skipped(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "record.json").write_text("{not json")
    assert load_records([tmp_path, tmp_path / "absent"]) == []
    assert "skipping unreadable record" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ compare


def test_aggregation_over_seeds(rows):
    fp = rows["fp"]
    assert fp.ours.n == 3 and fp.ours.mean == pytest.approx(91.0) and fp.ours.std == pytest.approx(1.0)
    w4 = rows["w4"]  # seed 1's record has seed/dataset.root/logger/device/init_from/hydra overrides: still matches
    assert w4.ours.n == 2 and w4.ours.mean == pytest.approx(90.2) and w4.ours.std == pytest.approx(0.2828427)
    assert [r.seed for r in w4.records] == [0, 1]
    assert rows["w3"].ours.n == 1 and rows["w3"].ours.std is None


def test_fp_difference_column_and_verdicts(rows):
    w4 = rows["w4"]
    assert w4.diff == pytest.approx(-1.3)  # would fail on the absolute difference ...
    assert w4.ours_dfp == pytest.approx(-0.8) and w4.paper_dfp == pytest.approx(-0.5)
    assert w4.gap == pytest.approx(-0.3) and (w4.basis, w4.verdict) == ("dFP", "pass")  # ... passes on ΔFP
    w3 = rows["w3"]  # paper_fp omitted: the FP cell's paper value (92.0) is used
    assert w3.paper_fp == 92.0 and w3.gap == pytest.approx(-2.0) and w3.verdict == "fail"
    assert (rows["fp"].basis, rows["fp"].verdict) == ("abs", "pass")  # |91 − 92| = 1.0: exactly at tolerance
    assert rows["w2"].verdict == "missing" and rows["w2"].ours.mean is None and rows["w2"].diff is None
    assert rows["ptq_w4"].verdict == "missing"
    assert rows["w4_sgdt"].verdict == "n/a" and rows["w4_sgdt"].ours.n == 1


def test_select_last(table, records):
    rows = {r.cell.id: r for r in compare(table, records, "last")}
    assert rows["fp"].ours.mean == pytest.approx(90.5) and rows["w4"].ours.mean == pytest.approx(89.3)
    with pytest.raises(QreproError, match="--select"):
        compare(table, records, "mean")


def _one_cell_table(paper: float, paper_fp: float | None, tolerance: float) -> dict:
    cell = {
        "id": "q",
        "experiment": "e_q",
        "model": "m",
        "dataset": "d",
        "method": "M",
        "w_bits": 4,
        "a_bits": 4,
        "paper": paper,
    }
    fp = dict(cell, id="fp", experiment="e_fp", w_bits=32, a_bits=32, paper=paper_fp if paper_fp else 99.0)
    if paper_fp is not None:
        cell.update(fp_cell="fp", paper_fp=paper_fp)
    return {
        "name": "t",
        "paper": "P",
        "title": "T",
        "metric": "top1",
        "reported": "best",
        "tolerance": tolerance,
        "cells": [fp, cell],
    }


def _records(tmp_path: Path, values: dict[str, float]) -> list:
    for exp, best in values.items():
        d = tmp_path / exp
        d.mkdir(parents=True, exist_ok=True)
        rec = {
            "complete": True,
            "experiment": exp,
            "overrides": [f"+experiment={exp}"],
            "seed": 0,
            "metrics": {"best_top1": best, "last_top1": best},
        }
        (d / "record.json").write_text(json.dumps(rec))
    return load_records([tmp_path])


@pytest.mark.parametrize(
    "ours, verdict",
    [(70.1, "pass"), (72.1, "pass"), (70.09, "fail"), (72.11, "fail")],  # |71.1 − ours| = 1.0 exactly passes
)
def test_tolerance_edges_absolute(tmp_path, ours, verdict):
    table = parse_table(_one_cell_table(71.1, None, 1.0))
    (row,) = [r for r in compare(table, _records(tmp_path, {"e_q": ours})) if r.cell.id == "q"]
    assert (row.basis, row.verdict) == ("abs", verdict)


@pytest.mark.parametrize("ours_q, verdict", [(69.3, "pass"), (71.3, "pass"), (69.29, "fail"), (71.31, "fail")])
def test_tolerance_edges_fp_difference(tmp_path, ours_q, verdict):
    # paper: 71.1 − 72.0 = −0.9; ours: q − 71.2; gap = q − 70.3, so |gap| = 1.0 at 69.3 and 71.3
    table = parse_table(_one_cell_table(71.1, 72.0, 1.0))
    (row,) = [r for r in compare(table, _records(tmp_path, {"e_q": ours_q, "e_fp": 71.2})) if r.cell.id == "q"]
    assert (row.basis, row.verdict) == ("dFP", verdict)
    assert within(1.0 + 1e-12, 1.0) and not within(1.0 + 1e-6, 1.0)


def test_diverged_run_is_shown_never_filled_in(tmp_path):
    d = tmp_path / "q"
    d.mkdir()
    rec = {
        "complete": False,
        "status": "diverged",
        "experiment": "e_q",
        "overrides": [],
        "seed": 0,
        "metrics": {"best_top1": 60.0, "last_top1": 10.0},
    }
    (d / "record.json").write_text(json.dumps(rec))
    table = parse_table(_one_cell_table(71.1, None, 1.0))
    (row,) = [r for r in compare(table, load_records([tmp_path], complete_only=False)) if r.cell.id == "q"]
    assert (row.verdict, row.ours.n, row.ours.mean, len(row.diverged)) == ("diverged", 0, None, 1)
    assert failures([row]) == [row]
    (row,) = [r for r in compare(table, load_records([tmp_path])) if r.cell.id == "q"]
    assert row.verdict == "missing"


def test_fp_cell_without_records_falls_back_to_absolute(tmp_path):
    table = parse_table(_one_cell_table(71.1, 72.0, 1.0))
    (row,) = [r for r in compare(table, _records(tmp_path, {"e_q": 70.5})) if r.cell.id == "q"]
    assert (row.basis, row.verdict, row.gap) == ("abs", "pass", None)


# ---------------------------------------------------------------------------------------------- CLI


def _cli(tmp_path: Path, *extra: str, out: str = "out") -> list[str]:
    return [
        "--configs",
        str(CONFIGS),
        "--runs",
        *map(str, ROOTS),
        "--out",
        str(tmp_path / out / "tables"),
        "--figures",
        str(tmp_path / out / "figures"),
        *extra,
    ]


def test_cli_writes_tables_and_verify_fails(tmp_path, capsys):
    assert tables_main(["demo", "--format", "md,csv,tex", "--no-figures", *_cli(tmp_path)]) == 0
    out = tmp_path / "out" / "tables"
    md = (out / "demo.md").read_text()
    assert "| `w4` |" in md and "90.20 ± 0.28" in md and "pass (dFP)" in md and "**fail (dFP)**" in md
    assert "precision=w4a4/record.json" in md and "configs/experiment/demo_q.yaml" in md
    assert "4/6 cells present: 2 pass, 1 fail, 2 missing" in md
    assert "Note: Fixture note shown under the table header." in md  # table note
    assert "| `w2` [1] |" in md and "| `w4_sgdt` [1] |" in md and "[1] not reported" in md  # shared footnote
    assert "| paper top5 | ours top5 |" in md and "| 99.50 | 99.00 ± 0.00 |" in md  # paper_top5 given
    csv_lines = (out / "demo.csv").read_text().splitlines()
    assert len(csv_lines) == 7 and csv_lines[0].startswith("table,cell,experiment")
    assert ",paper_top5,ours_top5_mean,note," in csv_lines[0] and ",99.5000,99.0000,," in csv_lines[1]
    assert "\\toprule" in (out / "demo.tex").read_text()
    capsys.readouterr()
    assert tables_main(["demo", "--verify", "--no-figures", *_cli(tmp_path)]) == 1
    printed = capsys.readouterr().out
    assert "FAIL demo/w3" in printed and "FAIL demo/w4" not in printed


def test_cli_verify_passes_and_user_errors(tmp_path, capsys):
    args = ["--configs", str(CONFIGS), "--out", str(tmp_path / "t"), "--no-figures", "--verify"]
    assert tables_main(["demo", "--runs", str(tmp_path / "none"), *args]) == 0  # all missing: nothing fails
    assert tables_main(["nosuch", *args]) == 2
    assert tables_main(["demo", "--format", "pdf", *args]) == 2
    assert tables_main([*args]) == 2
    err = capsys.readouterr().err
    assert "error: unknown table 'nosuch'" in err and "demo" in err and "--format 'pdf'" in err


def test_select_differs_from_reported_is_stated(tmp_path):
    tables_main(["demo", "--select", "last", "--no-figures", *_cli(tmp_path)])
    md = (tmp_path / "out" / "tables" / "demo.md").read_text()
    assert "`--select last`" in md and "not like for like" in md


def test_all_writes_readme_and_output_is_deterministic(tmp_path, capsys):
    args = ["--all", *_cli(tmp_path), "--format", "md,csv,tex"]
    assert tables_main(args) == 0
    files = sorted(p for p in (tmp_path / "out").rglob("*") if p.is_file())
    first = {p: p.read_bytes() for p in files}
    assert tables_main(args) == 0
    assert sorted(p for p in (tmp_path / "out").rglob("*") if p.is_file()) == files
    assert all(p.read_bytes() == first[p] for p in files)  # identical bytes, figures included
    readme = (tmp_path / "out" / "README.md").read_text()
    assert "How to read the tables" in readme and "### Demo — Table 0" in readme
    assert "](tables/demo.md)" in readme and "](figures/demo_curves.png)" in readme


def test_figures_written_and_skipped(tmp_path, capsys):
    tables_main(["demo", *_cli(tmp_path)])
    figs = sorted(p.name for p in (tmp_path / "out" / "figures").iterdir())
    assert figs == ["demo_bits.png", "demo_curves.png", "demo_kappa.png", "demo_tr.png"]
    capsys.readouterr()
    args = [
        "--configs",
        str(CONFIGS),
        "--runs",
        str(tmp_path / "none"),
        "--figures",
        str(tmp_path / "out/figures"),
    ]
    tables_main(["demo", "--out", str(tmp_path / "t"), *args])  # no records: every figure skipped, with a note
    printed = capsys.readouterr().out
    assert printed.count("note: demo:") == 5 and "skipped the learning-curve figure" in printed
    assert list((tmp_path / "out" / "figures").iterdir()) == []  # stale figures removed


def test_collect_copies_matched_records(tmp_path, capsys):
    dest = tmp_path / "committed"
    args = ["demo", "--no-figures", "--collect", str(dest), *_cli(tmp_path)]
    assert tables_main(args) == 0
    copied = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("record.json"))
    assert "demo_fp/seed=1/record.json" in copied and "demo_q/precision=w3a3/record.json" in copied
    assert not any("w2a2" in c or "epochs=1" in c for c in copied)  # only records that belong to cells
    assert "copied 7 record(s)" in capsys.readouterr().out
    assert tables_main(args) == 0 and "copied 0 record(s)" in capsys.readouterr().out  # idempotent


def test_sweep_figure_over_a_numeric_override(tmp_path, capsys):
    from qrepro.tables.figures import make_figures

    data = _one_cell_table(71.1, 72.0, 1.0)
    q = data["cells"][1]
    data["cells"][1:] = [dict(q, id=f"q{v}", overrides=[f"ptq.weight_step_scale={v}"]) for v in (0.5, 1.0, 2.0)]
    table = parse_table(data)
    for v, acc in ((0.5, 60.0), (1.0, 70.0), (2.0, 65.0)):
        d = tmp_path / "runs" / str(v)
        d.mkdir(parents=True)
        rec = {
            "complete": True,
            "experiment": "e_q",
            "overrides": [f"ptq.weight_step_scale={v}"],
            "seed": 0,
            "metrics": {"best_top1": acc},
        }
        (d / "record.json").write_text(json.dumps(rec))
    rows = compare(table, load_records([tmp_path / "runs"]))
    written, notes = make_figures(table, rows, tmp_path / "figs")
    assert [p.name for p in written] == ["t_sweep_ptq.weight_step_scale.png"]
    assert any("skipped the bits figure" in n for n in notes)  # one bit-width only
    written, notes = make_figures(table, compare(table, []), tmp_path / "figs")
    assert written == [] and list((tmp_path / "figs").iterdir()) == []  # stale sweep figure removed


# -------------------------------------------------------------------------------------------- run_table


def test_run_order_follows_progressive_chains(table):
    assert [c.id for c in ordered_cells(table)] == ["fp", "w4", "w3", "w2", "w4_sgdt", "ptq_w4"]
    assert [c.id for c in ordered_cells(table, ["w3"])] == ["fp", "w4", "w3"]
    reordered = parse_table(dict(_raw(), cells=list(reversed(_raw()["cells"]))))
    order = [c.id for c in ordered_cells(reordered)]
    assert order.index("fp") < order.index("w4") < order.index("w3") < order.index("w2")
    assert order.index("fp") < order.index("ptq_w4")


def test_dry_run_prints_commands_in_order(tmp_path, capsys):
    # Only the FP seed-0 record exists: fp is skipped and its run dir feeds w4's init_from.
    fp_root = tmp_path / "r"
    (fp_root / "fp0").mkdir(parents=True)
    (fp_root / "fp0" / "record.json").write_text((FIX / "records/demo_fp/seed=0/record.json").read_text())
    (fp_root / "fp0" / "checkpoints").mkdir()
    (fp_root / "fp0" / "checkpoints" / "last.pt").write_bytes(b"")
    code = run_table_main(
        [
            "demo",
            "--dry-run",
            "--configs",
            str(CONFIGS),
            "--runs",
            str(fp_root),
            "--python",
            "py",
            "trainer.device=cpu",
        ]
    )
    printed = capsys.readouterr().out.splitlines()
    lines = [x for x in printed if not x.startswith("#   ")]  # the expected run directories, checked below
    expected = [x[len("#   -> ") :] for x in printed if x.startswith("#   -> ")]
    assert code == 0
    assert lines[0].startswith("# demo/fp: complete, skipped")
    assert lines[1] == (
        f"py -m qrepro.train +experiment=demo_q precision=w4a4 trainer.device=cpu "
        f"++logger.group=demo 'init_from=\"{(fp_root / 'fp0').as_posix()}/checkpoints/last.pt\"'"
    )
    # plan names the directory each pending run will write, and chains use it (no placeholders)
    assert expected[:2] == ["runs/demo_q/precision=w4a4", "runs/demo_q/precision=w3a3"]
    assert lines[2].endswith(
        "precision=w3a3 trainer.device=cpu ++logger.group=demo "
        "'init_from=\"runs/demo_q/precision=w4a4/checkpoints/last.pt\"'"
    )
    assert "precision=w2a2" in lines[3] and "runs/demo_q/precision=w3a3/checkpoints" in lines[3]
    assert "<run dir" not in "\n".join(printed)
    assert "optimizer=sgdt" in lines[4] and "init_from" not in lines[4]
    assert lines[5].startswith("py -m qrepro.ptq +experiment=demo_ptq") and "fp0/checkpoints/last.pt" in lines[5]
    assert len(lines) == 6
    # a committed copy of a record has no checkpoint next to it: said before the chained command
    (fp_root / "fp0" / "checkpoints" / "last.pt").unlink()
    run_table_main(["demo", "--dry-run", "--configs", str(CONFIGS), "--runs", str(fp_root), "--cells", "w4"])
    lines = capsys.readouterr().out.splitlines()
    assert "warning: no" in lines[1] and "--cells fp" in lines[1] and len(lines) == 4 and lines[3].startswith("#   -> ")


def test_runner_chains_run_dirs_and_stops_dependents_on_failure(table, tmp_path, capsys):
    calls: list[list[str]] = []

    def fake(cmd: list[str]) -> RunResult:  # run dir named after the run's own overrides
        calls.append(cmd)
        if "precision=w3a3" in cmd:
            return RunResult(1, None)
        name = ",".join(a for a in cmd[3:] if not a.startswith(("++logger", "init_from")))
        return RunResult(0, tmp_path / name / "record.json")

    argv = ["demo", "--seeds", "0,1", "--configs", str(CONFIGS), "--runs", str(tmp_path / "none"), "a.b=1"]
    assert run_table_main(argv, runner=fake) == 1
    assert all("++logger.group=demo" in c and "a.b=1" in c for c in calls)
    w4_seed1 = next(c for c in calls if c[4:] == ["precision=w4a4", "a.b=1", "seed=1", "++logger.group=demo"] + c[8:])
    fp_seed1 = (tmp_path / "+experiment=demo_fp,a.b=1,seed=1").as_posix()
    # seed s starts from the FP seed-s run; the path (it holds "=" and ",") is quoted for Hydra
    assert w4_seed1[-1] == f'init_from="{fp_seed1}/checkpoints/last.pt"'
    assert not any("precision=w2a2" in c for c in calls)  # its source (w3) failed: skipped, not run
    assert "w2 seed=0: skipped" in capsys.readouterr().out
    assert sum("precision=w3a3" in c for c in calls) == 2  # both seeds tried


def test_complete_cells_are_skipped_per_seed(table, records):
    jobs = plan(table, records, seeds=[0, 1, 2])
    done = {(j.cell.id, j.seed) for j in jobs if j.done is not None}
    assert done == {("fp", 0), ("fp", 1), ("fp", 2), ("w4", 0), ("w4", 1), ("w3", 0), ("w4_sgdt", 0)}
    assert not [j for j in plan(table, records, extra=["trainer.epochs=3"]) if j.done is not None]
    with pytest.raises(QreproError, match="either as --seeds"):
        plan(table, records, extra=["seed=1"], seeds=[0])


def test_trainer_records_match_their_cell(table):
    """The overrides the trainer stores in record.json (qrepro.train.semantic_overrides) match the cell that
    run_table launched them for, whatever path, device, logging and seed overrides came with it."""
    from qrepro.run_table import command, hydra_quote
    from qrepro.tables.records import Record, match_cell
    from qrepro.train import semantic_overrides

    (job,) = [j for j in plan(table, [], extra=["trainer.device=cpu", "seed=3"]) if j.cell.id == "w3"]
    argv = command(job, table, "runs/demo_q/precision=w4a4,seed=3/checkpoints/last.pt")[3:]
    assert argv[-1] == "init_from=" + hydra_quote("runs/demo_q/precision=w4a4,seed=3/checkpoints/last.pt")
    rec = Record(
        Path("r/record.json"),
        {"complete": True, "experiment": "demo_q", "seed": 3, "overrides": semantic_overrides(argv)},
    )
    assert match_cell(table.cell("w3"), [rec]) == [rec]
    assert match_cell(table.cell("w4"), [rec]) == []


def test_train_plus_table_argv():
    from qrepro.run_table import table_argv

    assert table_argv(["+experiment=x", "seed=1"]) is None
    assert table_argv(["+table=demo", "trainer.device=cuda", "--dry-run"]) == [
        "demo",
        "trainer.device=cuda",
        "--dry-run",
    ]
    with pytest.raises(QreproError, match="exactly one table"):
        table_argv(["+table=a", "+table=b"])
    from qrepro.run_table import from_train_argv

    assert from_train_argv(["+experiment=x"]) is None
    assert from_train_argv(["+table=a", "+table=b"]) == 2
    assert from_train_argv(["+table=demo", f"--configs={CONFIGS}", "--runs=/nonexistent", "--dry-run"]) == 0


def test_parse_record_line():
    assert parse_record_line(["x", "record: runs/a/record.json", "bye"]).as_posix() == "runs/a/record.json"
    assert parse_record_line(["record: a/record.json", "record: b/record.json"]).as_posix() == "b/record.json"
    assert parse_record_line(["nothing"]) is None


def test_entry_points_run_as_modules(tmp_path):
    import subprocess
    import sys

    for module in ("qrepro.tables", "qrepro.run_table"):
        proc = subprocess.run(
            [sys.executable, "-m", module, "nosuch", "--configs", str(CONFIGS)],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=60,
        )
        assert proc.returncode == 2 and proc.stderr.startswith("error: unknown table 'nosuch'"), proc.stderr
