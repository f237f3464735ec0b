"""python -m qrepro.bench: planning, timing bookkeeping, ratios, and a tiny end-to-end run on CPU."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch

from qrepro import bench
from qrepro.errors import QreproError
from qrepro.quant.methods import method_names


def test_parse_bits() -> None:
    per, default = bench.parse_bits("apot=2,3;default=8")
    assert per["apot"] == (2, 3) and default == (8,)
    assert bench.parse_bits(None) == (bench.METHOD_BITS, (bench.DEFAULT_BITS,))
    with pytest.raises(QreproError, match="--bits"):
        bench.parse_bits("apot")


def test_plan_puts_fp_first_in_every_group() -> None:
    cases = bench.plan(["small_cnn"], ["fp"], [8, 16], ["eager", "default"], None)
    assert [(c.batch_size, c.mode, c.method, c.precision) for c in cases] == [
        (8, "eager", "fp", "w32a32"),
        (8, "default", "fp", "w32a32"),
        (16, "eager", "fp", "w32a32"),
        (16, "default", "fp", "w32a32"),
    ]


@pytest.mark.skipif("apot" not in method_names(), reason="APoT not merged into this branch yet")
def test_plan_apot_at_three_bit_widths() -> None:
    cases = bench.plan(["resnet20"], ["apot"], [128], ["eager"], None)
    assert [c.precision for c in cases] == ["w32a32", "w2a2", "w3a3", "w4a4"]


def test_timed_batches_brackets_windows() -> None:
    x, y = torch.zeros(2, 1), torch.zeros(2)
    tb = bench.TimedBatches(x, y, n=6, window=2, sync=lambda: None)
    assert len(list(tb)) == 6
    assert len(tb.stamps) == 4  # before steps 0, 2, 4 and after the last
    assert len(tb.samples()) == 3 and all(s >= 0 for s in tb.samples())


def test_ratios_are_to_fp_of_the_same_group() -> None:
    rows = [
        bench.Row("m", "fp", "w32a32", 8, "eager", step_ms=10.0, step_ms_min=8.0),
        bench.Row("m", "q", "w4a4", 8, "eager", step_ms=15.0, step_ms_min=10.0),
        bench.Row("m", "fp", "w32a32", 8, "default", step_ms=5.0),
        bench.Row("m", "q", "w4a4", 8, "default", step_ms=6.0),
        bench.Row("m", "q", "w2a2", 8, "default", status="skipped: no"),
    ]
    bench.add_ratios(rows)
    assert rows[1].ratio_fp == pytest.approx(1.5) and rows[1].ratio_fp_min == pytest.approx(1.25)
    assert rows[3].ratio_fp == pytest.approx(1.2) and rows[3].ratio_fp_eager == pytest.approx(0.6)
    assert rows[4].ratio_fp is None


def test_end_to_end_tiny(tmp_path: Path) -> None:
    methods = "fp,sat" if "sat" in method_names() else "fp"
    rc = bench.main(
        ["--models", "small_cnn", "--methods", methods, "--batch-sizes", "8", "--modes", "eager,compiled",
         "--backend", "aot_eager", "--warmup", "1", "--steps", "2", "--window", "1", "--rounds", "2",
         "--out", str(tmp_path)]
    )  # fmt: skip
    assert rc == 0
    (js,) = tmp_path.glob("*.json")
    data = json.loads(js.read_text())
    rows = data["rows"]
    assert {r["status"] for r in rows} == {"ok"}, rows
    assert all(len(r["samples_ms"]) == 4 for r in rows)  # 2 rounds x 2 samples, pooled
    assert [r["mode"] for r in rows if r["method"] == "fp"] == ["eager", "default"]
    assert all(r["ratio_fp"] == r["ratio_fp_min"] == 1.0 for r in rows if r["method"] == "fp")
    assert all(r["graph_breaks"] == 0 for r in rows if r["mode"] != "eager")
    assert data["device"].startswith("CPU") and data["versions"]["torch"] == torch.__version__
    md = js.with_suffix(".md").read_text()
    assert "| small_cnn | 32 | 8 | fp | w32a32 | eager |" in md
    # --append: a second invocation adds its cases and replaces re-measured ones; ratios stay per invocation
    args = ["--models", "small_cnn", "--methods", "fp", "--modes", "eager", "--warmup", "1", "--steps", "1"]
    assert bench.main([*args, "--batch-sizes", "4,8", "--window", "1", "--append", "--out", str(tmp_path)]) == 0
    data2 = json.loads(js.read_text())
    cases = sorted((r["batch_size"], r["mode"], r["method"]) for r in data2["rows"])
    assert cases == sorted([(4, "eager", "fp")] + [(8, r["mode"], r["method"]) for r in rows])
    assert len(data2["runs"]) == 2 and "also merged" in js.with_suffix(".md").read_text()
    for r in data2["rows"]:
        assert r["ratio_fp"] == pytest.approx(r["step_ms"] / r["fp_step_ms"])


def test_unknown_method_is_one_line_error(capsys) -> None:
    assert bench.main(["--methods", "nope", "--out", "/nonexistent"]) == 2
    assert "unknown quantizer" in capsys.readouterr().err


def test_image_size_and_classes_reach_the_synthetic_batch(tmp_path: Path) -> None:
    args = ["--models", "small_cnn", "--methods", "fp", "--modes", "eager", "--batch-sizes", "4"]
    args += ["--warmup", "1", "--steps", "1", "--window", "1", "--image-size", "16", "--num-classes", "3"]
    assert bench.main([*args, "--out", str(tmp_path)]) == 0
    (js,) = tmp_path.glob("*.json")
    (row,) = json.loads(js.read_text())["rows"]
    assert row["status"] == "ok" and row["image_size"] == 16
    assert "| small_cnn | 16 | 4 | fp |" in js.with_suffix(".md").read_text()


def test_members_and_amp_rows_with_ratio_to_separate_runs(tmp_path: Path) -> None:
    """--members 2 --amp off,bf16: K=1 is measured as the reference; the batched row reports per-member img/s and
    its step time against two separate runs' (same invocation)."""
    args = ["--models", "small_cnn", "--methods", "fp", "--modes", "eager", "--batch-sizes", "4", "--members", "2"]
    args += ["--amp", "off,bf16", "--warmup", "1", "--steps", "2", "--window", "1", "--load", "test"]
    assert bench.main([*args, "--out", str(tmp_path)]) == 0
    (js,) = tmp_path.glob("*.json")
    data = json.loads(js.read_text())
    rows = {(r["members"], r["amp"]): r for r in data["rows"]}
    assert set(rows) == {(1, "off"), (2, "off"), (1, "bf16"), (2, "bf16")}
    assert all(r["status"] == "ok" for r in rows.values())
    for amp in ("off", "bf16"):
        one, two = rows[(1, amp)], rows[(2, amp)]
        assert two["ratio_separate"] == pytest.approx(two["step_ms"] / (2 * one["step_ms"]))
        assert two["images_per_s"] == pytest.approx(2 * two["member_images_per_s"])
        assert one["ratio_separate"] == pytest.approx(1.0)
    assert data["load_before"] and data["load_note"] == "test"
    assert "| small_cnn | 32 | 4 | fp | w32a32 | eager | 2 | bf16 |" in js.with_suffix(".md").read_text()


