"""``<run dir>/train.log``: what a run prints to the console, kept beside its record.

:func:`tee_console` copies every write to ``sys.stdout`` and ``sys.stderr`` into the log (appended: a resumed
run's segments follow each other) while the run holds its directory. Progress-bar redraws (writes holding a
carriage return) stay on the terminal only. A log that cannot be written never stops the run: the console
output goes on and the log is closed.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


class _Tee:
    def __init__(self, stream: Any, log: IO[str]) -> None:
        self._stream, self._log = stream, log

    def write(self, s: str) -> int:
        n = self._stream.write(s)
        if "\r" not in s and not self._log.closed:
            try:
                self._log.write(s)
                if "\n" in s:
                    self._log.flush()
            except OSError:
                self._log.close()
        return n

    def flush(self) -> None:
        self._stream.flush()
        if not self._log.closed:
            try:
                self._log.flush()
            except OSError:
                self._log.close()

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding, ... of the real stream
        return getattr(self._stream, name)


@contextlib.contextmanager
def tee_console(path: str | Path) -> Iterator[None]:
    """Copy console output into ``path`` (appended) inside the ``with`` block."""
    try:
        log = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in finally
    except OSError:
        yield  # no log: the run itself is not affected
        return
    out, err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Tee(out, log), _Tee(err, log)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = out, err
        log.close()
