"""File writes that never leave a partial file behind (:func:`atomic_write`: a temporary file unique to this
process, renamed over the target), and filesystem errors as one ``QreproError`` naming the path."""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path

from qrepro.errors import QreproError

# torch.save reports a failed write (e.g. a full disk) as a RuntimeError from its zip writer
_TORCH_WRITE_ERRORS = ("PytorchStreamWriter", "enforce fail", "unexpected pos", "file write failed")
LOW_SPACE = 64 * 2**20  # below this many free bytes a failed write is taken for a full disk


def _free(path: Path) -> str:
    for p in (path, *path.parents):
        try:
            return f"{shutil.disk_usage(p).free / 2**20:.0f} MiB free"
        except OSError:
            continue
    return "free space unknown"


def _blocking_file(path: Path) -> Path | None:
    """The first component of ``path`` that exists but is not a directory."""
    return next((p for p in reversed((path, *path.parents)) if p.exists() and not p.is_dir()), None)


def _writer_cause(path: Path) -> int | None:
    """The errno behind a failed torch.save at ``path``, read from the filesystem (its error carries none)."""
    parent = path.parent
    if parent.is_dir() and not os.access(parent, os.W_OK):
        return errno.EACCES
    with contextlib.suppress(OSError):
        if shutil.disk_usage(parent).free < LOW_SPACE:
            return errno.ENOSPC
    return None


def io_error(path: Path, e: BaseException, action: str = "write") -> QreproError:
    """One line for a failed filesystem operation on ``path``."""
    code = getattr(e, "errno", None)
    if isinstance(e, RuntimeError) and not isinstance(e, OSError):  # torch's writer: no errno, find the cause
        code = _writer_cause(path)
        if code is None:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            return QreproError(f"cannot {action} {path}: torch's writer failed ({first}; {_free(path.parent)})")
    if code == errno.ENOSPC:
        return QreproError(
            f"cannot {action} {path}: no space left on device ({_free(path.parent)}); free space or set "
            "out_root=<another disk>"
        )
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return QreproError(
            f"cannot {action} {path}: {os.strerror(code).lower()}; fix the permissions or set out_root=<writable dir>"
        )
    blocker = _blocking_file(path.parent if action == "write" else path)
    if code in (errno.ENOTDIR, errno.EEXIST) or blocker is not None:
        where = blocker or path.parent
        return QreproError(
            f"cannot {action} {path}: {where} is a file, not a directory; move it away or set out_root=<dir>"
        )
    why = os.strerror(code).lower() if code else (str(e).splitlines()[0] if str(e) else type(e).__name__)
    return QreproError(f"cannot {action} {path}: {why}")


def ensure_dir(path: str | Path) -> Path:
    """``mkdir -p`` with the failure as one line (a file in the way, no permission, a full disk)."""
    path = Path(path)
    blocker = _blocking_file(path)
    if blocker is not None:
        raise QreproError(
            f"cannot create directory {path}: {blocker} is a file, not a directory; move it away or set out_root"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise io_error(path, e, "create directory") from None
    return path


def atomic_write(path: str | Path, writer: Callable[[Path], object]) -> None:
    """``writer(tmp)`` writes the whole content to ``tmp``; then ``tmp`` replaces ``path`` atomically."""
    path = Path(path)
    ensure_dir(path.parent)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        writer(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) or (isinstance(e, RuntimeError) and any(t in str(e) for t in _TORCH_WRITE_ERRORS)):
            raise io_error(path, e) from None
        raise


def remove_stale_tmp(directory: str | Path) -> list[Path]:
    """Delete ``*.tmp`` files left in ``directory`` (and ``checkpoints/``) by a killed writer. Only the owner of
    the run directory's lock calls this, so no live writer can own them."""
    out = []
    for p in (*Path(directory).glob("*.tmp"), *Path(directory).glob("checkpoints/*.tmp")):
        with contextlib.suppress(OSError):
            p.unlink()
            out.append(p)
    return out
