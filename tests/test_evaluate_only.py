"""Evaluate-only cells (``evaluate_only: true``, the pretrained FP rows): the ``init_from`` model is evaluated as it
is and recorded like a run (best = last, no epoch trained, no checkpoint written), so tables render it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
FAST = ["trainer.batch_size=256", "model.width=4", "logger=none", "trainer.progress=false", "trainer.compile=false"]


def _train(*args: str) -> Path:
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "qrepro.train", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return Path(proc.stdout.strip().splitlines()[-1].removeprefix("record: "))


def test_evaluate_only_records_the_initial_model_without_training(tmp_path):
    first = _train("+experiment=demo_digits_fp", "trainer.epochs=1", *FAST, f"out_root={tmp_path}/a")
    trained, ckpt = json.loads(first.read_text()), first.parent / "checkpoints" / "last.pt"
    before = torch.load(ckpt, map_location="cpu", weights_only=False)
    rec_path = _train(
        "+experiment=demo_digits_fp", "evaluate_only=true", f"init_from={ckpt}", *FAST, f"out_root={tmp_path}/b"
    )
    rec = json.loads(rec_path.read_text())
    m = rec["metrics"]
    assert rec["complete"] and m["epochs_done"] == 0 and m["best_epoch"] == 0
    # the same weights evaluated on the same test split: the first run's last accuracy
    assert m["best_top1"] == m["last_top1"] == trained["metrics"]["last_top1"]
    assert not list(rec_path.parent.rglob("*.pt"))  # nothing trained, nothing checkpointed
    after = torch.load(ckpt, map_location="cpu", weights_only=False)["model"]
    assert all(torch.equal(after[k], v) for k, v in before["model"].items())  # the source is only read


def test_evaluate_only_without_a_checkpoint_is_one_line(tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
    args = ["+experiment=demo_digits_fp", "evaluate_only=true", *FAST, f"out_root={tmp_path}"]
    proc = subprocess.run(
        [sys.executable, "-m", "qrepro.train", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2 and "add init_from=<path>" in proc.stderr and "Traceback" not in proc.stderr
    assert not any(tmp_path.iterdir())  # nothing written
