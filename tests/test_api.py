"""``qrepro.api``: a run built and stepped in-process is the trainer's run, step for step."""

import pytest
import torch

from qrepro.api import build
from qrepro.train import compose, train

BASE = ["logger=none", "trainer.progress=false", "trainer.device=cpu", "trainer.compile=false", "model.width=8"]
CASES = {
    "fp": ["+experiment=demo_digits_fp", "trainer.batch_size=256"],
    "apot": ["+experiment=demo_digits_apot_w4a4", "trainer.batch_size=256"],
    "sat": ["+experiment=demo_digits_sat_w4a4", "trainer.batch_size=256"],
    "tr": ["+experiment=demo_digits_fp", "quantizer=tr", "optimizer=sgdt", "precision=w2a2", "trainer.batch_size=256"],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_api_steps_equal_one_trainer_epoch(tmp_path, case):
    over = [*BASE, *CASES[case], "trainer.epochs=1", "init_from=null"]
    res = train(compose(over), run_dir=tmp_path / "run", experiment="unit", overrides=[])
    trained = torch.load(res.record_path.parent / "checkpoints" / "last.pt", weights_only=False)["model"]

    run = build(over)
    assert run.cfg.trainer.epochs == 1 and run.steps_per_epoch == len(run.data.train)
    run.data.train.set_epoch(0)
    losses = [float(run.step(x, y)) for x, y in run.data.train]
    assert len(losses) == run.steps_per_epoch and all(torch.isfinite(torch.tensor(losses)))
    ours = run.model.state_dict()
    assert set(ours) == set(trained)
    for k, v in trained.items():
        torch.testing.assert_close(ours[k], v, rtol=0, atol=0, msg=lambda m, k=k: f"{k}: {m}")


def test_api_float64_and_schedule():
    run = build([*BASE, *CASES["fp"], "trainer.epochs=2"], dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in run.model.parameters())
    x, y = next(iter(run.data.train))
    lr0 = run.optimizer.param_groups[0]["lr"]
    loss = run.step(x, y)  # float32 input is converted to the run's dtype
    assert loss.dtype == torch.float64 and run.ctx.step == 1
    assert run.optimizer.param_groups[0]["lr"] < lr0  # the cosine schedule stepped with the optimizer
    assert 0.0 <= run.evaluate()["test_top1"] <= 100.0


def test_api_build_checks_the_precision_as_the_launch_does():
    from qrepro.errors import QreproError

    for bad, shown in (("9", "9"), ("4.5", "4.5")):
        with pytest.raises(QreproError, match=rf"^precision.w_bits={shown} is out of range; use 1..8 or 32"):
            build([*BASE, *CASES["fp"], f"precision.w_bits={bad}"], load_data=False, num_classes=10, steps_per_epoch=1)


def test_api_without_data_needs_sizes():
    with pytest.raises(ValueError, match="num_classes"):
        build([*BASE, *CASES["fp"]], load_data=False)
    run = build([*BASE, *CASES["fp"]], load_data=False, num_classes=10, steps_per_epoch=5)
    assert run.data is None and run.steps_per_epoch == 5
