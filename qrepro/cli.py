"""Shared plumbing for the Hydra entry points: argv checks, one-line errors, multirun outcomes, ``hydra_entry``."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf

from qrepro.config import CONFIG_DIR, add_group_plus, check_group_choices, register_resolvers
from qrepro.engine.fsio import atomic_write
from qrepro.engine.record import write_json_atomic
from qrepro.errors import QreproError, report
from qrepro.validation import precheck

# Hydra's own command-line flags: those that take a value, and those after which Hydra prints and runs nothing
_VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd"}
_VALUE_FLAGS |= {"--experimental-rerun", "--info", "-i"}  # --info takes a value only when one of its choices follows
_INFO_CHOICES = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}  # --info [choice]
NO_RUN_FLAGS = {"--cfg", "-c", "--info", "-i", "--help", "-h", "--hydra-help", "--version", "--shell-completion", "-sc"}


def split_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(Hydra's flags with their values, the overrides) of a command line, e.g. ``--cfg job`` is one flag."""
    flags: list[str] = []
    overrides: list[str] = []
    i = 0
    while i < len(argv):
        a, nxt = argv[i], argv[i + 1 : i + 2]
        takes = a in _VALUE_FLAGS and (a not in ("--info", "-i") or bool(nxt) and nxt[0] in _INFO_CHOICES)
        (flags if a.startswith("-") else overrides).extend([a, *nxt] if takes else [a])
        i += 2 if takes else 1
    return flags, overrides


def runs_nothing(argv: Sequence[str]) -> bool:
    """The command line only asks Hydra to print something (config, help, info, shell completion)."""
    return any(f.split("=", 1)[0] in NO_RUN_FLAGS for f in split_argv(argv)[0])


def check_launcher(argv: list[str]) -> None:
    """``hydra/launcher=submitit_*`` needs the optional plugin: say so in one line instead of a Hydra traceback."""
    for arg in argv:
        m = re.match(r"^hydra/launcher=(.*)$", arg)
        if not m or not any(v.strip().startswith("submitit_") for v in m.group(1).split(",")):
            continue
        try:
            import hydra_plugins.hydra_submitit_launcher  # noqa: F401  (optional plugin: the slurm extra)
        except ImportError:
            raise QreproError(
                f"{arg} needs Hydra's submitit launcher plugin; install it with: pip install -e '.[slurm]'"
            ) from None


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's preemption, ``kill``): unwinds like Ctrl-C, so every open run keeps its last
    checkpoint and releases its lock."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated


def handle_sigterm() -> None:
    """End the process on SIGTERM the way Ctrl-C ends it (main thread only; a no-op elsewhere)."""
    with contextlib.suppress(ValueError):  # not the main thread
        signal.signal(signal.SIGTERM, _on_sigterm)


def interrupted(e: KeyboardInterrupt) -> SystemExit:
    """The one line for an interrupted launch and its exit code (130 Ctrl-C, 143 SIGTERM)."""
    what, code = ("terminated (SIGTERM)", 143) if isinstance(e, Terminated) else ("interrupted", 130)
    print(f"{what}: the last finished epoch is checkpointed; resume with resume=true", file=sys.stderr, flush=True)
    return SystemExit(code)


def one_line_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Print a QreproError (or a config error) as one line and exit 2, without a traceback."""

    @functools.wraps(fn)
    def wrapper(*a: Any, **kw: Any) -> Any:
        try:
            return fn(*a, **kw)
        except QreproError as e:
            raise SystemExit(report(e)) from None
        except KeyboardInterrupt as e:
            raise interrupted(e) from None

    return wrapper


def in_multirun() -> bool:
    """This process runs a job of a multirun (``-m``): its config is checked by the job, not by the launch."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def save_hydra_files(run_dir: Path, cfg: Any) -> None:
    """``<run dir>/.hydra/{config,hydra,overrides}.yaml`` as Hydra would write them, but only once the launch
    owns the directory and goes on to train (``hydra.output_subdir: null`` in configs/train.yaml): a launch that
    is refused or skipped leaves a finished run's files as they were."""
    if not HydraConfig.initialized():
        return
    hc = HydraConfig.get()
    files = {
        "config.yaml": OmegaConf.to_yaml(cfg),
        "hydra.yaml": OmegaConf.to_yaml(OmegaConf.create({"hydra": hc})),
        "overrides.yaml": OmegaConf.to_yaml(hc.overrides.task),
    }
    for name, text in files.items():
        atomic_write(run_dir / ".hydra" / name, lambda tmp, text=text: tmp.write_text(text))


