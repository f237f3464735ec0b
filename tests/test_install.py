"""A built wheel carries the configs: the installed package trains, renders tables and completes on the shell from
outside the checkout, through ``python -m`` and its console scripts.

The wheel is built from a copy of the sources (``pip wheel --no-deps --no-build-isolation``) and installed with
``pip install --no-deps --target`` into a temporary folder put first on PYTHONPATH, so the current environment's
torch & co. are reused and nothing is downloaded. About 25 s on a 2-core CPU.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["qrepro", "configs", "pyproject.toml", "setup.py", "MANIFEST.in", "README.md"]
SCRIPTS = {
    "qrepro-train": "qrepro.train:main",
    "qrepro-eval": "qrepro.evaluate:main",
    "qrepro-ptq": "qrepro.ptq.__main__:main",
    "qrepro-table": "qrepro.table:main",
    "qrepro-runs": "qrepro.tables.runs:main",
}


def _setuptools_ok() -> bool:
    try:
        return int(metadata.version("setuptools").split(".")[0]) >= 68
    except metadata.PackageNotFoundError:
        return False


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(site folder holding the installed wheel, env that imports it first, a cwd outside the checkout)."""
    if not _setuptools_ok():
        pytest.skip("building the wheel offline needs setuptools>=68 in this environment (pip install -e '.[dev]')")
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        p = ROOT / name
        if p.is_dir():
            shutil.copytree(p, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif p.is_file():
            shutil.copy2(p, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "-q"]
    subprocess.run([*pip, "wheel", str(src), "--no-deps", "--no-build-isolation", "-w", str(tmp / "wheel")], check=True)
    (wheel,) = (tmp / "wheel").glob("qrepro-*.whl")
    site = tmp / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "PATH": os.pathsep.join([str(site / "bin"), os.environ.get("PATH", "")]),
        "WANDB_MODE": "disabled",
        "OMP_NUM_THREADS": "1",
    }
    outside = tmp / "elsewhere"
    outside.mkdir()
    return site, env, outside


def _run(cmd, installed, **kw):
    site, env, outside = installed
    r = subprocess.run(cmd, cwd=outside, env={**env, **kw.pop("env", {})}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{cmd}: exit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def test_installed_package_uses_its_packaged_configs(installed):
    site = installed[0]
    code = "import qrepro, qrepro.cli as c; print(qrepro.__file__); print(c.CONFIG_DIR)"
    out = _run([sys.executable, "-c", code], installed)
    pkg_file, config_dir = out.split()
    assert Path(pkg_file).resolve().is_relative_to(site.resolve())
    assert Path(config_dir).resolve() == (site / "qrepro" / "configs").resolve()
    for rel in ("train.yaml", "evaluate.yaml", "ptq.yaml", "precision/w4a8.yaml", "experiment/demo_digits_fp.yaml"):
        assert (site / "qrepro" / "configs" / rel).is_file(), rel


def test_console_scripts_are_declared(installed):
    site = installed[0]
    (dist,) = metadata.distributions(path=[str(site)])
    eps = {ep.name: ep.value for ep in dist.entry_points if ep.group == "console_scripts"}
    assert eps == SCRIPTS
    for name in SCRIPTS:
        assert (site / "bin" / name).is_file(), name


def test_installed_train_runs_outside_the_checkout(installed):
    out_root = installed[2] / "runs"
    args = ["+experiment=demo_digits_fp", "trainer.epochs=1", "logger=none", "trainer.progress=false"]
    args += ["trainer.batch_size=256", "model.width=8", f"out_root={out_root}"]
    out = _run([sys.executable, "-m", "qrepro.train", *args], installed)
    record = Path(out.strip().splitlines()[-1].removeprefix("record: "))
    assert record.is_file() and record.is_relative_to(out_root)
    # the console script: the same entry, skipping the now complete run
    out = _run(["qrepro-train", *args], installed)
    assert "already has a complete record" in out


def test_installed_table_renders_outside_the_checkout(installed):
    outside = installed[2]
    _run(
        [
            "qrepro-table",
            "render",
            "symreg_digits_demo",
            "--runs",
            str(outside / "none"),
            "--out",
            "tables",
            "--no-figures",
        ],
        installed,
    )
    assert "symreg_digits_demo" in (outside / "tables" / "symreg_digits_demo.md").read_text()


def test_hydra_bash_completion_of_console_script(installed):
    script = _run(["qrepro-train", "-sc", "install=bash"], installed)
    assert "hydra_bash_completion" in script and script.rstrip().endswith("qrepro-train")
    # what bash does on <TAB>: the installed function calls `qrepro-train -sc query=bash` with COMP_LINE set
    line = "qrepro-train +experiment=sat_mbv2_"
    bash = (
        f'eval "$(qrepro-train -sc install=bash)"\n'
        f'COMP_LINE="{line}"; COMP_POINT=${{#COMP_LINE}}; COMP_CWORD=1\n'
        'hydra_bash_completion\nprintf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    got = sorted(_run(["bash", "-c", bash], installed).split())
    want = sorted(f"+experiment={p.stem}" for p in (ROOT / "configs" / "experiment").glob("sat_mbv2_*.yaml"))
    assert want and got == want
