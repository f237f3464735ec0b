"""Bad input exits non-zero with one clear line on stderr and no traceback."""

import os
import subprocess
import sys

import pytest

BASE = ["logger=none", "trainer.progress=false", "trainer.epochs=1"]


def _run(args, tmp_path):
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "qrepro.train", *args, f"out_root={tmp_path}"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


CASES = [
    (["model=resnet999"], "unknown model 'resnet999'"),
    (["quantizer=nosuch"], "unknown quantizer 'nosuch'"),
    (["dataset=mnist"], "unknown dataset 'mnist'"),
    (["+experiment=no_such_experiment"], "unknown experiment"),
    (["precision.w_bits=12"], "precision.w_bits=12 is out of range"),
    (["dataset=cifar10", "dataset.root=/definitely/missing"], "dataset.root=/definitely/missing"),
    (["dataset=cifar10", "dataset.root=null"], "dataset.root is not set"),
]


@pytest.mark.parametrize("args,needle", CASES)
def test_bad_input_one_line(args, needle, tmp_path):
    p = _run([*BASE, *args], tmp_path)
    assert p.returncode == 2, p.stderr
    lines = [l for l in p.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("error: ") and needle in lines[0], lines[0]
    assert "Traceback" not in p.stderr + p.stdout


def test_corrupt_checkpoint(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"this is not a checkpoint")
    p = _run([*BASE, f"init_from={bad}"], tmp_path)
    assert p.returncode == 2
    lines = [l for l in p.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and "corrupt" in lines[0] and str(bad) in lines[0]
    missing = _run([*BASE, f"init_from={tmp_path / 'nope.pt'}"], tmp_path)
    assert missing.returncode == 2 and "does not exist" in missing.stderr
