"""``python -m qrepro.tables.portable [--text] < in > out``: see :func:`main`."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from qrepro.tables.records import portable_str, portable_text


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m qrepro.tables.portable [--text] < in > out``: a file made portable on its way into ``results/``:
    JSON by :func:`portable` (as the trainer lays it out), anything else, such as a log, by :func:`portable_str`;
    ``--text``: line by line as it streams (a console log piped through ``tee``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv == ["--text"]:
        for line in sys.stdin:
            sys.stdout.write(portable_str(line))
            sys.stdout.flush()
        return 0
    if argv:
        print("usage: python -m qrepro.tables.portable [--text] < in > out", file=sys.stderr)
        return 2
    text = sys.stdin.read()
    try:
        data = json.loads(text)
    except ValueError:
        sys.stdout.write(portable_str(text))
        return 0
    sys.stdout.write(portable_text(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
