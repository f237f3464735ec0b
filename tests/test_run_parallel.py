"""scripts/run_parallel.py: sweep expansion and the concurrency-limited launcher (with a stand-in command)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("run_parallel", ROOT / "scripts" / "run_parallel.py")
rp = importlib.util.module_from_spec(_spec)
sys.modules["run_parallel"] = rp  # dataclasses look their module up
_spec.loader.exec_module(rp)


def test_expand_sweep_is_a_cartesian_product() -> None:
    cells = rp.expand_sweep("+experiment=x seed=0,1 precision=w2a2,w4a4")
    assert len(cells) == 4
    assert ["+experiment=x", "seed=1", "precision=w2a2"] in cells
    assert rp.expand_sweep("optimizer.groups=[{tags:[norm,bias]}] a=1") == [
        ["optimizer.groups=[{tags:[norm,bias]}]", "a=1"]
    ]


# stands in for ``python -m qrepro.train``: announces a run dir as the trainer does, records the overlap
FAKE = """
import json, os, sys, time
out = sys.argv[1]
tag = sys.argv[2]
run = os.path.join(out, tag)
os.makedirs(run, exist_ok=True)
print("run: " + run, flush=True)
open(os.path.join(out, tag + ".start"), "w").write(str(time.time()))
t0 = time.time()  # wait (up to 20 s) until a second cell has started, so overlap does not depend on load
while len([f for f in os.listdir(out) if f.endswith(".start")]) < 2 and time.time() - t0 < 20:
    time.sleep(0.02)
time.sleep(0.2)
open(os.path.join(out, tag + ".end"), "w").write(str(time.time()))
json.dump({"images_per_s": 100.0}, open(os.path.join(run, "record.json"), "w"))
sys.exit(3 if tag == "bad" else 0)
"""


def test_run_all_limits_concurrency_and_collects_logs(tmp_path: Path) -> None:
    script = tmp_path / "fake.py"
    script.write_text(FAKE)
    tags = ["a", "b", "c", "bad"]
    done = rp.run_all(
        [[t] for t in tags], 2, tmp_path / "logs", [sys.executable, str(script), str(tmp_path)], poll_s=0.05
    )
    assert [j.returncode for j in done] == [0, 0, 0, 3]
    spans = [(float((tmp_path / f"{t}.start").read_text()), float((tmp_path / f"{t}.end").read_text())) for t in tags]
    for s, _ in spans:  # never more than 2 running at any start time
        assert sum(a <= s < b for a, b in spans) <= 2
    assert max(spans[0][0], spans[1][0]) < min(spans[0][1], spans[1][1])  # but the first two did overlap
    for j, t in zip(done, tags):
        assert j.run_dir == str(tmp_path / t)
        assert "run: " in (tmp_path / t / "stdout.log").read_text()
        assert j.images_per_s == 100.0
    assert json.loads((tmp_path / "a" / "record.json").read_text())["images_per_s"] == 100.0
