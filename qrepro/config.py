"""The configuration layer's base: where the configs live, composing them in-process, the one table of
non-semantic keys, and run-directory naming.

Everything that reads Hydra's or OmegaConf's objects sits at or above this module; the engine and the building
blocks below it take plain arguments.

``NON_SEMANTIC_KEYS`` is the one list of config keys that never change what a run computes (paths, devices,
logging, run control). Three things derive from it:

* the run directory's name (:func:`run_subdir`, which configs/train.yaml names Hydra's directories with through
  the ``run_subdir`` resolver; values in one spelling: ``1e-2`` and ``0.01``, ``True`` and ``true`` are one run);
* the overrides a record stores (:func:`semantic_overrides`), which table cells are matched against;
* a run's identity (passed to ``qrepro.engine.rundir.identity``, which drops these keys before hashing).

``SAME_CELL_KEYS``: keys that change a run's numbers but not the recipe it reproduces (see their comment).
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import re
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import yaml
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.singleton import Singleton
from omegaconf import DictConfig, ListConfig, OmegaConf

from qrepro.errors import QreproError

_PKG = Path(__file__).resolve().parent
# a checkout uses its top-level configs/; an installed wheel carries a copy as qrepro/configs (setup.py)
CONFIG_DIR = str(_PKG.parent / "configs" if (_PKG.parent / "pyproject.toml").is_file() else _PKG / "configs")

# a key names its whole sub-tree: ``logger`` covers ``logger.project``
NON_SEMANTIC_KEYS = (
    "experiment",
    "resume",
    "force",
    "retry",
    "out_root",
    "init_from",  # the identity holds its content hash instead
    "logger",
    "logger.mode",
    "logger.project",
    "logger.entity",
    "logger.group",
    "dataset.root",
    "dataset.download",
    "dataset.workers",
    "trainer.device",
    "trainer.progress",
    "trainer.compile",
    "trainer.num_threads",
    "trainer.log_every",
    "trainer.find_unused_parameters",
    "trainer.members",
    "ptq.eval_fp",
    "hydra.verbose",
    "table",
)
PATH_KEYS = ("init_from", "dataset.root", "out_root")


class SameCellKey(NamedTuple):
    default: Any  # the recipe as written (a run at the default is no other run than before the key existed)
    note: str  # the table's note on a run at another value (``{value}``; ``{batch}``: its trainer.batch_size)


# keys that keep a run the table cell of its recipe but change its numbers slightly. Unlike NON_SEMANTIC_KEYS they
# stay part of the run's directory name, its record's overrides and, away from their default, its identity (a run
# with them is another run than the recipe's: ``qrepro.engine.rundir.identity`` drops them only at the default).
# But a run that differs from a table cell only in them counts as that cell (qrepro.tables.records), and the
# rendered table marks its number with the note, so that nobody mistakes it for a run of the recipe as written.
SAME_CELL_KEYS: dict[str, SameCellKey] = {
    # the same batch, optimizer steps and LR schedule; only what a training forward updates (BatchNorm) sees the
    # smaller micro-batches (qrepro.engine.loop.train_step)
    "trainer.accumulate": SameCellKey(
        1,
        "run with gradient accumulation over {value} micro-batches (trainer.accumulate={value}): the recipe's batch "
        "of {batch} per optimizer step, but BatchNorm saw micro-batches of {batch}/{value}",
    ),
}
SAME_CELL_DEFAULTS = {k: v.default for k, v in SAME_CELL_KEYS.items()}
assert not set(SAME_CELL_KEYS) & set(NON_SEMANTIC_KEYS), "a same-cell key changes results: never non-semantic"


def plain(cfg: Any) -> Any:
    """A config node as plain Python containers (resolved)."""
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, (DictConfig, ListConfig)) else cfg


def without(d: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in keys}


def key_of(override: str) -> str:
    """``'+a.b=1'`` -> ``'a.b'``."""
    return override.split("=", 1)[0].lstrip("+~")


# ------------------------------------------------------------------------------------------ run directories
def run_subdir_name(s: str | None) -> str:
    """A run directory's name from Hydra's ``override_dirname`` (``default`` when empty; path-safe)."""
    s = (s or "").strip()
    return "default" if not s else re.sub(r"[^A-Za-z0-9=,._+\-]", "_", s.replace("/", "_"))[:200]


def canonical_value(v: Any) -> str:
    """A parsed override value written one way: ``1e-2`` and ``0.01`` as ``0.01``, ``True`` and ``true`` as
    ``true``, ``'abc'`` and ``abc`` as ``abc`` (a string that would read as another type stays quoted)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, dict):
        return "{" + ",".join(f"{k}:{canonical_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(canonical_value(x) for x in v) + "]"
    s = str(v)
    plain_str = re.fullmatch(r"[A-Za-z_./@\-][\w./@\-]*", s) and isinstance(yaml.safe_load(s), str)
    return s if plain_str else "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