def test_interleave_pairs_each_case_with_fp_in_turns(tmp_path: Path, monkeypatch, capsys) -> None:
    """--interleave: each case is timed in turns with its FP case, one pair at a time (the order alternating),
    compiled cases included; × FP (paired) is the median of the case's per-turn ratios to FP in its pair, and FP's
    row pools its samples of every pair."""
    order: list[str] = []
    sample = bench._sample

    def spy(prep, device, steps, window):
        order.append(prep.row.method)
        sample(prep, device, steps, window)

    monkeypatch.setattr(bench, "_sample", spy)
    known = method_names()
    methods = ",".join(["fp"] + [m for m in ("sat", "pact") if m in known])
    args = ["--models", "small_cnn", "--methods", methods, "--batch-sizes", "4", "--modes", "compiled"]
    args += ["--backend", "aot_eager", "--warmup", "1", "--steps", "3", "--window", "1", "--interleave"]
    assert bench.main([*args, "--out", str(tmp_path)]) == 0
    rows = json.loads(next(tmp_path.glob("*.json")).read_text())["rows"]
    fp, quantized = rows[0], rows[1:]
    assert {r["status"] for r in rows} == {"ok"} and fp["method"] == "fp"
    assert len(fp["samples_ms"]) == 3 * len(quantized) and fp["ratio_fp_paired"] == 1.0
    for n, q in enumerate(quantized):
        assert order[6 * n : 6 * n + 6] == ["fp", q["method"], q["method"], "fp", "fp", q["method"]]
        assert len(q["samples_ms"]) == 3 and q["interleaved"]
        pair_fp = fp["samples_ms"][3 * n : 3 * n + 3]
        want = statistics.median(a / b for a, b in zip(q["samples_ms"], pair_fp))
        assert q["ratio_fp_paired"] == pytest.approx(want)
    assert "× FP (paired)" in next(tmp_path.glob("*.md")).read_text()
    assert bench.main([*args, "--rounds", "2", "--out", str(tmp_path)]) == 2
    assert "--interleave" in capsys.readouterr().err


def test_interleave_without_a_pair_times_fp_alone(tmp_path: Path) -> None:
    """--interleave with no quantized case that runs (none asked, or one that cannot be built): FP is timed alone,
    the unbuildable case is reported as skipped, and the results are written."""
    args = ["--models", "small_cnn", "--batch-sizes", "4", "--modes", "eager", "--warmup", "1", "--steps", "2"]
    args += ["--window", "1", "--interleave"]
    assert not bench.supported("apot", 1)
    for n, methods in enumerate((["--methods", "fp"], ["--methods", "fp,apot", "--bits", "apot=1"])):
        out = tmp_path / str(n)
        assert bench.main([*args, *methods, "--out", str(out)]) == 0
        rows = json.loads(next(out.glob("*.json")).read_text())["rows"]
        assert rows[0]["method"] == "fp" and rows[0]["status"] == "ok" and len(rows[0]["samples_ms"]) == 2
        assert all(r["status"].startswith("skipped") for r in rows[1:]) and len(rows) == n + 1


@pytest.mark.parametrize("flag,value", [("--batch-sizes", "8,x"), ("--batch-sizes", "0"), ("--members", "1,two")])
def test_a_bad_count_list_is_one_line_error(flag: str, value: str, capsys) -> None:
    assert bench.main([flag, value, "--out", "/nonexistent"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {flag}") and err.count("\n") == 1


def test_interleave_reports_fp_alone_that_fails_as_an_error_row(tmp_path: Path, monkeypatch) -> None:
    """FP timed alone under --interleave fails like any grid case: an ``error:`` row, and the results are written."""

    def broken(*a, **kw):
        raise RuntimeError("out of memory\nsecond line")

    monkeypatch.setattr(bench, "run_case", broken)
    args = ["--models", "small_cnn", "--batch-sizes", "4", "--modes", "eager", "--methods", "fp", "--interleave"]
    assert bench.main([*args, "--warmup", "1", "--steps", "1", "--window", "1", "--out", str(tmp_path)]) == 0
    (row,) = json.loads(next(tmp_path.glob("*.json")).read_text())["rows"]
    assert row["status"] == "error: RuntimeError: out of memory"
