"""qrepro.walltime: a table's expected wall time from a benchmark file (formula, lookup, waves, errors)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from qrepro import walltime
from qrepro.errors import QreproError

ROOT = Path(__file__).resolve().parent.parent


def _row(model, method, precision, batch, ips, mode="default", image_size=32):
    return {
        "model": model,
        "method": method,
        "precision": precision,
        "batch_size": batch,
        "mode": mode,
        "image_size": image_size,
        "status": "ok",
        "images_per_s": ips,
    }


def _bench(tmp_path: Path, rows: list[dict]) -> Path:
    p = tmp_path / "dev.json"
    p.write_text(json.dumps({"device": "TestDev", "device_slug": "testdev", "command": "x", "rows": rows}))
    return p


def test_cell_hours_follow_the_formula():
    rows = [_row("resnet20", "apot", "w4a4", 128, 1000.0), _row("resnet20", "apot", "w4a4", 128, 500.0, "eager")]
    cell = {"id": "r20_w4a4", "experiment": "apot_resnet20_cifar10_w4a4"}
    e = walltime.estimate_cell(cell, rows, eval_factor=4.0)
    assert (e.model, e.method, e.precision, e.batch_size, e.epochs) == ("resnet20", "apot", "w4a4", 128, 200)
    assert e.images_per_s == 1000.0 and not e.approx  # the fastest mode measured
    assert e.hours == pytest.approx(200 * (50_000 / 1000 + 10_000 / 4000) / 3600)
    # two devices: per-device batch 64 is not measured -> the nearest batch size, marked approximate
    e2 = walltime.estimate_cell(cell, rows, gpus=2, efficiency=0.5, eval_factor=4.0)
    assert e2.approx and e2.hours == pytest.approx(e.hours / (2 * 0.5))


def test_lookup_prefers_exact_precision_then_same_method():
    rows = [_row("m", "apot", "w2a2", 128, 10.0), _row("m", "apot", "w4a4", 256, 20.0)]
    rows.append(_row("m", "fp", "w32a32", 128, 99.0))
    r, approx = walltime.lookup(rows, "m", "apot", "w4a4", 128, 32)
    assert r["images_per_s"] == 20.0 and approx  # same precision, other batch size
    r, approx = walltime.lookup(rows, "m", "apot", "w3a3", 128, 32)
    assert r["images_per_s"] == 10.0 and approx  # other bit-width, same batch size
    assert walltime.lookup(rows, "m", "sat", "w4a4", 128, 32) == (None, False)  # never another method
    assert walltime.lookup(rows, "m", "apot", "w4a4", 256, 224) == (None, False)  # nor another input size


def test_table_totals_and_unmeasured_cells(tmp_path):
    rows = [_row("resnet20", "fp", "w32a32", 128, 2000.0), _row("resnet20", "apot", "w4a4", 128, 1000.0)]
    bench = walltime.load_bench(_bench(tmp_path, rows))
    md, s = walltime.table_markdown("apot_table2", bench, gpus=1, efficiency=1.0, eval_factor=3.0)
    cells = {c["cell"]: c for c in s["cells"]}
    measured = [c for c in cells.values() if c["hours"] is not None]
    assert {c["cell"] for c in measured} == {"r20_fp", "r20_w5a5", "r20_w4a4", "r20_w3a3", "r20_w2a2"}
    # APoT's FP cell (quantizer apot at W32A32) from FP's row, the other bit-widths from APoT W4A4
    assert [c["cell"] for c in measured if c["approx"]] == ["r20_fp", "r20_w5a5", "r20_w3a3", "r20_w2a2"]
    assert cells["r20_fp"]["images_per_s"] == 2000.0
    assert s["total_hours"] == pytest.approx(sum(c["hours"] for c in measured))
    assert "r56_fp" in s["not_measured"] and "not measured" in md
    # waves: the W4A4 cell starts from another cell, so the SLURM estimate is never above the sequential one
    assert 0 < s["waves_hours"] <= s["total_hours"] + 1e-9


def test_bad_bench_files_are_one_line_errors(tmp_path):
    with pytest.raises(QreproError, match="not found"):
        walltime.load_bench(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(QreproError, match="not a qrepro.bench result"):
        walltime.load_bench(bad)
    p = subprocess.run(
        [sys.executable, "-m", "qrepro.walltime", "apot_table2", "--bench", str(bad)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and p.stderr.startswith("error:")


def test_cli_writes_markdown_and_json(tmp_path):
    path = _bench(tmp_path, [_row("resnet20", "fp", "w32a32", 128, 2000.0)])
    walltime.main(["apot_table2", "--bench", str(path), "--gpus", "1", "--out", str(tmp_path / "out")])
    md = (tmp_path / "out" / "testdev-1x.md").read_text()
    assert "apot_table2" in md and "TestDev" in md
    (s,) = json.loads((tmp_path / "out" / "testdev-1x.json").read_text())
    assert s["table"] == "apot_table2" and s["gpus"] == 1