def canonical_override(o: Any) -> str:
    """A parsed override as ``key=value`` with its value in :func:`canonical_value`'s spelling (the key keeps
    its ``+``/``~`` prefix)."""
    if o.is_sweep_override() or "=" not in o.input_line:
        return o.input_line
    return f"{o.input_line.split('=', 1)[0]}={canonical_value(o.value())}"


_NESTED = [0]  # compositions in progress for a run directory's name (see _run_subdir_resolver)


@contextlib.contextmanager
def beside_hydra() -> Iterator[None]:
    """Compose configs inside a running Hydra job (its GlobalHydra refuses a second initialisation; composing does
    not touch the job's HydraConfig)."""
    saved = Singleton._instances.pop(GlobalHydra, None)
    _NESTED[0] += 1
    try:
        yield
    finally:
        _NESTED[0] -= 1
        if saved is not None:
            Singleton._instances[GlobalHydra] = saved


@functools.lru_cache(maxsize=256)
def _without_defaults(overrides: tuple[str, ...], config_name: str) -> tuple[str, ...]:
    def config(ovr: Sequence[str]) -> Any:
        with beside_hydra():
            return OmegaConf.to_container(compose(ovr, config_name), resolve=False)

    try:
        want, keep = config(overrides), list(overrides)
        for o in sorted(o for o in overrides if _names_run(o)):
            rest = [x for x in keep if x != o]
            if config(rest) == want:  # the experiment says the same without it
                keep = rest
        return tuple(keep)
    except Exception:  # noqa: BLE001  (a command line that does not compose is refused by the launch's check)
        return overrides


def _names_run(override: str) -> bool:
    """Whether an override changes what a run computes: not a non-semantic key, not Hydra's own (``hydra.run.dir``,
    ``hydra/launcher=…``). Run directory names and records' overrides both read it."""
    key = key_of(override)
    return key not in NON_SEMANTIC_KEYS and not f"{key}.".startswith(("hydra.", "hydra/"))


def without_defaults(overrides: Sequence[str], config_name: str = "train") -> list[str]:
    """``overrides`` without those that change nothing: an override whose value is what the experiment (with the
    other overrides) has anyway, such as ``precision=w4a4`` on a W4A4 cell. Needs the ``+experiment=`` among
    them (without it, or when they do not compose, they are returned as they are). ``config_name``: the primary
    config they compose with."""
    if not any(key_of(o) == "experiment" for o in overrides) or not any(_names_run(o) for o in overrides):
        return list(overrides)
    return list(_without_defaults(tuple(overrides), config_name))


# ----------------------------------------------------------------------------------------- from scratch
FROM_SCRATCH = "init_from=null"  # how a run of a chained cell trained from scratch is named and recorded


def starts_from_source(cfg: Any) -> bool:
    """The cell starts from another run's checkpoint unless told otherwise: it names a source cell
    (``init_from_experiment``, resolved by the chain) or an external checkpoint (``init_from_required``)."""
    return bool(cfg.get("init_from_experiment") or cfg.get("init_from_required"))


def trains_from_scratch(cfg: Any) -> bool:
    """A cell that starts from a source, launched without one (``init_from=null``): a different computation
    from the chained run, so a run of its own (named and recorded with :data:`FROM_SCRATCH`)."""
    return starts_from_source(cfg) and not cfg.get("init_from")


def _null_init(override: str) -> bool:
    if key_of(override) != "init_from" or override.startswith("~") or "=" not in override:
        return False
    try:
        (o,) = OverridesParser.create().parse_overrides([override])
    except Exception:  # noqa: BLE001  (not Hydra's grammar: the launch's check says so)
        return False
    return not o.is_sweep_override() and o.value() in (None, "")


