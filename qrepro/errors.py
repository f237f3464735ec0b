"""User-facing errors: one clear line naming the problem and the fix."""

from __future__ import annotations

import sys


class QreproError(Exception):
    """A problem with the user's input (config, path, checkpoint). Printed as one line, exit code 2."""


def report(e: QreproError) -> int:
    """Print ``e`` as its one line (``error: ...``) on stderr; returns the exit code of a bad input, 2."""
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 2
