"""The table runner and the sweep scripts group seeds into batched members (``--members K``/``trainer.members``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from qrepro.errors import QreproError
from qrepro.run_table import RunResult, group_members, parse_record_lines, plan
from qrepro.run_table import main as run_table_main
from qrepro.tables.schema import load_table

CONFIGS = Path(__file__).parent / "fixtures" / "tables" / "configs"


def _fake(calls: list[list[str]], tmp_path: Path):
    """A runner printing one ``record:`` line per member (a batched job) or one (a single run)."""

    def run(cmd: list[str]) -> RunResult:
        calls.append(cmd)
        k = next((int(a.split("=")[1]) for a in cmd if a.startswith("trainer.members=")), 1)
        s0 = next((int(a.split("=")[1]) for a in cmd if a.startswith("seed=")), 0)
        base = ",".join(a for a in cmd[3:] if not a.startswith(("++logger", "init_from", "seed", "trainer.members")))
        recs = tuple(tmp_path / f"{base},seed={s0 + i}" / "record.json" for i in range(k))
        return RunResult(0, recs[-1], recs)

    return run


def test_run_table_groups_consecutive_seeds_of_unchained_cells(tmp_path):
    calls: list[list[str]] = []
    argv = ["demo", "--seeds", "0,1,2,3", "--members", "3", "--configs", str(CONFIGS), "--runs", str(tmp_path / "x")]
    assert run_table_main(argv, runner=_fake(calls, tmp_path)) == 0
    fp = [c for c in calls if "+experiment=demo_fp" in c]
    # cell fp: seeds 0-2 as one batched job, seed 3 alone
    assert [c[4:] for c in fp] == [
        ["seed=0", "trainer.members=3", "++logger.group=demo"],
        ["seed=3", "++logger.group=demo"],
    ]
    # chained cells stay one run per seed, each from its own parent run (a member's run directory)
    w4 = [c for c in calls if "precision=w4a4" in c and "optimizer=sgdt" not in c]
    assert len(w4) == 4 and not any("trainer.members=3" in c for c in w4)
    w4_seed1 = next(c for c in w4 if "seed=1" in c)
    assert w4_seed1[-1] == f'init_from="{(tmp_path / "+experiment=demo_fp,seed=1").as_posix()}/checkpoints/last.pt"'
    # trainer.members=K as an override means the same as --members K (and is not passed to every run)
    calls2: list[list[str]] = []
    argv2 = ["demo", "--seeds", "0,1,2", "--configs", str(CONFIGS), "--runs", str(tmp_path / "x"), "trainer.members=3"]
    assert run_table_main(argv2, runner=_fake(calls2, tmp_path)) == 0
    assert sum("trainer.members=3" in c for c in calls2) == 2  # fp and w4_sgdt (unchained cells)
    with pytest.raises(SystemExit):
        run_table_main(["demo", "--members", "x"], runner=_fake([], tmp_path))


def test_group_members_keeps_done_and_chained_runs_single():
    table = load_table(CONFIGS / "table" / "demo.yaml")
    jobs = plan(table, [], seeds=[0, 1, 2, 4, 5])
    units = group_members(jobs, 2)
    fp = [u for u in units if (u[0] if isinstance(u, list) else u).cell.id == "fp"]
    assert [[j.seed for j in u] if isinstance(u, list) else u.seed for u in fp] == [[0, 1], 2, [4, 5]]
    assert all(not isinstance(u, list) for u in units if (u[0] if isinstance(u, list) else u).cell.id == "w4")
    assert group_members(jobs, 1) == jobs
    assert parse_record_lines(["x", "record: a/record.json", "record: b/record.json"]) == [
        Path("a/record.json"),
        Path("b/record.json"),
    ]


def test_sweep_batches_seeds_and_refuses_chains():
    from qrepro.sweep import commands, seed_groups

    assert seed_groups([0, 1, 2, 3, 4, 5], 3) == [(0, 3), (3, 3)]
    assert seed_groups([0, 1, 5], 3) == [(0, 2), (5, 1)]
    lines = commands("sat_table4_cifar_resnet20", "submitit_slurm", only=["resnet20_fp*"], seeds=range(6), members=3)
    run = [ln for ln in lines if not ln.startswith("#")]
    assert len(run) == 1 and "seed=0,3 trainer.members=3" in run[0] and "hydra.launcher.gpus_per_node=1" in run[0]
    tr = commands("sat_table4_cifar_resnet20", "torchrun", only=["resnet20_fp"], seeds=[0, 1], members=2)
    assert tr[-1].startswith("python -m qrepro.train +experiment=sat_cifar_resnet20_fp seed=0 trainer.members=2")
    with pytest.raises(QreproError, match="run qrepro-table run sat_table4_cifar_resnet20 --seeds 0,1,2"):
        commands("sat_table4_cifar_resnet20", seeds=[0, 1, 2], members=3)
    with pytest.raises(QreproError, match="groups of --members"):
        commands("sat_table4_cifar_resnet20", only=["resnet20_fp"], seeds=[0, 1, 2, 3], members=3)
    with pytest.raises(QreproError, match="needs --seeds"):
        commands("sat_table4_cifar_resnet20", only=["resnet20_fp"], members=3)
