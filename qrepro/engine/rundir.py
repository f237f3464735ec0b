"""One run directory, one owner: the lock (:class:`RunLock`), a run's identity (:func:`identity`), what a launch
does with a directory it holds (:func:`prepare_run_dir`: fresh, resume or skip) and superseded records
(:func:`mark_superseded`). The behaviour under relaunch, kill and reruns: docs/runs.md.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from qrepro.engine.checkpoint import read_checkpoint
from qrepro.engine.fsio import ensure_dir, io_error, remove_stale_tmp
from qrepro.engine.record import read_record, write_json_atomic
from qrepro.errors import QreproError

LOCK_NAME = ".lock"
WANDB_ID_FILE = "wandb_id"  # the W&B run a resumed launch continues
RESUME_HINT = "add resume=true to continue it, or force=true to start over"


class RunLock:
    """``<run dir>/.lock``: an exclusive ``flock`` held for the whole run and released by the kernel when the
    process dies (even on ``kill -9``). The file names the owner; a lock left by a dead process is taken over."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.fd: int | None = None

    @staticmethod
    def _read(fd: int) -> dict[str, Any] | None:
        try:
            data = os.pread(fd, 65536, 0)
            return json.loads(data) if data.strip() else None
        except (OSError, ValueError):
            return None

    def acquire(self) -> RunLock:
        ensure_dir(self.run_dir)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise io_error(self.path, e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = self._read(fd) or {}
            os.close(fd)
            who = f"pid {owner.get('pid', '?')} on {owner.get('host', '?')}, since {owner.get('started', '?')}"
            raise QreproError(
                f"{self.run_dir} is in use by another process ({who}); wait for it to finish or stop it first"
            ) from None
        except OSError as e:
            os.close(fd)
            raise io_error(self.path, e, "lock") from None
        previous = self._read(fd)  # a dead owner's entry
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "argv": sys.argv[:20],
        }
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        except OSError as e:
            os.close(fd)
            raise io_error(self.path, e) from None
        self.fd = fd
        if previous:
            print(
                f"lock: taking over {self.path} left by pid {previous.get('pid')} on {previous.get('host')} "
                f"(since {previous.get('started')}; that process is gone)",
                flush=True,
            )
        removed = remove_stale_tmp(self.run_dir)  # partial writes of a killed owner
        if removed:
            print(f"lock: removed {len(removed)} partial file(s) of a killed run: {removed[0].name} ...", flush=True)
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, 0)  # an empty lock file: nobody owns the directory
        try:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:  # read-only
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def init_source(init_from: Any) -> dict[str, str] | None:
    """``{"path", "sha256"}`` of an ``init_from`` file (None without one); a bad path is one line."""
    if not init_from:
        return None
    p = Path(str(init_from))
    if not p.is_file():
        read_checkpoint(p)  # raises the one-line error: "is a directory" (with a hint) or "does not exist"
    try:
        return {"path": str(p), "sha256": file_sha256(p)}
    except OSError as e:
        raise io_error(p, e, "read") from None


def _drop(d: dict[str, Any], dotted: str) -> None:
    head, _, rest = dotted.partition(".")
    if not rest:
        d.pop(head, None)
    elif isinstance(d.get(head), dict):
        _drop(d[head], rest)


_MISSING = object()


