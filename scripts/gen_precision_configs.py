"""Write configs/precision/w{W}a{A}.yaml for every W, A in 1..8 or 32 (81 files; 32 = not quantized).

Run from the repository root: ``python scripts/gen_precision_configs.py`` (``--check`` exits 1 when the
committed files differ from what this script writes; tests/test_precision.py checks the same). Each file's
``name`` is an interpolation of its own bits, so the name in run directories, W&B tags and records follows
``precision.w_bits`` / ``precision.a_bits`` when those are overridden one by one.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

BITS = (*range(1, 9), 32)
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "precision"


def name(w_bits: int, a_bits: int) -> str:
    return f"w{w_bits}a{a_bits}"


def _describe(bits: int, what: str) -> str:
    return f"full-precision {what}" if bits == 32 else f"{bits}-bit {what}"


def config_text(w_bits: int, a_bits: int) -> str:
    if w_bits == 32 and a_bits == 32:
        what = "full precision (32 = not quantized)"
    else:
        what = f"{_describe(w_bits, 'weights')}, {_describe(a_bits, 'activations')}"
    return (
        f"# {what}; written by scripts/gen_precision_configs.py\n"
        "name: w${.w_bits}a${.a_bits}   # follows the bits (precision.w_bits=4 precision.a_bits=8 -> w4a8)\n"
        f"w_bits: {w_bits}\n"
        f"a_bits: {a_bits}\n"
    )


def expected() -> dict[str, str]:
    """File name -> contents for every combination."""
    return {f"{name(w, a)}.yaml": config_text(w, a) for w in BITS for a in BITS}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=CONFIG_DIR, help="folder to write (default configs/precision)")
    p.add_argument("--check", action="store_true", help="only compare; exit 1 on any difference")
    args = p.parse_args(argv)
    want = expected()
    have = {f.name: f.read_text() for f in args.out.glob("*.yaml")} if args.out.is_dir() else {}
    if args.check:
        wrong = sorted(n for n in want.keys() | have.keys() if want.get(n) != have.get(n))
        for n in wrong:
            print(f"{args.out / n}: {'missing' if n not in have else 'extra' if n not in want else 'differs'}")
        return 1 if wrong else 0
    args.out.mkdir(parents=True, exist_ok=True)
    for n in sorted(have.keys() - want.keys()):
        (args.out / n).unlink()
    for n, text in want.items():
        (args.out / n).write_text(text)
    print(f"wrote {len(want)} files under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
