"""Every command of the README's "Reproduce a paper table" walkthrough runs (training ones as their plan preview)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def walkthrough() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Reproduce a paper table", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]


def _argv(cmd: str, imagenet: Path, out: Path) -> tuple[list[str], dict[str, str]]:
    """The command as this test runs it: the tiny ImageFolder for /data/imagenet, no `| bash`, training commands
    as their preview (`run` -> `plan`, the trainer with +plan=true), renders into a temporary folder."""
    env = {**os.environ, "WANDB_MODE": "disabled"}
    cmd = cmd.replace("/data/imagenet", str(imagenet)).removesuffix("| bash").strip()
    words = shlex.split(cmd)
    while "=" in words[0]:  # leading VAR=value
        k, v = words.pop(0).split("=", 1)
        env[k] = v
    if words[0] == "qrepro-table":
        words = [sys.executable, "-m", "qrepro.table", *words[1:]]
        if words[3] == "run":
            words[3] = "plan"
        if words[3] == "render":
            words += ["--out", str(out), "--no-figures"]
        if words[3] in ("plan", "run"):
            words += ["--runs", str(out / "runs")]
    elif words[:3] == ["python", "-m", "qrepro.train"]:
        words = [sys.executable, *words[1:]]
        if "+plan=true" not in words:
            words.append("+plan=true")
    else:
        raise AssertionError(f"the walkthrough has a command this test does not know: {cmd}")
    return words, env


def test_walkthrough_commands_run(tmp_path):
    cmds = walkthrough()
    assert len(cmds) == 6
    assert [c.split()[0] for c in cmds].count("qrepro-table") >= 3
    imagenet = tmp_path / "imagenet"
    for split in ("train", "val"):
        (imagenet / split / "a").mkdir(parents=True)
    outputs = []
    for cmd in cmds:
        argv, env = _argv(cmd, imagenet, tmp_path / "out")
        proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
        outputs.append(proc.stdout)
    plan, cell_plan, cell, run, sweep, _ = outputs
    assert "+experiment=sat_mbv2_4bit" in plan and "+experiment=sat_mbv1_fp" in plan
    assert cell_plan.splitlines()[0] == "plan: sat_mbv2_4bit: 2 run(s) in order" and cell == cell_plan
    assert "+experiment=sat_mbv2_8bit" in run and "sat_mbv1" not in run
    assert "hydra/launcher=submitit_slurm" in sweep
    assert "sat_table1" in (tmp_path / "out" / "sat_table1.md").read_text()
    assert not (tmp_path / "runs").exists()  # nothing was trained