@functools.lru_cache(maxsize=256)
def _from_scratch(overrides: tuple[str, ...], config_name: str) -> bool:
    rest = [o for o in overrides if key_of(o) != "init_from"]
    try:
        with beside_hydra():
            return starts_from_source(compose(rest, config_name))
    except Exception:  # noqa: BLE001  (a command line that does not compose is refused by the launch's check)
        return False


def from_scratch(overrides: Sequence[str], config_name: str = "train") -> bool:
    """The overrides train a chained cell from scratch: their last ``init_from`` is null and their experiment
    starts from a source (:func:`starts_from_source`). Needs the ``+experiment=`` among them."""
    inits = [o for o in overrides if key_of(o) == "init_from"]
    if not inits or not _null_init(inits[-1]) or not any(key_of(o) == "experiment" for o in overrides):
        return False
    return _from_scratch(tuple(overrides), config_name)


def run_subdir(overrides: Sequence[str], config_name: str = "train") -> str:
    """The run directory name of these overrides: sorted ``key=value`` items without the non-semantic keys and
    Hydra's own settings, joined by commas, each value in one spelling (:func:`canonical_value`: a run is named
    by what it computes, not by how the command line spelt it), without the overrides that repeat the
    experiment's own values (:func:`without_defaults`); made path-safe by :func:`run_subdir_name`. A chained
    cell trained from scratch keeps ``init_from=null`` (:func:`from_scratch`): it is not the chained run.
    ``config_name``: the primary config the overrides compose with (``ptq`` for ``python -m qrepro.ptq``).
    configs/train.yaml and configs/ptq.yaml name Hydra's run and sweep directories with it (the ``run_subdir``
    resolver)."""
    keep = [o for o in without_defaults(overrides, config_name) if _names_run(o)]  # paths may hold '=' or ','
    parsed = OverridesParser.create().parse_overrides(keep)
    items = [canonical_override(o) for o in parsed] + ([FROM_SCRATCH] if from_scratch(overrides, config_name) else [])
    return run_subdir_name(",".join(sorted(items)))


def member_run_dir(job_dir: Path, job_overrides: Sequence[str], member_overrides: Sequence[str]) -> Path:
    """Where one member of a batched job (``trainer.members=K``) runs. A job directory named by the job's own
    overrides (``<out_root>/<name>/<run_subdir>``, Hydra's default, or a multirun's job directory): the member's
    directory is its sibling named by the member's overrides, where its separate run would go. A directory the
    user chose (``hydra.run.dir=X``): the members go inside it, ``X/<the member's run_subdir>``."""
    name = run_subdir(member_overrides)
    return job_dir.parent / name if job_dir.name == run_subdir(job_overrides) else job_dir / name


def _run_subdir_resolver(overrides: Any, config_name: str = "train") -> str:
    """``${run_subdir:${hydra:overrides.task},${hydra:job.config_name}}``: the run directory name of the task's
    overrides (a string is taken as an ``override_dirname`` already made). Inside a composition that names a run
    (:func:`without_defaults`, :func:`from_scratch`) the running job's ``hydra:`` values would name the outer run
    again, composing without end: there the name is not used (the composed config drops ``hydra``) and is empty."""
    if _NESTED[0]:
        return ""
    if isinstance(overrides, str):
        return run_subdir_name(overrides)
    return run_subdir([str(o) for o in overrides], str(config_name))


def semantic_overrides(overrides: Sequence[str], *, scratch: bool = False, config_name: str = "train") -> list[str]:
    """The overrides that change what a run computes (stored in records; table cells are matched on them), without
    those that repeat the experiment's own values (:func:`without_defaults`: ``precision=w4a4`` on a W4A4 cell is
    the cell as written); ``scratch``: the run is a chained cell trained from scratch (:func:`trains_from_scratch`),
    recorded with ``init_from=null``."""
    out = [FROM_SCRATCH] if scratch else []
    for o in without_defaults(list(overrides), config_name):
        if _names_run(o):
            out.append(o.lstrip("+") if key_of(o) != "seed" else o)
    return sorted(out)


def hydra_context() -> tuple[Path | None, str | None, list[str]]:
    """(run dir, experiment choice, task overrides) when running under Hydra."""
    if not HydraConfig.initialized():
        return None, None, []
    hc = HydraConfig.get()
    out = OmegaConf.select(hc, "runtime.output_dir")  # None: Hydra's config set by a compose, not by a running job
    if out is None:
        return None, None, []
    exp = hc.runtime.choices.get("experiment")
    return Path(out), exp, list(hc.overrides.task)


