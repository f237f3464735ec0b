"""W&B: disabled in tests, plus one offline run that must produce a run directory."""

import pytest

from qrepro.train import compose, train


def test_wandb_offline_run_dir(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    cfg = compose(
        ["logger=wandb", "trainer.epochs=1", "trainer.progress=false", "model.width=8", "trainer.batch_size=256"]
    )
    res = train(cfg, run_dir=tmp_path / "run", experiment="unit", overrides=[])
    assert res.record["complete"]
    runs = list((tmp_path / "run").rglob("offline-run-*"))
    assert runs, "no offline W&B run directory"
