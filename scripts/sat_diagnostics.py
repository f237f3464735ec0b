"""SAT weight-statistics diagnostics (SAT paper Fig. 2a and supplement Fig. S3), CPU, a few seconds.

- Fig. 2a: VAR[W^] / VAR[W] of the clamped weight W^ = tanh(W)/max|tanh(W)| against the number of neurons n,
  for an n x n weight matrix W ~ N(0, 1/n) (variance proportional to 1/n as in the paper).
- Fig. S3: std[Q] / std[W^] of the quantized weight Q (Eq. 9) against the bit-width, for 3x3 conv weights
  with c input and c output channels, Kaiming-normal initialised (std = sqrt(2 / (9 c))).
- kappa0 (Eq. S7/S17a, the logit-scale number of ETR I) and the median kappa1 (Eq. S17b) at initialisation for
  the SAT experiments' models (the authors' networks, qrepro/models/sat_nets.py, and PreResNet-50): vanilla
  (quantizer=fp), clamped (dorefa, w32) and SAT (clamped + Eq. 10 rescaling of the last FC, VAR as the authors'
  torch.std, the method's default), cf. the supplement's Table 1 (kappa0 vanilla vs clamp).
The figures' and kappa's VAR is the mean of squares, as the paper defines it. Writes PNG figures and
``sat_diagnostics.json``.

    python scripts/sat_diagnostics.py --out results/sat
"""

from __future__ import annotations

import argparse
import json
import math
import platform
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from qrepro.quant.sat import WEIGHT_SCHEMES, clamp_weight, dorefa_weight, mean_square  # noqa: E402


def variance_ratio_vs_neurons(ns: list[int], seeds: int) -> dict[int, list[float]]:
    out = {}
    for n in ns:
        vals = []
        for s in range(seeds):
            g = torch.Generator().manual_seed(s)
            w = torch.randn(n, n, generator=g) / math.sqrt(n)
            vals.append(float(mean_square(clamp_weight(w)) / mean_square(w)))
        out[n] = vals
    return out


def std_ratio_vs_bits(channels: list[int], bits: list[int], seed: int) -> dict[str, dict[int, list[float]]]:
    out: dict[str, dict[int, list[float]]] = {s: {} for s in WEIGHT_SCHEMES}
    for c in channels:
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(c, c, 3, 3, generator=g) * math.sqrt(2.0 / (9 * c))
        sd_clamped = float(mean_square(clamp_weight(w)).sqrt())
        for scheme in WEIGHT_SCHEMES:
            out[scheme][c] = [float(mean_square(dorefa_weight(w, b, scheme)).sqrt()) / sd_clamped for b in bits]
    return out


def kappas_at_init(seed: int) -> dict[str, dict[str, dict[str, float]]]:
    from qrepro.models import build_model
    from qrepro.quant import build_method, prepare
    from qrepro.quant.methods.sat import sat_kappas

    cases = [
        ("sat_mobilenet_v1", 1000, 224),
        ("sat_mobilenet_v2", 1000, 224),
        ("preresnet50", 1000, 224),
        ("sat_resnet20", 10, 32),
        ("sat_mobilenet_v2_cifar", 10, 32),
    ]
    out: dict[str, dict[str, dict[str, float]]] = {}
    for model, classes, size in cases:
        out[model] = {}
        for label, method in (("vanilla", "fp"), ("clamp", "dorefa"), ("sat", "sat")):
            torch.manual_seed(seed)
            m = prepare(build_model(model, num_classes=classes), build_method(method, 32, 32)).train()
            g = torch.Generator().manual_seed(seed)
            x = torch.randint(0, 256, (2, 3, size, size), generator=g).float()  # uint8 pixels, as SAT
            y = torch.randint(0, classes, (2,), generator=g)
            k = sat_kappas(m, x, y)
            out[model][label] = {"kappa0": k["sat_kappa0"], "kappa1_median": k["sat_kappa1_median"]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/sat")
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)

    ns = [2**k for k in range(3, 13)]  # 8 .. 4096
    vr = variance_ratio_vs_neurons(ns, args.seeds)
    channels, bits = [16, 64, 256, 1024], list(range(1, 9))
    sr = std_ratio_vs_bits(channels, bits, seed=0)

    ka = kappas_at_init(seed=0)

    fig, ax = plt.subplots(figsize=(4.5, 3.4))
    means = [sum(v) / len(v) for v in vr.values()]
    ax.loglog(ns, means, "o-", color="C3")
    for n, v in vr.items():
        ax.plot([n] * len(v), v, ".", color="C3", alpha=0.4)
    ax.set_xlabel("number of neurons n  (W ~ N(0, 1/n), n x n)")
    ax.set_ylabel("VAR[clamped W] / VAR[W]")
    ax.set_title("SAT Fig. 2a: variance ratio after clamping")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "fig2a_variance_ratio.png", dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4), sharey=True)
    for ax, scheme in zip(axes, WEIGHT_SCHEMES):
        for c in channels:
            ax.plot(bits, sr[scheme][c], "o-", label=f"c = {c}")
        ax.axhline(1.0, color="k", lw=0.6)
        ax.set_xlabel("bit-width b")
        ax.set_title(f"scheme = {scheme}" + (" (paper)" if scheme == "original" else ""))
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("std[Q] / std[clamped W]")
    axes[0].legend()
    fig.suptitle("SAT Fig. S3: effect of weight quantization on the effective-weight scale (3x3 conv, c->c)")
    fig.tight_layout()
    fig.savefig(out / "figS3_std_ratio.png", dpi=120)
    plt.close(fig)

    record = {
        "script": "scripts/sat_diagnostics.py",
        "command": f"python scripts/sat_diagnostics.py --out {args.out} --seeds {args.seeds}",
        "device": f"cpu ({platform.machine()}), torch {torch.__version__}, float32",
        "fig2a": {
            "setup": "W ~ N(0, 1/n), shape n x n; ratio = mean(W^2 clamped) / mean(W^2)",
            "n": ns,
            "ratio_per_seed": {str(n): v for n, v in vr.items()},
            "ratio_mean": dict(zip(map(str, ns), means)),
        },
        "figS3": {
            "setup": "W ~ N(0, 2/(9c)), shape c x c x 3 x 3; ratio = rms(Q) / rms(clamped W)",
            "bits": bits,
            "ratio": {s: {str(c): v for c, v in d.items()} for s, d in sr.items()},
        },
        "kappa_at_init": {
            "setup": "models at their default init, train mode, batch of 2 random uint8 images; w32a32; "
            "vanilla = quantizer=fp, clamp = dorefa (clamped, no rescale), sat = clamped + Eq. 10 on the last FC "
            "(variance: sample, the authors' torch.std)",
            "values": ka,
        },
    }
    (out / "sat_diagnostics.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({"fig2a_mean": record["fig2a"]["ratio_mean"], "kappa_at_init": ka}, indent=1))


if __name__ == "__main__":
    main()
