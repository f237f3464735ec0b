"""Transition-rate curves from run records, in the style of the TR paper's Figs. 1c/1d, S1b, S3a/b and S4.

    python scripts/plot_tr.py "runs/tr_resnet20_cifar100_w2a2_sgd*/**/record.json" -o results/figures/tr.png

One column per panel, one line per record (labelled by experiment/optimizer/overrides):
(a) test top-1 accuracy (Fig. 1d, S4a); (b) transition rate: mean k^t per epoch (solid), running TR K^t
(dashed) and, for T-optimizers, target TR R^t (dotted) (Fig. S3a, S5); (c) TALR U^t, or the LR that updates
the latent weights for a plain optimizer (Fig. S3b, S4b); (d) average effective step size mean |Δw_q|
(Fig. 1c, S1b). Curves are per epoch: the record keys ``tr``, ``tr_running``, ``tr_target``, ``talr``,
``tr_step_size`` written by qrepro.optim.tr.TRMonitor.
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
from pathlib import Path


def load(paths: list[str]) -> list[dict]:
    records = []
    for pattern in paths:
        for p in sorted(glob.glob(pattern, recursive=True)) or [pattern]:
            path = Path(p)
            if not path.is_file():
                print(f"error: no record at {p}", file=sys.stderr)
                sys.exit(2)
            rec = json.loads(path.read_text())
            if "tr" not in rec.get("curves", {}):
                print(f"note: {p} has no TR curves (quantizer.monitor_tr was off?); skipped", file=sys.stderr)
                continue
            records.append(rec)
    return records


def labels(records: list[dict]) -> list[str]:
    """Short legend labels: experiment (if they differ), optimizer and the overrides not shared by all."""
    overs = [{o for o in r.get("overrides", []) if not o.startswith("seed=")} for r in records]
    common = set.intersection(*overs) if overs else set()
    exps = {r.get("experiment") or r.get("name") for r in records}
    out = []
    for r, o in zip(records, overs):
        parts = [r.get("experiment") or r.get("name", "?")] if len(exps) > 1 else []
        parts.append(str(r.get("optimizer", "?")))
        parts += sorted(x for x in o - common if not x.startswith("optimizer="))
        seed = r.get("seed")
        out.append(" ".join(parts) + (f" (seed {seed})" if seed not in (None, 0) else ""))
    return out


def plot(records: list[dict], out: Path, log_tr: bool = True) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axs = plt.subplots(2, 2, figsize=(12, 8))
    axes = axs.ravel()
    for i, (rec, lab) in enumerate(zip(records, labels(records))):
        c = rec["curves"]
        color = f"C{i % 10}"
        ep = c.get("epoch", list(range(1, len(c["tr"]) + 1)))
        axes[0].plot(ep, c.get("test_top1", [None] * len(ep)), color=color, label=lab)
        axes[1].plot(ep, c["tr"], color=color)
        if "tr_running" in c:
            axes[1].plot(ep, c["tr_running"], color=color, ls="--")
        if "tr_target" in c:
            axes[1].plot(ep, c["tr_target"], color=color, ls=":")
        if "talr" in c:
            axes[2].plot(ep, c["talr"], color=color)
        if "tr_step_size" in c:
            axes[3].plot(ep, c["tr_step_size"], color=color)
    titles = (
        "(a) test top-1 (%)",
        "(b) transition rate: k (solid), running K (dashed), target R (dotted)",
        "(c) TALR U (T-optimizers) / LR of the latent weights (plain)",
        "(d) average effective step size mean |Δw_q|",
    )
    for ax, t in zip(axes, titles):
        ax.set_title(t, fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    if log_tr:
        for ax in axes[1:]:
            ax.set_yscale("symlog", linthresh=1e-6)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("records", nargs="+", help="record.json paths or glob patterns (quote ** patterns)")
    ap.add_argument("-o", "--out", default="results/figures/tr_curves.png")
    ap.add_argument("--linear", action="store_true", help="linear instead of symlog y axes for TR panels")
    args = ap.parse_args(argv)
    records = load(args.records)
    if not records:
        print("error: no record with TR curves", file=sys.stderr)
        sys.exit(2)
    plot(records, Path(args.out), log_tr=not args.linear)


if __name__ == "__main__":
    main()
