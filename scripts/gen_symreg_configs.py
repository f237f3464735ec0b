"""Write configs/table/symreg_*.yaml, configs/recipe/symreg_*.yaml and configs/experiment/symreg_*.yaml
(SymReg/SatNL supplement): one recipe per row (FP pre-training, and QAT where the supplement fine-tunes), each
experiment the recipe plus its method's quantizer.

Run from the repository root: ``python scripts/gen_symreg_configs.py``. The rows below are copied verbatim
from the SymReg/SatNL supplement (Table 2A: top-1 on ImageNet; columns FP, W4/FP, W3/FP, W2/FP, W6A6,
W5A5, W4A4, W3A3; "-" = "PTQ fails to converge, < 1 % top-1"). Keeping the numbers as text here and
generating the YAML avoids transcription slips across ~230 cells.
"""

from __future__ import annotations

from pathlib import Path

TABLE_2A = """
ResNet-18 ACIQ Baseline 70.54 47.44 - - 68.70 64.87 38.46 -
ResNet-18 ACIQ Ours 70.92 69.22 49.06 - 70.02 68.99 66.65 42.95
ResNet-18 ACIQ KURE 69.39 66.69 44.19 - 68.01 66.84 61.80 26.58
ResNet-18 ACIQ Ours+KURE 70.33 69.85 67.59 - 69.23 68.65 67.11 61.07
ResNet-18 AdaQuant Baseline 70.54 69.29 66.18 3.23 70.17 69.55 67.67 57.57
ResNet-18 AdaQuant Ours 70.92 70.36 68.84 48.39 70.75 70.37 69.35 64.04
ResNet-18 AdaQuant KURE 69.39 69.09 68.32 62.21 69.23 68.77 67.77 64.22
ResNet-18 AdaQuant Ours+KURE 70.33 69.96 69.21 63.16 70.11 69.77 69.14 66.06
ResNet-18 QDrop Baseline 70.54 70.15 69.39 66.40 70.27 69.93 68.91 65.75
ResNet-18 QDrop Ours 70.92 70.69 70.06 66.98 70.81 70.57 69.93 67.45
ResNet-18 QDrop KURE 69.39 69.35 69.14 67.60 69.25 69.13 68.30 66.10
ResNet-18 QDrop Ours+KURE 70.33 70.18 69.86 67.77 70.13 69.86 69.38 67.47
MobileNet-V2 ACIQ Baseline 72.22 28.68 - - 69.30 64.20 18.15 -
MobileNet-V2 ACIQ Ours 72.87 70.07 40.79 - 71.07 68.66 58.30 6.25
MobileNet-V2 ACIQ KURE 72.07 54.34 6.43 - 69.77 64.37 39.31 2.14
MobileNet-V2 ACIQ Ours+KURE 72.48 70.30 42.24 - 70.68 68.31 61.51 13.87
MobileNet-V2 AdaQuant Baseline 72.22 70.67 59.80 - 71.52 70.72 63.70 -
MobileNet-V2 AdaQuant Ours 72.87 72.23 69.03 - 72.27 71.76 68.91 18.36
MobileNet-V2 AdaQuant KURE 72.07 71.51 68.71 3.58 71.62 70.71 66.25 4.61
MobileNet-V2 AdaQuant Ours+KURE 72.48 71.93 70.17 10.16 71.90 71.26 68.84 29.27
MobileNet-V2 QDrop Baseline 72.22 71.41 68.32 48.68 71.57 70.64 67.08 50.79
MobileNet-V2 QDrop Ours 72.87 72.44 71.18 61.68 72.61 72.05 69.87 62.55
MobileNet-V2 QDrop KURE 72.07 71.75 70.55 59.51 71.76 70.91 68.23 56.20
MobileNet-V2 QDrop Ours+KURE 72.48 72.13 71.25 63.78 72.15 71.60 70.00 63.30
MobileNet-V3 ACIQ Baseline 74.52 29.65 - - - - - -
MobileNet-V3 ACIQ Ours 74.43 61.95 1.04 - - - - -
MobileNet-V3 ACIQ KURE 73.81 55.15 3.09 - - - - -
MobileNet-V3 ACIQ Ours+KURE 73.84 66.21 5.44 - - - - -
MobileNet-V3 AdaQuant Baseline 74.52 72.92 64.17 - 72.73 68.95 43.88 -
MobileNet-V3 AdaQuant Ours 74.43 73.51 70.50 2.87 72.69 71.02 62.73 -
MobileNet-V3 AdaQuant KURE 73.81 73.11 70.46 7.44 72.63 70.63 59.25 -
MobileNet-V3 AdaQuant Ours+KURE 73.84 73.25 70.91 20.05 72.29 70.32 62.35 1.84
"""

