"""The main job on a dataset that needs no download (sklearn digits), end to end on CPU:

1. train a small CNN in full precision;
2. train quantized models initialised from it (one per demo experiment that exists);
3. print the accuracies, the records and the learning-curve plot.

Run with ``make demo`` (or ``python scripts/demo.py``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qrepro.cli import CONFIG_DIR, one_line_errors  # noqa: E402
from qrepro.train import compose, train  # noqa: E402

QUANT_STAGES = ["demo_digits_sat_w4a4", "demo_digits_apot_w4a4"]  # run those whose config exists


def run(exp: str, extra: list[str]) -> Path:
    cfg = compose([f"+experiment={exp}", *extra])
    run_dir = ROOT / "runs" / "demo" / exp
    print(f"\n=== {exp} ===", flush=True)
    return train(cfg, run_dir=run_dir, experiment=exp, overrides=[]).record_path


def plot(records: dict[str, Path], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    fp_epochs = 0
    for name, p in records.items():
        c = json.loads(p.read_text())["curves"]
        ep = [e + (0 if name == "fp" else fp_epochs) for e in c["epoch"]]
        ax.plot(ep, c["test_top1"], marker=".", label=name)
        if name == "fp":
            fp_epochs = ep[-1]
    ax.set_xlabel("epoch (each quantized stage starts from the final FP model)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title("qrepro demo on sklearn digits")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)


@one_line_errors
def main() -> None:
    extra = ["logger=none"] if "--no-wandb" in sys.argv else []
    records = {"fp": run("demo_digits_fp", extra)}
    fp_ckpt = records["fp"].parent / "checkpoints" / "last.pt"
    for exp in QUANT_STAGES:
        if (Path(CONFIG_DIR) / "experiment" / f"{exp}.yaml").exists():
            records[exp.removeprefix("demo_digits_")] = run(exp, [*extra, f"init_from={fp_ckpt}"])
    out = ROOT / "runs" / "demo" / "learning_curves.png"
    plot(records, out)
    print("\n=== summary (sklearn digits, 359 test images) ===")
    for name, p in records.items():
        m = json.loads(p.read_text())["metrics"]
        print(f"{name:>10}: best top-1 {m['best_top1']:.2f}%  last top-1 {m['last_top1']:.2f}%   record: {p}")
    print(f"learning curves: {out}")


if __name__ == "__main__":
    main()
