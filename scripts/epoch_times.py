"""Per-epoch time and the projected 200-epoch wall time of finished runs, from their record.json files.

    python scripts/epoch_times.py runs/_gpu_epochs --out results/bench/<device>-epochs [--epochs 200]

For each record under the folder: epoch 1 (includes torch.compile and CUDA-graph capture), the median of the
later epochs (training + evaluation, the record's ``curves.epoch_s``), the training images/s of the later
epochs, and ``T(E) = epoch_1 + (E - 1) * median later epoch`` for E = ``--epochs``. Writes <out>.md / <out>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from qrepro.tables.records import portable, portable_str


def summarize(rec: dict, epochs: int) -> dict:
    c = rec.get("curves", {})
    ep = c.get("epoch_s") or []
    ips = c.get("images_per_s") or []
    if len(ep) < 2:
        raise SystemExit(
            f"error: {rec.get('run_dir')}: needs >= 2 epochs with curves.epoch_s; re-run with trainer.epochs=3"
        )
    later = statistics.median(ep[1:])
    return {
        "run": rec.get("experiment") or rec.get("name"),
        "run_dir": rec.get("run_dir"),
        "device": rec.get("device"),
        "model": rec.get("config", {}).get("model", {}).get("name"),
        "quantizer": rec.get("config", {}).get("quantizer", {}).get("name"),
        "precision": rec.get("config", {}).get("precision", {}).get("name"),
        "compile": rec.get("config", {}).get("trainer", {}).get("compile"),
        "epoch1_s": ep[0],
        "epoch_s": later,
        "train_images_per_s": statistics.median(ips[1:]) if len(ips) > 1 else None,
        "epochs": epochs,
        "projected_s": ep[0] + (epochs - 1) * later,
        "best_top1": rec.get("metrics", {}).get("best_top1"),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder")
    p.add_argument("--out", required=True, help="output path without suffix")
    p.add_argument("--epochs", type=int, default=200)
    a = p.parse_args(argv)
    recs = sorted(Path(a.folder).rglob("record.json"))
    if not recs:
        raise SystemExit(f"error: no record.json under {a.folder}")
    rows = [summarize(portable(json.loads(r.read_text())), a.epochs) for r in recs]  # no machine paths
    lines = [
        f"# Epoch times ({rows[0]['device']})",
        "",
        f"Records under `{portable_str(a.folder)}`; later epochs = median of epochs 2.. (training + evaluation); "
        f"projected = epoch 1 + {a.epochs - 1} x later epoch.",
        "",
        f"| model | quantizer | bits | compile | epoch 1 s | later epoch s | train img/s | {a.epochs} epochs |",
        "|---|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        ips = "—" if r["train_images_per_s"] is None else f"{r['train_images_per_s']:.0f}"
        lines.append(
            f"| {r['model']} | {r['quantizer']} | {r['precision']} | {r['compile']} | {r['epoch1_s']:.1f} | "
            f"{r['epoch_s']:.1f} | {ips} | {r['projected_s'] / 3600:.2f} h |"
        )
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    print("\n".join(lines))
    print(f"wrote {out}.md / .json", file=sys.stderr)


if __name__ == "__main__":
    main()