BITS = [(4, 32), (3, 32), (2, 32), (6, 6), (5, 5), (4, 4), (3, 3)]  # the columns after FP
METHODS = {"Baseline": "baseline", "Ours": "ours", "KURE": "kure", "Ours+KURE": "ours_kure"}
ALGS = {"ACIQ": "aciq", "AdaQuant": "adaquant", "QDrop": "qdrop"}
DASH_NOTE = "paper prints '-': PTQ failed to converge (< 1 % top-1)"

# key, model name, dataset, experiment prefix, table title
MODELS = {
    "ResNet-18": ("r18", "resnet18", "imagenet"),
    "MobileNet-V2": ("mbv2", "mobilenet_v2", "imagenet"),
    "MobileNet-V3": ("mbv3", "mobilenet_v3_large", "imagenet"),
}
CIFAR_MODELS = {
    "ResNet-20": ("r20", "resnet20", "cifar10"),
    "MobileNet-V2 (CIFAR)": ("mbv2c", "mobilenet_v2_cifar", "cifar10"),
}


def parse() -> dict[tuple[str, str, str], list[float | None]]:
    rows = {}
    for line in TABLE_2A.strip().splitlines():
        toks = line.split()
        model = toks[0]
        alg, method, vals = toks[1], toks[2], toks[3:]
        assert len(vals) == 8, line
        rows[(model, alg, method)] = [None if v == "-" else float(v) for v in vals]
    return rows


def _num(v: float | None) -> str:
    return "null" if v is None else f"{v:.2f}"


def fp_cell(key: str, model: str, dataset: str, method: str, paper: float | None) -> list[str]:
    m = METHODS[method]
    return [
        f"  - id: {key}_{m}_fp",
        f"    experiment: symreg_{key}_{m}",
        "    overrides: []",
        f"    model: {model}",
        f"    dataset: {dataset}",
        f"    method: {method}",
        "    w_bits: 32",
        "    a_bits: 32",
        f"    paper: {_num(paper)}",
    ]


def ptq_cell(key, model, dataset, alg, method, wb, ab, paper, paper_fp, scale=None) -> list[str]:
    m, a = METHODS[method], ALGS.get(alg, alg)
    extra = f", ptq.weight_step_scale={scale}" if scale is not None else ""
    suffix = f"_x{scale}" if scale is not None else ""
    lines = [
        f"  - id: {key}_{a}_{m}_w{wb}a{ab}{suffix}",
        f"    experiment: symreg_{key}_{m}",
        f"    overrides: [ptq.algorithm={a}, precision=w{wb}a{ab}{extra}]",
        f"    ptq: {{algorithm: {a}, from_cell: {key}_{m}_fp}}",
        f"    model: {model}",
        f"    dataset: {dataset}",
        f"    method: {method} + {alg}",
        f"    w_bits: {wb}",
        f"    a_bits: {ab}",
        f"    paper: {_num(paper)}",
        f"    paper_fp: {_num(paper_fp)}",
        f"    fp_cell: {key}_{m}_fp",
    ]
    if paper is None and paper_fp is not None:
        lines.append(f'    note: "{DASH_NOTE}"')
    return lines


HEADER = """# SymReg/SatNL supplement, {title}. Run: python -m qrepro.run_table {name}
# Generated by scripts/gen_symreg_configs.py from the verbatim transcription of the supplement; edit there.
# FP cells train the FP model (python -m qrepro.train); PTQ cells (key `ptq`) quantize that checkpoint with
# python -m qrepro.ptq +experiment=<experiment> <overrides> init_from=<ptq.from_cell run>/checkpoints/last.pt
# reported: last — PTQ starts from the last FP checkpoint, so the FP column is the last-epoch accuracy.
name: {name}
paper: SymReg/SatNL
title: "{title}"
metric: top1
reported: {reported}
tolerance: {tol}
"""


