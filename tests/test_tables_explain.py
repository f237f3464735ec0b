"""Tables that explain themselves: chance-level cells flagged, runs under other overrides named (and counted on
request), a quiet ``render --all``, real run directories in ``plan``, portable committed records, ``qrepro-runs``,
shell completion and the parity CLI's defaults."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from qrepro.errors import QreproError
from qrepro.run_table import main as run_table_main
from qrepro.table import candidates
from qrepro.table import main as table_main
from qrepro.tables import compare, load_records, load_table
from qrepro.tables.cli import main as tables_main
from qrepro.tables.records import collect, portable
from qrepro.tables.render import to_csv, to_markdown
from qrepro.tables.runs import main as runs_main

FIX = Path(__file__).parent / "fixtures" / "tables"
CONFIGS = FIX / "configs"
ROOT = Path(__file__).resolve().parents[1]


def _record(root: Path, sub: str, experiment: str, overrides: list[str], top1: float, **extra) -> Path:
    path = root / experiment / sub / "record.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "complete": True,
        "status": "complete",
        "name": experiment,
        "experiment": experiment,
        "overrides": overrides,
        "seed": 0,
        "run_dir": f"/tmp/xyz/{experiment}/{sub}",
        "config": {"dataset": {"num_classes": 10, "root": "/data/digits"}, "trainer": {"epochs": 3}},
        "metrics": {"best_top1": top1, "last_top1": top1, "epochs_done": 3},
        "wall_time_s": 12.5,
        "finished": "2026-01-01T00:00:00",
        **extra,
    }
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


@pytest.fixture
def table():
    return load_table(CONFIGS / "table" / "demo.yaml")


def test_a_cell_at_chance_level_is_never_a_plain_number(tmp_path, table):
    _record(tmp_path, "default", "demo_fp", [], 11.14)  # 10 classes: chance 10 %
    _record(tmp_path, "w4", "demo_q", ["precision=w4a4"], 90.0)
    rows = compare(table, load_records([tmp_path]))
    fp, w4 = rows[0], rows[1]
    assert fp.chance == pytest.approx(10.0) and fp.at_chance and not w4.at_chance
    md = to_markdown(table, rows, "best", configs=CONFIGS)
    line = next(x for x in md.splitlines() if x.startswith("| `fp`"))
    assert "**11.14 (chance)**" in line and "| 11.14 |" not in line
    assert "At chance level" in md and "chance level" in md.splitlines()[-4] + md  # footnote + summary
    assert "1 at chance level" in md
    assert "At chance level" in to_csv(table, rows, "best", configs=CONFIGS)


def test_runs_under_other_overrides_are_named_and_counted_on_request(tmp_path, table, capsys):
    _record(tmp_path, "bs", "demo_fp", ["trainer.batch_size=256"], 91.0)
    rows = compare(table, load_records([tmp_path]))
    assert rows[0].ours.n == 0 and len(rows[0].elsewhere) == 1
    md = to_markdown(table, rows, "best", configs=CONFIGS)
    assert "Runs under other overrides" in md
    assert "`qrepro-table render demo trainer.batch_size=256`" in md
    # runs of another cell of the table are that cell's, not "other overrides" of this one
    _record(tmp_path, "w4", "demo_q", ["precision=w4a4"], 90.0)
    rows = compare(table, load_records([tmp_path]))
    assert all(not r.elsewhere for r in rows if r.cell.experiment == "demo_q")
    # render with the extra override counts the run as the cell
    out = tmp_path / "out"
    args = ["demo", "trainer.batch_size=256", "--configs", str(CONFIGS), "--runs", str(tmp_path), "--out", str(out)]
    assert tables_main([*args, "--no-figures"]) == 0
    fp_line = next(x for x in (out / "demo.md").read_text().splitlines() if x.startswith("| `fp`"))
    assert "91.00" in fp_line
    # plan says it too, next to the command
    capsys.readouterr()
    assert (
        run_table_main(["demo", "--dry-run", "--configs", str(CONFIGS), "--runs", str(tmp_path), "--cells", "fp"]) == 0
    )
    printed = capsys.readouterr().out
    assert "not run with these overrides; 1 run(s) of demo_fp with trainer.batch_size=256" in printed
    assert "qrepro-table render demo trainer.batch_size=256" in printed


def test_render_all_is_quiet_and_verbose_lists_the_notes(tmp_path, capsys):
    _record(tmp_path, "default", "demo_fp", [], 92.0)
    base = ["--all", "--configs", str(CONFIGS), "--runs", str(tmp_path), "--out", str(tmp_path / "t")]
    base += ["--figures", str(tmp_path / "f"), "--readme", str(tmp_path / "R.md")]
    assert tables_main(base) == 0
    quiet = capsys.readouterr().out.splitlines()
    assert not any(x.startswith("note:") for x in quiet)
    assert any(re.match(r"\d+ tables written to .*: 1 with run records", x) for x in quiet)
    assert tables_main([*base, "--verbose"]) == 0
    assert any(x.startswith("note:") for x in capsys.readouterr().out.splitlines())


def test_portable_records_hold_no_machine_paths(tmp_path):
    src = tmp_path / "runs"
    _record(
        src, "w4", "demo_q", ["precision=w4a4", "init_from=/tmp/xyz/demo_fp/default/checkpoints/last.pt"], 90.0,
        init_from="/tmp/xyz/demo_fp/default/checkpoints/last.pt", checkpoint="/tmp/xyz/demo_q/w4/checkpoints/last.pt",
    )  # fmt: skip
    data = portable(json.loads((src / "demo_q" / "w4" / "record.json").read_text()))
    assert data["run_dir"] == "<out_root>/demo_q/w4"
    assert data["init_from"] == "<out_root>/demo_fp/default/checkpoints/last.pt"
    assert data["overrides"][1] == "init_from=<out_root>/demo_fp/default/checkpoints/last.pt"
    assert data["config"]["dataset"]["root"] == "<local>/digits"
    assert portable({"x": "../shared/data/c.tar.gz"}) == {"x": "<local>/c.tar.gz"}
    (copied,) = collect(load_records([src]), tmp_path / "committed")
    assert "/tmp/" not in copied.read_text()


def test_committed_records_hold_no_machine_paths():
    bad = re.compile(r'"(/tmp/|/work/|/home/|\.\./)|=(/tmp/|/work/|/home/|\.\./)')
    for path in list((ROOT / "results").rglob("record.json")) + list((ROOT / "results").rglob("*.record.json")):
        assert not bad.search(path.read_text()), f"{path} holds a machine path"
    # nor any other committed result (tables, benchmarks, wall times, logs, notes)
    machine = re.compile(r"(?<![\w.<>/:~-])/(tmp|work|home|root|Users|mnt|scratch|data|private|var/folders)/")
    for path in (ROOT / "results").rglob("*"):
        if path.suffix in (".md", ".json", ".txt", ".log", ".csv"):
            assert not machine.search(path.read_text()), f"{path} holds a machine path"


def test_writers_into_results_make_paths_portable(tmp_path, capsys, monkeypatch):
    """Run directories keep absolute paths (resume, chains and tables read them there); what enters results/
    goes through the portable writer: records (collect), benchmark and wall-time files, epoch tables, logs."""
    import io
    import runpy

    from qrepro.tables.portable import main as portable_main
    from qrepro.tables.records import portable_str

    line = "python -m qrepro.bench --out /tmp/a/bench --note 'see https://x.org/y' 12 img/s, ../configs/t.yaml"
    assert portable_str(line) == (
        "python -m qrepro.bench --out <local>/bench --note 'see https://x.org/y' 12 img/s, ../configs/t.yaml"
    )
    rec = {"name": "n", "run_dir": "/w/runs/n/seed=1", "command": "train out_root=/w/runs init_from=/h/u/a.pt"}
    assert portable(rec)["command"] == "train out_root=<out_root> init_from=<local>/a.pt"
    assert portable([{"log": "/tmp/x/0.log"}]) == [{"log": "<local>/0.log"}]  # e.g. run_parallel's summary
    # the filter gpu_session.sh pipes logs and copies through
    monkeypatch.setattr("sys.stdin", io.StringIO("run: /tmp/r/x  model=m\nbest top1 1.00%\n"))
    assert portable_main(["--text"]) == 0 and capsys.readouterr().out == "run: <local>/x  model=m\nbest top1 1.00%\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(json.dumps(rec)))
    assert portable_main([]) == 0 and json.loads(capsys.readouterr().out)["run_dir"] == "<out_root>/n/seed=1"
    # scripts/epoch_times.py (results/bench/<device>-epochs.*) on records with absolute run directories
    runs = tmp_path / "runs"
    rd = runs / "epochs_fp" / "default"
    rd.mkdir(parents=True)
    curves = {"epoch_s": [3.0, 1.0, 1.0], "images_per_s": [10.0, 20.0, 20.0]}
    (rd / "record.json").write_text(json.dumps({"name": "epochs_fp", "run_dir": str(rd), "curves": curves}))
    out = tmp_path / "bench" / "dev-epochs"
    monkeypatch.setattr("sys.argv", ["epoch_times.py", str(runs), "--out", str(out), "--epochs", "3"])
    runpy.run_path(str(ROOT / "scripts" / "epoch_times.py"), run_name="__main__")
    assert json.loads(out.with_suffix(".json").read_text())[0]["run_dir"] == "<out_root>/epochs_fp/default"
    assert str(tmp_path) not in out.with_suffix(".json").read_text() + out.with_suffix(".md").read_text()


def test_plan_prints_real_run_directories(tmp_path, capsys):
    assert run_table_main(["demo", "--dry-run", "--configs", str(CONFIGS), "--runs", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "<run dir" not in printed
    assert "#   -> runs/demo_fp/default" in printed and "runs/demo_fp/default/checkpoints/last.pt" in printed
    assert run_table_main(["demo", "--dry-run", "--configs", str(CONFIGS), "--runs", str(tmp_path), "out_root=/x"]) == 0
    assert "#   -> /x/demo_q/precision=w4a4" in capsys.readouterr().out


def test_runs_lists_filters_and_groups(tmp_path, capsys):
    _record(tmp_path, "a", "demo_q", ["precision=w4a4"], 90.0)
    _record(tmp_path, "b", "demo_q", ["precision=w4a4", "seed=1"], 92.0, seed=1)
    _record(tmp_path, "c", "demo_fp", [], 95.0, complete=False, status="diverged")
    assert runs_main(["--runs", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "3 run(s): 2 complete, 1 other" in out and "diverged" in out and "12s" in out
    assert runs_main(["--runs", str(tmp_path), "-e", "demo_q", "--group"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3 and "0,1" in out[1] and "91.00" in out[1]
    assert runs_main(["--runs", str(tmp_path), "--status", "diverged", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["experiment"] == "demo_fp" and row["status"] == "diverged" and row["epochs"] == "3/3"
    assert runs_main(["--runs", str(tmp_path), "--table", "demo", "--configs", str(CONFIGS)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("cell") and "w4" in out
    assert table_main(["runs", "--runs", str(tmp_path / "none")]) == 0
    assert "no run records match" in capsys.readouterr().out


def test_completion_script_and_candidates(capsys):
    assert table_main(["completion", "bash"]) == 0
    assert "complete -o default -F _qrepro_table qrepro-table" in capsys.readouterr().out
    assert candidates(["qrepro-table", "p"], 1) == ["plan"]
    assert "symreg_digits_demo" in candidates(["qrepro-table", "render", "symreg_d"], 2)
    cells = candidates(["qrepro-table", "plan", "symreg_digits_demo", "--cells", "digits_ada"], 4)
    assert cells and all(c.startswith("digits_adaquant_") for c in cells)
    assert candidates(["qrepro-table", "runs", "--st"], 2) == ["--status"]
    assert table_main(["__complete", "1", "qrepro-table", "ru"]) == 0
    assert capsys.readouterr().out.split() == ["run", "runs"]


def test_help_names_the_current_commands(capsys):
    assert table_main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "qrepro-table runs" in text and "completion bash" in text and "python -m qrepro.run_table" not in text
    with pytest.raises(SystemExit):
        table_main(["plan", "--help"])
    assert capsys.readouterr().out.startswith("usage: qrepro-table run")
    with pytest.raises(SystemExit):
        table_main(["render", "--help"])
    assert capsys.readouterr().out.startswith("usage: qrepro-table render")


def test_parity_without_reference_says_what_is_missing(monkeypatch):
    from qrepro.parity import run_suite

    monkeypatch.delenv("QREPRO_REFERENCE", raising=False)
    with pytest.raises(QreproError, match=r"pass --reference <checkout of .*> or set QREPRO_REFERENCE"):
        run_suite("apot", None)
    monkeypatch.setenv("QREPRO_REFERENCE", "/nonexistent")
    with pytest.raises(QreproError, match="/nonexistent/trs not found"):
        run_suite("tr", None)