# ------------------------------------------------------------------------------------------------ multirun
# A multirun job that fails (bad value, divergence, a crash) is reported and the sweep goes on. Each job writes
# its outcome to <out_root>/.multirun/<token>/<n>.json (works for jobs in other processes, e.g. submitit); the
# launching process prints one summary line and writes <sweep dir>/multirun.json.
_OUTCOMES_ENV = "QREPRO_MULTIRUN_OUTCOMES"


_BEFORE_LAUNCH: list[Path] = []  # the deepest folder of out_root's path that existed before this launch


def _existing_part(path: Any) -> Path:
    p = Path(str(path)).expanduser().absolute()
    return next(q for q in (p, *p.parents) if q.exists())


def _clean_unused_dir(run_dir: Path, out_root: Any = None) -> None:
    """A job that failed before it took the run directory (a bad value) leaves only Hydra's own files there:
    remove those and the directory if it is then empty, and the empty parents Hydra made for it (out_root too,
    when this launch created it). A directory with a lock file (another launch owns or owned it), a record or
    checkpoints is never touched."""
    if out_root and _BEFORE_LAUNCH and _BEFORE_LAUNCH[0] in Path(str(out_root)).absolute().parents:
        out_root = _BEFORE_LAUNCH[0]
    if not run_dir.is_dir() or any((run_dir / n).exists() for n in (".lock", "record.json", "checkpoints")):
        return
    if any(p.name != ".hydra" and not p.name.endswith(".log") for p in run_dir.iterdir()):
        return
    shutil.rmtree(run_dir / ".hydra", ignore_errors=True)
    for p in run_dir.glob("*.log"):
        p.unlink(missing_ok=True)
    stop = Path(str(out_root)).absolute() if out_root else None
    for d in (run_dir, *run_dir.parents):  # the run directory, then parents Hydra created, below out_root
        if stop is None and d != run_dir or stop is not None and (d == stop or stop not in d.absolute().parents):
            break
        try:
            d.rmdir()  # only when empty
        except OSError:
            break


