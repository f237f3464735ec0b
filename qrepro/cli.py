"""Shared plumbing for the Hydra entry points: config dir, resolvers, argv checks, one-line errors."""

from __future__ import annotations

import functools
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from qrepro.errors import QreproError

_PKG = Path(__file__).resolve().parent
# a checkout uses its top-level configs/; an installed wheel carries a copy as qrepro/configs (setup.py)
CONFIG_DIR = str(_PKG.parent / "configs" if (_PKG.parent / "pyproject.toml").is_file() else _PKG / "configs")

# keys that never change what a run computes: excluded from the run directory name and the record's overrides
NON_SEMANTIC_KEYS = {
    "experiment",
    "resume",
    "force",
    "dataset.root",
    "out_root",
    "init_from",
    "logger",
    "logger.mode",
    "logger.project",
    "logger.entity",
    "logger.group",
    "trainer.device",
    "trainer.progress",
    "trainer.compile",
    "trainer.num_threads",
    "trainer.log_every",
    "trainer.find_unused_parameters",
    "hydra.verbose",
    "table",
}


def _run_subdir(s: str | None) -> str:
    s = (s or "").strip()
    if not s:
        return "default"
    return re.sub(r"[^A-Za-z0-9=,._+\-]", "_", s.replace("/", "_"))[:200]


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("run_subdir"):
        OmegaConf.register_new_resolver("run_subdir", _run_subdir)
    quiet_launcher_schema_matching()


def quiet_launcher_schema_matching() -> None:
    """Silence Hydra's deprecation notice for ``configs/hydra/launcher/submitit_{slurm,local}.yaml``.

    Those files carry the plugin's own names on purpose (``hydra/launcher=submitit_slurm``), so Hydra validates
    them against the plugin's schema of the same name, an intended use it reports as deprecated in 1.1 but still
    performs in 1.3 (pinned ``<1.4`` in pyproject.toml; ``tests/test_ddp.py`` checks the validation happens).
    """
    import warnings

    warnings.filterwarnings(
        "ignore", message=r"\s*'hydra/launcher/submitit_(slurm|local)' is validated against ConfigStore schema"
    )


def check_launcher(argv: list[str]) -> None:
    """``hydra/launcher=submitit_*`` needs the optional plugin: say so in one line instead of a Hydra traceback."""
    for arg in argv:
        m = re.match(r"^hydra/launcher=(.*)$", arg)
        if not m or not any(v.strip().startswith("submitit_") for v in m.group(1).split(",")):
            continue
        try:
            import hydra_plugins.hydra_submitit_launcher  # noqa: F401
        except ImportError:
            raise QreproError(
                f"{arg} needs Hydra's submitit launcher plugin; install it with: pip install -e '.[slurm]'"
            ) from None


def check_group_choices(argv: list[str]) -> None:
    """Fail fast, in one line, on an unknown config-group option (``model=foo``), before Hydra's long message."""
    groups = {p.name for p in Path(CONFIG_DIR).iterdir() if p.is_dir()}
    for arg in argv:
        m = re.match(r"^[+~]{0,2}([A-Za-z_][\w/]*)=(.*)$", arg)
        if not m or m.group(1) not in groups:
            continue
        group, values = m.group(1), m.group(2)
        if values.startswith(("choice(", "range(", "glob(")):
            continue
        for v in values.split(","):
            v = v.strip()
            if v and v != "null" and not (Path(CONFIG_DIR) / group / f"{v}.yaml").exists():
                known = sorted(p.stem for p in (Path(CONFIG_DIR) / group).rglob("*.yaml"))
                show = ", ".join(known[:30]) + (" ..." if len(known) > 30 else "")
                raise QreproError(f"unknown {group} {v!r}; choose one of: {show}")


def one_line_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Print a QreproError (or a config error) as one line and exit 2, without a traceback."""

    @functools.wraps(fn)
    def wrapper(*a: Any, **kw: Any) -> Any:
        try:
            return fn(*a, **kw)
        except QreproError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        except KeyboardInterrupt:
            print("interrupted: the last finished epoch is checkpointed; resume with resume=true", file=sys.stderr)
            raise SystemExit(130) from None

    return wrapper


def hydra_entry(task: Callable[[Any], Any], config_name: str) -> None:
    """Run ``task`` under ``hydra.main`` with our resolvers, argv checks and one-line errors."""
    import hydra

    register_resolvers()
    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    one_line_errors(check_group_choices)(sys.argv[1:])
    one_line_errors(check_launcher)(sys.argv[1:])
    main = hydra.main(config_path=CONFIG_DIR, config_name=config_name, version_base="1.3")(one_line_errors(task))
    main()
