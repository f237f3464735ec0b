"""User-facing errors: one clear line naming the problem and the fix."""

from __future__ import annotations


class QreproError(Exception):
    """A problem with the user's input (config, path, checkpoint). Printed as one line, exit code 2."""
