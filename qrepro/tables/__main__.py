"""``python -m qrepro.tables``: see :mod:`qrepro.tables.cli`."""

import sys

from qrepro.tables.cli import main

sys.exit(main())
