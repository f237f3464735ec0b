"""``torchrun ... tests/ddp_entry.py <overrides>``: qrepro.train's command line (Hydra entry, one-line errors) with
the test-only probe model and quantizer of tests/test_ddp.py registered."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_ddp import register_probe  # noqa: E402

from qrepro.train import main  # noqa: E402

if __name__ == "__main__":
    register_probe()
    main()