def multirun_job(task: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``task`` as a Hydra job: one line + exit 2 on error in a single run; in a multirun the error is printed,
    the outcome recorded and the sweep goes on. ``task`` returns "finished" (or None), "skipped" or "diverged"."""
    single = one_line_errors(task)

    @functools.wraps(task)
    def wrapper(cfg: Any) -> Any:
        if not HydraConfig.initialized():
            return single(cfg)
        hc = HydraConfig.get()
        num = None if OmegaConf.is_missing(hc.job, "num") else hc.job.num  # set in a multirun only
        job = hc.job.override_dirname or f"job{num}"
        run_dir, sweep_dir = Path(hc.runtime.output_dir), Path(hc.sweep.dir)
        if hc.mode != RunMode.MULTIRUN:
            try:
                return single(cfg)
            except SystemExit:  # failed before it started: leave no empty run directory
                _clean_unused_dir(run_dir, cfg.get("out_root"))
                raise
        out: dict[str, Any] = {"id": job, "num": num, "run_dir": str(run_dir), "sweep_dir": str(sweep_dir)}
        try:
            out["status"] = task(cfg) or "finished"
        except QreproError as e:
            print(f"error: {job}: {e}", file=sys.stderr, flush=True)
            out.update(status="diverged" if str(e).startswith("training diverged") else "failed", error=str(e))
            _clean_unused_dir(run_dir, cfg.get("out_root"))
        except KeyboardInterrupt:
            raise
        except Exception as e:  # noqa: BLE001 - a crash of one job must not end the sweep
            traceback.print_exc()
            first = (str(e).splitlines() or [""])[0]
            out.update(status="failed", error=f"{type(e).__name__}: {first}")
            print(f"error: {job}: crashed ({out['error']})", file=sys.stderr, flush=True)
        _write_outcome(out)
        return out["status"]

    return wrapper


def _write_outcome(out: dict[str, Any]) -> None:
    if d := os.environ.get(_OUTCOMES_ENV):
        with contextlib.suppress(QreproError, OSError):
            write_json_atomic(out, Path(d) / f"{hashlib.sha1(out['run_dir'].encode()).hexdigest()[:16]}.json")


def summarize_multirun(outcomes_dir: Path) -> int:
    """One line ``multirun: N finished, M skipped, K failed: ids`` and <sweep dir>/multirun.json; exit code."""
    jobs = []
    for p in sorted(outcomes_dir.glob("*.json")):
        with contextlib.suppress(OSError, ValueError):
            jobs.append(json.loads(p.read_text()))
    jobs.sort(key=lambda j: (j.get("num") is None, j.get("num") or 0))
    shutil.rmtree(outcomes_dir, ignore_errors=True)
    with contextlib.suppress(OSError):
        outcomes_dir.parent.rmdir()  # <out_root>/.multirun when no other sweep is running
    n = {s: sum(j.get("status") == s for j in jobs) for s in ("finished", "skipped")}
    bad = [j for j in jobs if j.get("status") not in ("finished", "skipped")]
    ids = ", ".join(f"{j['id']} ({j.get('status')})" for j in bad)
    print(
        f"multirun: {n['finished']} finished, {n['skipped']} skipped, {len(bad)} failed" + (f": {ids}" if bad else "")
    )
    for sd in {j.get("sweep_dir") for j in jobs if j.get("sweep_dir")}:
        with contextlib.suppress(QreproError, OSError):
            _merge_multirun_json(Path(sd), [j for j in jobs if j.get("sweep_dir") == sd])
    return 1 if bad else 0


def _merge_multirun_json(sweep_dir: Path, jobs: list[dict[str, Any]]) -> None:
    """Write this sweep's jobs into ``<sweep dir>/multirun.json`` under an exclusive lock: sweeps of the same
    directory at the same time (or one after the other) each add their jobs; a job refused because another
    launch owned its directory does not replace that launch's entry."""
    path = sweep_dir / "multirun.json"
    fd = os.open(sweep_dir / ".multirun.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            old = json.loads(path.read_text()).get("jobs", [])
        except (OSError, ValueError, AttributeError):
            old = []
        merged = {j.get("id"): j for j in old if isinstance(j, dict)}
        for j in jobs:
            if j.get("id") not in merged or "in use by another process" not in str(j.get("error", "")):
                merged[j.get("id")] = j
        out = sorted(merged.values(), key=lambda j: (j.get("num") is None, j.get("num") or 0, str(j.get("id"))))
        failed = [j["id"] for j in out if j.get("status") not in ("finished", "skipped")]
        write_json_atomic({"jobs": out, "failed": failed}, path)
    finally:
        os.close(fd)  # releases the lock


def hydra_entry(
    task: Callable[[Any], Any],
    config_name: str,
    prepare: Callable[[list[str], Any], list[str] | None] | None = None,
) -> None:
    """Run ``task`` under ``hydra.main`` with our resolvers, argv checks (the whole config is composed and
    validated once, before Hydra writes anything), one-line errors, and multirun outcomes with a summary line.

    ``prepare(argv, cfg)``: the launch's own step between the check and Hydra (the trainer resolves a cell's
    chain there); it returns the command line to run, or None when nothing is to run. It is skipped when the
    command line only prints (``--cfg``, ``--info``, ``--help``, ``-sc``)."""
    register_resolvers()
    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    handle_sigterm()
    sys.argv[1:] = add_group_plus(sys.argv[1:])  # experiment=x works with or without the '+'
    one_line_errors(check_group_choices)(sys.argv[1:])
    one_line_errors(check_launcher)(sys.argv[1:])
    # Hydra's shell completion (-sc install=bash | query=bash): no run overrides to check; COMP_LINE may be partial
    if sc := {"-sc", "--shell-completion"} & set(sys.argv[1:]):
        at = sys.argv.index(sc.pop())  # `-sc install=bash`: the words after the flag are its own
        argv, cfg, multirun = sys.argv[at : at + 2], None, False
    else:
        argv, cfg, multirun = one_line_errors(precheck)(sys.argv[1:], config_name)
        if prepare is not None and not runs_nothing(argv):
            argv = one_line_errors(prepare)(argv, cfg)
            if argv is None:
                return
        flags, overrides = split_argv(argv)
        argv = overrides + flags  # Hydra's parser takes the overrides as one run of words, before its flags
    sys.argv[1:] = argv
    _BEFORE_LAUNCH[:] = [_existing_part(cfg.out_root)] if cfg is not None else []  # kept by a failed launch
    outcomes = None
    if multirun:  # its jobs report their outcomes here
        outcomes = Path(str(cfg.out_root)).resolve() / ".multirun" / secrets.token_hex(6)
        os.environ[_OUTCOMES_ENV] = str(outcomes)
    main = hydra.main(config_path=CONFIG_DIR, config_name=config_name, version_base="1.3")(multirun_job(task))
    try:
        main()
    except KeyboardInterrupt as e:  # a multirun interrupted mid-job (a single run exits in one_line_errors)
        raise interrupted(e) from None
    if outcomes is not None:
        code = summarize_multirun(outcomes)
        os.environ.pop(_OUTCOMES_ENV, None)
        if code:
            sys.exit(code)
