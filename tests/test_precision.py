"""Every w{W}a{A} precision composes, and its name (run directories, W&B tags, records) follows the bits in force."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qrepro.builders import make_logger
from qrepro.cli import CONFIG_DIR
from qrepro.quant.methods import VALID_BITS
from qrepro.train import compose, train

ROOT = Path(__file__).resolve().parents[1]
FAST = ["logger=none", "trainer.progress=false", "trainer.epochs=1", "trainer.batch_size=256", "model.width=8"]


def _generator():
    path = ROOT / "scripts" / "gen_precision_configs.py"
    spec = importlib.util.spec_from_file_location("gen_precision_configs", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_precision_files_match_their_generator(capsys):
    gen = _generator()
    assert set(gen.BITS) == VALID_BITS
    assert len(gen.expected()) == len(VALID_BITS) ** 2 == 81
    assert gen.main(["--out", str(Path(CONFIG_DIR) / "precision"), "--check"]) == 0, capsys.readouterr().out


def test_every_combination_composes_under_its_name():
    for w in sorted(VALID_BITS):
        for a in sorted(VALID_BITS):
            p = compose([f"precision=w{w}a{a}"]).precision
            assert (p.name, p.w_bits, p.a_bits) == (f"w{w}a{a}", w, a)


@pytest.mark.parametrize(
    "overrides",
    [
        ["precision.w_bits=4", "precision.a_bits=8"],
        ["precision=w2a2", "precision.w_bits=4", "precision.a_bits=8"],
        ["precision=w4a32", "precision.a_bits=8"],
    ],
)
def test_bit_overrides_rename_the_precision(overrides):
    cfg = compose(["quantizer=dorefa", *overrides])
    assert cfg.precision.name == "w4a8"
    assert cfg.name == "small_cnn_digits_dorefa_w4a8"


def test_wandb_tag_follows_the_bits(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr("qrepro.logging.build_logger", lambda *a, **kw: seen.update(kw))
    cfg = compose(["logger=wandb", "precision.w_bits=4", "precision.a_bits=8"])
    make_logger(cfg, tmp_path, {})
    assert "bits:w4a8" in seen["tags"]


def test_w4a8_trains_and_records_its_bits(tmp_path):
    cfg = compose(["+experiment=demo_digits_sat_w4a4", "precision=w4a8", *FAST])
    rec = train(cfg, run_dir=tmp_path / "run", experiment="demo_digits_sat_w4a4", overrides=["precision=w4a8"]).record
    assert rec["complete"]
    assert (rec["precision"], rec["w_bits"], rec["a_bits"]) == ("w4a8", 4, 8)
    assert rec["config"]["precision"] == {"name": "w4a8", "w_bits": 4, "a_bits": 8}


def test_bit_overrides_name_the_run_directory_and_record(tmp_path):
    """The command line: ``precision.w_bits=4 precision.a_bits=8`` runs under the name w4a8."""
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    args = ["quantizer=dorefa", "precision.w_bits=4", "precision.a_bits=8", *FAST, f"out_root={tmp_path}"]
    r = subprocess.run(
        [sys.executable, "-m", "qrepro.train", *args], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT
    )
    assert r.returncode == 0, r.stderr[-2000:]
    runs = list(tmp_path.glob("*/*/record.json"))
    assert len(runs) == 1, runs
    assert runs[0].parent.parent.name == "small_cnn_digits_dorefa_w4a8"
    rec = json.loads(runs[0].read_text())
    assert (rec["precision"], rec["w_bits"], rec["a_bits"]) == ("w4a8", 4, 8)
