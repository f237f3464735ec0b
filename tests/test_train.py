"""End-to-end digits runs: complete records, resume after an interruption, skip, NaN guard, init chains."""

import json

import pytest
import torch

import qrepro.engine.trainer as trainer_mod
from qrepro.errors import QreproError
from qrepro.train import compose, train

FAST = ["logger=none", "trainer.progress=false", "trainer.batch_size=128", "model.width=8", "trainer.log_every=5"]


def _run(tmp_path, extra, sub="run"):
    cfg = compose([*FAST, *extra])
    return train(cfg, run_dir=tmp_path / sub, experiment="unit", overrides=extra)


def test_short_run_writes_complete_record(tmp_path):
    res = _run(tmp_path, ["trainer.epochs=2"])
    rec = json.loads(res.record_path.read_text())
    assert rec["complete"] is True
    for key in (
        "config",
        "metrics",
        "curves",
        "git",
        "versions",
        "device",
        "wall_time_s",
        "images_per_s",
        "experiment",
        "overrides",
        "w_bits",
        "a_bits",
        "seed",
    ):
        assert key in rec, key
    m = rec["metrics"]
    assert m["best_top1"] >= m["last_top1"] - 1e-9 and 0 <= m["last_top1"] <= 100
    assert set(m) >= {"best_top1", "best_top5", "last_top1", "last_top5", "best_epoch"}
    assert rec["curves"]["epoch"] == [1, 2]
    for k in ("train_loss", "train_top1", "test_loss", "test_top1", "test_top5", "lr"):
        assert len(rec["curves"][k]) == 2
    assert rec["overrides"] == ["trainer.epochs=2"]
    assert (res.record_path.parent / "checkpoints" / "last.pt").exists()


def test_resume_after_interruption_matches_uninterrupted_run(tmp_path, monkeypatch):
    ref = json.loads(_run(tmp_path, ["trainer.epochs=3"], "ref").record_path.read_text())

    calls = {"n": 0}
    real = trainer_mod.evaluate

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # killed during epoch 3, after epochs 1-2 were checkpointed
        return real(*a, **k)

    monkeypatch.setattr(trainer_mod, "evaluate", flaky)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, ["trainer.epochs=3"], "int")
    assert not (tmp_path / "int" / "record.json").exists()
    st = torch.load(tmp_path / "int" / "checkpoints" / "last.pt", weights_only=True)
    assert st["epoch"] == 1
    monkeypatch.setattr(trainer_mod, "evaluate", real)
    rec = json.loads(_run(tmp_path, ["trainer.epochs=3", "resume=true"], "int").record_path.read_text())
    assert rec["complete"] and rec["curves"]["epoch"] == [1, 2, 3]
    assert rec["curves"]["test_top1"] == pytest.approx(ref["curves"]["test_top1"], abs=1e-6)
    assert rec["curves"]["train_loss"] == pytest.approx(ref["curves"]["train_loss"], rel=1e-5)


def test_complete_record_is_skipped(tmp_path, capsys):
    _run(tmp_path, ["trainer.epochs=1"])
    mtime = (tmp_path / "run" / "record.json").stat().st_mtime
    _run(tmp_path, ["trainer.epochs=1"])
    assert "skip" in capsys.readouterr().out
    assert (tmp_path / "run" / "record.json").stat().st_mtime == mtime


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    real = torch.nn.functional.cross_entropy
    calls = {"n": 0}

    def poisoned(logits, y, **kw):
        calls["n"] += 1
        out = real(logits, y, **kw)
        return out * float("nan") if calls["n"] > 20 else out  # epoch 1 (12 steps + eval) is fine

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", poisoned)
    with pytest.raises(QreproError, match="diverged"):
        _run(tmp_path, ["trainer.epochs=3"])
    rec = json.loads((tmp_path / "run" / "record.json").read_text())
    assert rec["complete"] is False and rec["status"] == "diverged"
    assert rec["curves"]["epoch"] == [1]
    st = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert st["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in st["model"].values() if v.is_floating_point())


def test_init_from_chain_and_strictness(tmp_path):
    res = _run(tmp_path, ["trainer.epochs=1"], "fp")
    ckpt = res.record_path.parent / "checkpoints" / "last.pt"
    cfg = compose([*FAST, "trainer.epochs=1", f"init_from={ckpt}"])
    res2 = train(cfg, run_dir=tmp_path / "chained", experiment="unit", overrides=[])
    assert res2.record["complete"]
    bad = compose([*FAST, "trainer.epochs=1", "model.width=16", f"init_from={ckpt}"])
    with pytest.raises(QreproError, match="shape|match"):
        train(bad, run_dir=tmp_path / "bad", experiment="unit", overrides=[])


def test_label_smoothing_and_ema_run(tmp_path):
    res = _run(tmp_path, ["trainer.epochs=1", "trainer.label_smoothing=0.1", "trainer.ema=0.9"])
    assert res.record["complete"]
