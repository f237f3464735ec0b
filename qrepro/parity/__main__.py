"""``python -m qrepro.parity <suite> --reference DIR [--steps N] [--data CIFAR]``: see qrepro/parity."""

from __future__ import annotations

import argparse
import sys
import time

import torch

from qrepro.cli import one_line_errors
from qrepro.parity import CIFAR_ENV, REFERENCE_ENV, REFERENCE_REPOS, run_suite


@one_line_errors
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qrepro.parity", description=__doc__)
    p.add_argument("suite", choices=sorted(REFERENCE_REPOS))
    p.add_argument(
        "--reference",
        default=None,
        help=f"checkout of the authors' repository (default: ${REFERENCE_ENV}/<folder of the suite>)",
    )
    p.add_argument("--steps", type=int, default=20, help="optimizer steps compared after the first forward/backward")
    p.add_argument(
        "--data",
        default=None,
        help=f"CIFAR-10 root: torchvision folder, ImageFolder or .tar.gz (default: ${CIFAR_ENV})",
    )
    p.add_argument("--batch", type=int, default=None, help="images per step (default: the suite's)")
    p.add_argument("--quick", action="store_true", help="a reduced grid (the test suite's)")
    a = p.parse_args(argv)
    if a.steps < 1:
        p.error("--steps must be >= 1")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.perf_counter()
    kw = {"steps": a.steps, "data": a.data, "quick": a.quick}
    if a.batch:
        kw["batch"] = a.batch
    reports = run_suite(a.suite, a.reference, **kw)
    for r in reports:
        print(r.render(), end="\n\n", flush=True)
    ok = all(r.ok for r in reports)
    print(f"{a.suite}: {'PASS' if ok else 'FAIL'} ({len(reports)} comparisons, {time.perf_counter() - t0:.0f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