# ---------------------------------------------------------------------------------------------- composing
def register_resolvers() -> None:
    if not OmegaConf.has_resolver("run_subdir"):
        OmegaConf.register_new_resolver("run_subdir", _run_subdir_resolver)
    if not OmegaConf.has_resolver("qrepro_exclude_keys"):
        OmegaConf.register_new_resolver("qrepro_exclude_keys", lambda: list(NON_SEMANTIC_KEYS))
    # Hydra's deprecation notice for configs/hydra/launcher/submitit_{slurm,local}.yaml, silenced: those files carry
    # the plugin's own names on purpose (hydra/launcher=submitit_slurm), so Hydra validates them against the
    # plugin's schema of the same name, an intended use it reports as deprecated in 1.1 but still performs in 1.3
    # (pinned <1.4 in pyproject.toml; tests/test_ddp.py checks the validation happens).
    warnings.filterwarnings(
        "ignore", message=r"\s*'hydra/launcher/submitit_(slurm|local)' is validated against ConfigStore schema"
    )


def check_group_choices(argv: Sequence[str]) -> None:
    """Fail fast, in one line, on an unknown config-group option (``model=foo``), before Hydra's long message."""
    groups = {p.name for p in Path(CONFIG_DIR).iterdir() if p.is_dir()}
    for arg in argv:
        m = re.match(r"^[+~]{0,2}([A-Za-z_][\w/]*)=(.*)$", arg)
        if not m or m.group(1) not in groups or m.group(2).startswith(("choice(", "range(", "glob(")):
            continue
        group, values = m.groups()
        group_dir = Path(CONFIG_DIR) / group
        for v in values.split(","):
            v = v.strip()
            if v and v != "null" and not (group_dir / f"{v}.yaml").exists():
                known = sorted(p.relative_to(group_dir).with_suffix("").as_posix() for p in group_dir.rglob("*.yaml"))
                close = difflib.get_close_matches(v, known, n=3, cutoff=0.6)
                if close:
                    raise QreproError(f"unknown {group} {v!r}; did you mean {' or '.join(close)}?")
                show = ", ".join(known[:30]) + (f" ... ({len(known)} in all)" if len(known) > 30 else "")
                raise QreproError(f"unknown {group} {v!r}; choose one of: {show}")


# config groups that are not in the primary config's defaults list: ``experiment=x`` means ``+experiment=x``
ADDED_GROUPS = ("experiment",)


def add_group_plus(argv: Sequence[str]) -> list[str]:
    """``experiment=x`` as ``+experiment=x`` (the experiment group is added, not overridden, in Hydra's terms)."""
    return [f"+{a}" if a.split("=", 1)[0] in ADDED_GROUPS and "=" in a else a for a in argv]


def _needs_quotes(value: str, multirun: bool) -> bool:
    if not value or value[0] in "'\"" or value.startswith(("${", "[", "{")):
        return False
    return "=" in value or (not multirun and "," in value) or " " in value


def quote_path_overrides(argv: Sequence[str], multirun: bool) -> list[str]:
    """Quote path values that Hydra's override grammar would split or reject: run directories hold ``=`` and
    ``,`` (``init_from=runs/x/precision=w4a4,seed=1/checkpoints/last.pt``). In a multirun a comma stays a sweep
    separator unless the value also holds ``=`` (then quote each path yourself)."""
    out = []
    for a in argv:
        m = re.match(r"^([+~]{0,2})([A-Za-z_.]+)=(.*)$", a)
        if m and m.group(2) in PATH_KEYS and _needs_quotes(m.group(3), multirun):
            v = m.group(3)
            q = '"' if '"' not in v else "'"
            a = f"{m.group(1)}{m.group(2)}={q}{v}{q}"
        out.append(a)
    return out


def compose(overrides: Sequence[str], config_name: str = "train") -> DictConfig:
    """Compose a config in-process (tests, scripts, the launch's checks) exactly as the command line would."""
    register_resolvers()
    overrides = quote_path_overrides(add_group_plus(overrides), multirun=False)  # run directories hold '=' and ','
    check_group_choices(overrides)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides)