def write(path: Path, name: str, title: str, cells: list[str], tol: float = 1.0, extra: str = "") -> None:
    text = HEADER.format(name=name, title=title, reported="last", tol=tol) + extra + "cells:\n"
    path.write_text(text + "\n".join(cells) + "\n")


def main() -> None:
    rows = parse()
    out = Path("configs/table")
    out.mkdir(parents=True, exist_ok=True)
    for mname, (key, model, dataset) in MODELS.items():
        cells: list[str] = []
        for method in METHODS:
            fp = next(v[0] for (mo, _, me), v in rows.items() if mo == mname and me == method)
            cells += fp_cell(key, model, dataset, method, fp)
        for alg in ALGS:
            for method in METHODS:
                vals = rows.get((mname.replace(" ", ""), alg, method))
                if vals is None:
                    continue
                assert all(v[0] == vals[0] for (mo, _, me), v in rows.items() if mo == mname and me == method)
                for (wb, ab), v in zip(BITS, vals[1:]):
                    cells += ptq_cell(key, model, dataset, alg, method, wb, ab, v, vals[0])
        name = f"symreg_table2a_{key}"
        algs = "ACIQ / AdaQuant" if key == "mbv3" else "ACIQ / AdaQuant / QDrop"
        title = f"Table 2A: PTQ ({algs}) of {mname} trained as Baseline / Ours / KURE / Ours+KURE, ImageNet"
        write(out / f"{name}.yaml", name, title, cells)
    # CIFAR-10-scale analogue: same grid, no paper numbers (the supplement reports none)
    cells = []
    for key, model, dataset in CIFAR_MODELS.values():
        for method in METHODS:
            cells += fp_cell(key, model, dataset, method, None)
        for alg in ALGS:
            for method in METHODS:
                for wb, ab in BITS:
                    cells += ptq_cell(key, model, dataset, alg, method, wb, ab, None, None)
    title = "CIFAR-10-scale analogue of Table 2A (ResNet-20, MobileNet-V2-CIFAR); the paper gives no numbers"
    write(out / "symreg_table2a_cifar10.yaml", "symreg_table2a_cifar10", title, cells)

    # Figures 4A / 5A: only plotted in the supplement (no numbers in the text): run grids, paper: null.
    # The bit-widths / step scales are our choice; the figure's exact x-axis values are not in the text.
    cells = []
    for key, model, dataset in MODELS.values():
        for method in METHODS:
            cells += fp_cell(key, model, dataset, method, None)
        for alg in ("pot", "kmeans"):
            for method in METHODS:
                for wb in (2, 3, 4, 5, 6):
                    cells += ptq_cell(key, model, dataset, alg, method, wb, 32, None, None)
    title = "Fig. 4A: non-uniform PTQ (log/PoT, k-means) of weights, activations FP (figure only: no numbers)"
    write(out / "symreg_fig4a.yaml", "symreg_fig4a", title, cells)
    cells = []
    for key, model, dataset in MODELS.values():
        for method in METHODS:
            cells += fp_cell(key, model, dataset, method, None)
        for method in METHODS:
            for scale in (0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5):
                cells += ptq_cell(key, model, dataset, "AdaQuant", method, 4, 4, None, None, scale)
    title = "Fig. 5A: W4A4 AdaQuant accuracy when the weight step is rescaled (figure only: no numbers)"
    write(out / "symreg_fig5a.yaml", "symreg_fig5a", title, cells)

    # CPU smoke grid on sklearn digits (minutes): Baseline / Ours x ACIQ / AdaQuant / QDrop x W4A4..W2A2
    cells = []
    for method in ("Baseline", "Ours"):
        cells += fp_cell("digits", "small_cnn", "digits", method, None)
    for alg in ALGS:
        for method in ("Baseline", "Ours"):
            for wb in (4, 3, 2):
                cells += ptq_cell("digits", "small_cnn", "digits", alg, method, wb, wb, None, None)
    for i, line in enumerate(cells):  # short reconstructions on CPU
        if line.startswith("    overrides: [ptq."):
            cells[i] = line[:-1] + ", ptq.iters=200, ptq.calib_size=256]"
    title = "CPU smoke grid of Table 2A on sklearn digits (small_cnn); no paper numbers"
    write(out / "symreg_digits_demo.yaml", "symreg_digits_demo", title, cells)