def _get(d: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return _MISSING
        d = d[part]
    return d


def result_config(
    config: dict[str, Any], non_result_keys: Sequence[str], unset_defaults: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The part of a resolved config that determines a run's result (``config`` without ``non_result_keys``, and
    without the keys of ``unset_defaults`` that hold their default value: keys added later, whose default is what
    every run did before they existed, e.g. ``qrepro.config.SAME_CELL_DEFAULTS``)."""
    out = json.loads(json.dumps(config, default=str))
    for k in non_result_keys:
        _drop(out, k)
    for k, default in (unset_defaults or {}).items():
        if _get(out, k) == default:
            _drop(out, k)
    if isinstance(out.get("trainer"), dict) and out["trainer"].get("amp") in ("off", False, None):
        _drop(out, "trainer.amp")  # float32 (the default): the identity of runs from before the key existed
    if isinstance(out.get("trainer"), dict) and out["trainer"].get("channels_last") is False:
        _drop(out, "trainer.channels_last")  # NCHW (the default): as before the key was part of the identity
    return out


def identity(
    config: dict[str, Any],
    init: dict[str, str] | None,
    non_result_keys: Sequence[str],
    unset_defaults: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """What determines a run's result: the hash of ``config`` without ``non_result_keys`` (the configuration's
    non-semantic keys, ``qrepro.config.NON_SEMANTIC_KEYS``) and without ``unset_defaults`` keys at their default
    (:func:`result_config`), and the content hash of ``init_from``."""
    cfg = result_config(config, non_result_keys, unset_defaults)
    digest = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()
    return {"config_sha256": digest, "init_from_sha256": init["sha256"] if init else None, "config": cfg}


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    return {k: v for key, sub in d.items() for k, v in _flat(sub, f"{prefix}.{key}" if prefix else key).items()}


def _init_change(old: str | None, new: str | None) -> str:
    return f"init_from {'sha256 ' + old[:12] if old else 'none'} -> {'sha256 ' + new[:12] if new else 'none'}"


def identity_difference(old: dict[str, Any] | None, new: dict[str, Any]) -> str | None:
    """None when ``old`` (from a checkpoint or record) describes the same run as ``new``; else what differs.
    Entries written before identities were recorded (``old`` None) are taken as the same run."""
    if not old:
        return None
    parts = []
    if old.get("init_from_sha256") != new.get("init_from_sha256"):
        parts.append(_init_change(old.get("init_from_sha256"), new.get("init_from_sha256")))
    if old.get("config_sha256") and old.get("config_sha256") != new.get("config_sha256"):
        fo, fn = _flat(old.get("config") or {}), _flat(new.get("config") or {})
        first = ("quantizer.name", "model.name", "precision.name", "dataset.name", "optimizer.name", "scheduler.name")
        keys = sorted((k for k in set(fo) | set(fn) if fo.get(k) != fn.get(k)), key=lambda k: (k not in first, k))
        shown = ", ".join(f"{k} {fo.get(k)!r} -> {fn.get(k)!r}" for k in keys[:3])
        parts.append(f"config: {shown}" + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""))
    return "; ".join(parts) or None


def mark_superseded(record_path: Path, record: dict[str, Any], why: str) -> None:
    """Rewrite an old record as superseded (never complete) before a rerun touches the checkpoints."""
    old_status = record.get("status") or ("complete" if record.get("complete") else "incomplete")
    record = {
        **record,
        "complete": False,
        "status": "superseded",
        "superseded": {"at": time.strftime("%Y-%m-%dT%H:%M:%S"), "by": why, "previous_status": old_status},
    }
    write_json_atomic(record, record_path)


def remove_checkpoints(run_dir: Path) -> list[str]:
    """Delete a run's checkpoints (a rerun starts from scratch); returns the names removed."""
    gone = []
    d = run_dir / "checkpoints"
    if d.is_dir():
        for p in sorted(d.iterdir()):
            if p.is_file():
                try:
                    p.unlink()
                except OSError as e:
                    raise io_error(p, e, "remove") from None
                gone.append(p.name)
    return gone


def _init_mismatch(record: dict[str, Any], init: dict[str, str] | None) -> str | None:
    """How ``record``'s initialisation differs from this launch's ``init`` (None: the same)."""
    ident = record.get("identity")
    now_sha = init["sha256"] if init else None
    if isinstance(ident, dict) and "init_from_sha256" in ident:
        old = ident["init_from_sha256"]
        return None if old == now_sha else _init_change(old, now_sha)
    old_path, now_path = record.get("init_from") or None, init["path"] if init else None  # a record without hashes
    return None if old_path == now_path else f"init_from {old_path} -> {now_path}"


def prepare_run_dir(
    run_dir: Path, init: dict[str, str] | None, *, force: bool, retry: bool, resume: bool, epochs: int
) -> tuple[str, dict[str, Any] | None]:
    """What this launch does with ``run_dir`` (its lock held): ("fresh" | "resume" | "skip", record).

    * ``force`` (or ``retry`` on a diverged run): the old record is marked superseded, then the old checkpoints
      are removed, then the run starts from scratch;
    * a complete record: skipped, but only when it was initialised from the same ``init_from`` content;
    * a diverged record: skipped (``retry`` or ``force`` runs it again);
    * a checkpoint without a complete record (a killed run): resumed with ``resume``, else refused in one line.
    """
    record_path = run_dir / "record.json"
    rec = read_record(record_path)
    diverged = rec is not None and rec.get("status") == "diverged"
    last = run_dir / "checkpoints" / "last.pt"
    if force or (retry and diverged):
        why = "force=true" if force else "retry=true"
        if rec is not None:
            mark_superseded(record_path, rec, why)
        gone = remove_checkpoints(run_dir)
        (run_dir / WANDB_ID_FILE).unlink(missing_ok=True)
        if rec is not None or gone:
            print(f"{why}: {run_dir} starts over (old record marked superseded, removed {gone or 'no checkpoints'})")
        return "fresh", None
    if rec is not None and rec.get("complete") is True:
        diff = _init_mismatch(rec, init)
        if diff:
            raise QreproError(
                f"{run_dir} holds a complete run initialised differently ({diff}); a different initialisation is a "
                "different run: pass another out_root=..., or force=true to replace it"
            )
        return "skip", rec
    if diverged:
        return "skip", rec
    if last.exists():
        if not resume:
            try:
                ck = read_checkpoint(last)
                where = f"checkpoint after epoch {int(ck['epoch']) + 1}/{epochs}"
            except (QreproError, KeyError, TypeError, ValueError):
                where = f"checkpoint {last}"
            raise QreproError(f"{run_dir} holds an unfinished run ({where}, no complete record); {RESUME_HINT}")
        return "resume", rec
    return "fresh", rec