# ---------------------------------------------------------------------------------------------- experiments
# Table 1A (cosine with warm-up, SGD momentum + EMA + ASAM). Columns: epochs, lr, weight decay, warm-up
# epochs, eta_min, rho. The supplement prints no lr for the MobileNet-V2 rows, no batch size, no EMA decay
# and no momentum value: those are marked ASSUMED below (lr 0.4 as in the other ImageNet rows, batch 1024
# (lr 0.4 = 0.1 x 1024/256), EMA 0.9999, momentum 0.9). eta_min is read as an absolute LR: min_factor =
# eta_min / lr.
RECIPES = {
    # key: (model, dataset, epochs, lr, wd, warmup, eta_min, rho, batch, ema, lr_note, source)
    "r18": ("resnet18", "imagenet", 150, 0.4, 1.0e-5, 5, 1.0e-2, 1.0, 1024, 0.9999, "", "Table 1A"),
    "mbv2": ("mobilenet_v2", "imagenet", 150, 0.4, 1.0e-5, 5, 1.0e-2, 1.0, 1024, 0.9999, "ASSUMED", "Table 1A"),
    "mbv3": ("mobilenet_v3_large", "imagenet", 240, 0.4, 1.0e-5, 5, 1.0e-2, 0.2, 1024, 0.9999, "", "Table 1A"),
    "mbv2c100": ("mobilenet_v2_cifar", "cifar100", 120, 0.1, 5.0e-5, 5, 1.0e-2, 1.0, 128, 0.999, "ASSUMED", "Table 1A"),
    # CIFAR-10-scale analogues (no recipe in the supplement: every value is our choice)
    "r20": ("resnet20", "cifar10", 200, 0.1, 5.0e-4, 5, 1.0e-3, 1.0, 128, 0.999, "OURS", "our choice"),
    "mbv2c": ("mobilenet_v2_cifar", "cifar10", 200, 0.1, 5.0e-5, 5, 1.0e-3, 1.0, 128, 0.999, "OURS", "our choice"),
    # tiny demo for smoke tests (sklearn digits, CPU seconds)
    "digits": ("small_cnn", "digits", 3, 0.05, 5.0e-4, 1, 1.0e-3, 0.05, 64, None, "OURS", "demo"),
}
# method key: (label, quantizer, quantizer overrides)
TRAIN_METHODS = {
    "baseline": ("Baseline", "fp", {}),
    "ours": ("Ours (SatNL + SymReg)", "satnl", {"symreg_coef": 1.0}),
    "kure": ("KURE", "kure", {}),
    "ours_kure": ("Ours + KURE", "satnl", {"symreg_coef": 1.0, "kure_coef": 1.0}),
}


def _yaml_map(d: dict) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in d.items()) + "}"


def _same_recipe(key: str) -> str | None:
    """An earlier row whose recipe differs from ``key``'s only in the model (and the note on its lr), if any."""
    mine = RECIPES[key]
    for other, theirs in RECIPES.items():
        if other == key:
            return None
        if theirs[1:10] == mine[1:10] and theirs[11:] == mine[11:]:
            return other
    return None


def _notes(key: str) -> str:
    _, dataset, *_rest = RECIPES[key]
    lr_note = RECIPES[key][10]
    notes = []
    if lr_note == "ASSUMED":
        notes.append("lr ASSUMED (Table 1A prints none for MobileNet-V2)")
    if lr_note == "OURS":
        notes.append("recipe is our choice (not in the supplement)")
    if dataset == "imagenet" or key == "mbv2c100":
        notes.append("batch size and EMA decay ASSUMED (not in the supplement)")
    return f" [{'; '.join(notes)}]" if notes else ""


def recipe(key: str, qat: bool = False) -> tuple[str, str]:
    """``configs/recipe/symreg_[qat_]<key>.yaml``: the training recipe every method of the row shares (the
    experiments add their quantizer). FP pre-training: Table 1A; QAT (supplement §3): 90 epochs at 1/10 of the
    pre-training LR, otherwise the same, W4A4 by default."""
    model, dataset, epochs, lr, wd, warm, eta_min, rho, batch, ema, _, source = RECIPES[key]
    name = f"symreg_{'qat_' if qat else ''}{key}"
    cells = [f"symreg_{'qat_' if qat else ''}{key}_{m}" for m in (("baseline", "ours") if qat else TRAIN_METHODS)]
    what = "QAT fine-tuning (90 epochs, lr/10, W4A4 by default)" if qat else "FP pre-training for PTQ"
    header = [
        "# @package _global_",
        f"# SymReg/SatNL supplement ({source}), {model} {dataset}: {what}{_notes(key)}.",
        f"# Recipe shared by the cells {', '.join(cells)}: each adds its quantizer in configs/experiment/<cell>.yaml",
    ]
    if qat:
        lines = [
            *header,
            "defaults:",
            f"  - /recipe/symreg_{key}",
            "  - override /quantizer: robust_qat",
            "  - override /precision: w4a4",
            "trainer: {epochs: 90}",
            f"optimizer: {{lr: {lr / 10:g}}}",
        ]
        return name, "\n".join(lines) + "\n"
    same = _same_recipe(key)
    if same is not None:  # the recipe of an earlier row with another model
        lines = [*header, "defaults:", f"  - /recipe/symreg_{same}", f"  - override /model: {model}"]
        return name, "\n".join(lines) + "\n"
    sched = {"warmup_epochs": warm, "warmup_start_factor": 0.0, "min_factor": round(eta_min / lr, 6)}
    lines = [
        *header,
        "defaults:",
        f"  - override /dataset: {dataset}",
        f"  - override /model: {model}",
        "  - override /precision: w32a32",
        "  - override /optimizer: asam_sgd",
        "  - override /scheduler: cosine",
        f"trainer: {_yaml_map({'epochs': epochs, 'batch_size': batch, 'ema': ema if ema else 'null'})}",
        "optimizer:",
        f"  lr: {lr:g}",
        "  momentum: 0.9",
        f"  weight_decay: {wd:.1e}",
        f"  rho: {rho:g}",
        "  groups:",
        "    - {tags: [quant], weight_decay: 0.0}",
        f"scheduler: {_yaml_map(sched)}",
    ]
    return name, "\n".join(lines) + "\n"


def experiment(key: str, method: str, qat: bool = False) -> tuple[str, str]:
    """``configs/experiment/symreg_[qat_]<key>_<method>.yaml``: the row's recipe plus the method's quantizer."""
    model, dataset, *_ = RECIPES[key]
    label, quantizer, qover = TRAIN_METHODS[method]
    name = f"symreg_{'qat_' if qat else ''}{key}_{method}"
    if qat:
        qover = {"satnl": quantizer == "satnl", **qover}
        what = f"QAT fine-tuning of the {label} FP model"
    else:
        what = f"{label} FP pre-training for PTQ"
    lines = [
        "# @package _global_",
        f"# SymReg/SatNL supplement, {model} {dataset}: {what} — python -m qrepro.train +experiment={name}",
        "defaults:",
        f"  - /recipe/symreg_{'qat_' if qat else ''}{key}",
        *([] if qat else [f"  - override /quantizer: {quantizer}"]),
        f"name: {name}",
        *([f"init_from_experiment: symreg_{key}_{method}"] if qat else []),
    ]
    if qover:
        lines.append(
            f"quantizer: {_yaml_map({k: str(v).lower() if isinstance(v, bool) else v for k, v in qover.items()})}"
        )
    return name, "\n".join(lines) + "\n"


QAT_KEYS = ("r18", "mbv2", "mbv3", "r20", "digits")


def write_experiments() -> None:
    out, rec = Path("configs/experiment"), Path("configs/recipe")
    out.mkdir(parents=True, exist_ok=True)
    rec.mkdir(parents=True, exist_ok=True)
    for key in RECIPES:
        for qat in (False, True) if key in QAT_KEYS else (False,):
            name, text = recipe(key, qat)
            (rec / f"{name}.yaml").write_text(text)
        for method in TRAIN_METHODS:
            name, text = experiment(key, method)
            (out / f"{name}.yaml").write_text(text)
        if key in QAT_KEYS:
            for method in ("baseline", "ours"):
                name, text = experiment(key, method, qat=True)
                (out / f"{name}.yaml").write_text(text)


if __name__ == "__main__":
    main()
    write_experiments()
