"""Figures regenerated with the tables (matplotlib Agg, PNG), from local records only: learning curves, the
transition-rate and SAT variance diagnostics, accuracy vs bits and vs any swept numeric override, each skipped with a
note when no record has its data (docs/results_section.md, "Figures")."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from qrepro.tables.compare import Row
from qrepro.tables.schema import Table

TR_KEYS = ("tr", "tr_running", "tr_target", "talr", "tr_step_size")
PNG_META = {"Software": None}  # no library version in the file: identical bytes across environments
FP_STYLE = {"color": "black", "linestyle": "--"}


def _plt():
    import matplotlib  # imported here: slow to import, and only the figures need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _mean_curve(row: Row, key: str) -> tuple[list[float], list[float], list[float], list[float]] | None:
    """(epochs, mean, min, max) over the row's seeds, truncated to the shortest curve; None without data."""
    curves = [[float(v) for v in c if v is not None] for c in (r.curve(key) for r in row.records) if c]
    curves = [c for c in curves if c]
    if not curves:
        return None
    n = min(len(c) for c in curves)
    epochs = row.records[0].curve("epoch") if row.records else None
    xs = [float(e) for e in epochs[:n]] if epochs and len(epochs) >= n else [float(i + 1) for i in range(n)]
    cols = [[c[i] for c in curves] for i in range(n)]
    return xs, [sum(v) / len(v) for v in cols], [min(v) for v in cols], [max(v) for v in cols]


def _save(plt, fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    fig.savefig(path, dpi=110, metadata=PNG_META)
    plt.close(fig)
    return path


def _curve_figure(table: Table, panels: dict, path: Path, ylabel: str | None = None, log: bool = False) -> Path:
    """One panel per ``{title: [(curve data, label, line style), ...]}``, against the epoch: the mean over seeds,
    their min-max as a band; up to three panels a row."""
    plt = _plt()
    ncols = min(3, len(panels))
    nrows = (len(panels) + ncols - 1) // ncols
    fig, grid = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.2 * nrows), squeeze=False)
    axes = [ax for grid_row in grid for ax in grid_row]
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    for ax, (title, lines) in zip(axes, panels.items()):
        for (xs, mean, lo, hi), label, style in lines:
            (drawn,) = ax.plot(xs, mean, label=label, **style)
            if lo != hi:
                ax.fill_between(xs, lo, hi, color=drawn.get_color(), alpha=0.2, linewidth=0)
        ax.set_title(f"{table.name}: {title}", fontsize=9)
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        if ylabel:
            ax.set_ylabel(ylabel)
        if log and all(v > 0 for data, _, _ in lines for v in data[1]):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(plt, fig, path)


def learning_curves(table: Table, rows: Sequence[Row], out: Path) -> tuple[list[Path], str | None]:
    key = f"test_{table.metric}"
    groups: dict[str, list] = {}  # one panel per FP cell: the FP curve and the cells compared with it
    for r in rows:
        if (data := _mean_curve(r, key)) is not None:
            groups.setdefault(r.cell.fp_cell or r.cell.id, []).append((r, data))
    if not groups:
        return [], f"{table.name}: no record has a '{key}' curve — skipped the learning-curve figure"
    panels = {}
    for gid, ms in groups.items():  # the FP cell first, dashed black
        ms.sort(key=lambda p: p[0].cell.id != gid)
        style = [FP_STYLE if m.cell.id == gid and len(ms) > 1 else {} for m, _ in ms]
        panels[gid] = [(d, f"{m.cell.id} ({m.cell.precision}, n={m.ours.n})", st) for (m, d), st in zip(ms, style)]
    return [_curve_figure(table, panels, out / f"{table.name}_curves.png", f"test {table.metric} (%)")], None


def _keyed_curves(
    table: Table, rows: Sequence[Row], keys: Sequence[str], out: Path, suffix: str, what: str, log: bool = False
) -> tuple[list[Path], str | None]:
    panels = {
        key: [(d, f"{r.cell.id} ({r.cell.precision})", {}) for r in rows if (d := _mean_curve(r, key))] for key in keys
    }
    panels = {k: v for k, v in panels.items() if v}
    if not panels:
        return [], f"{table.name}: no record has {what} curves — skipped the {suffix} figure"
    return [_curve_figure(table, panels, out / f"{table.name}_{suffix}.png", log=log)], None


def tr_curves(table: Table, rows: Sequence[Row], out: Path) -> tuple[list[Path], str | None]:
    return _keyed_curves(table, rows, TR_KEYS, out, "tr", "transition-rate (" + ", ".join(TR_KEYS) + ")")


def kappa_curves(table: Table, rows: Sequence[Row], out: Path) -> tuple[list[Path], str | None]:
    keys = sorted({k for r in rows for rec in r.records for k in rec.curve_keys() if k.startswith("kappa")})
    return _keyed_curves(table, rows, keys, out, "kappa", "SAT variance (kappa0, kappa1*)", log=True)


def _overrides(row: Row) -> dict[str, str]:
    """The cell's overrides as ``{key: value text}`` (Hydra's ``+``/``++`` prefixes dropped)."""
    return dict(o.lstrip("+").partition("=")[::2] for o in row.cell.overrides)


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _label(row: Row, skip: tuple[str, ...], *, precision: bool = False) -> tuple[str, ...]:
    """What identifies a line: model, method, optimizer, PTQ algorithm (unless the method names it), the
    activation bits (or the whole precision), and the other overrides."""
    c = row.cell
    ptq = c.extra.get("ptq")
    alg = str(ptq.get("algorithm", "PTQ")) if isinstance(ptq, dict) else ""
    alg = "" if alg.lower() in c.method.lower() else alg
    act = "W=A" if c.a_bits == c.w_bits else ("A32" if c.a_bits >= 32 else f"A{c.a_bits}")
    act = c.precision if precision else act
    rest = sorted(f"{k}={v}" for k, v in _overrides(row).items() if k not in skip)
    return (c.model, c.method, c.optimizer or "", alg, act, *rest)


def _short_labels(keys: list[tuple[str, ...]]) -> tuple[list[str], str]:
    """Legend labels without the words every series shares; the shared words go to the figure title."""
    words = [[w for w in key if w] for key in keys]
    common = [w for w in words[0] if all(w in ws for ws in words)] if len(words) > 1 else []
    labels = [" ".join(w for w in ws if w not in common) or "ours" for ws in words]
    return labels, " ".join(common)


def _series_figure(table: Table, series: dict, xlabel: str, what: str, path: Path, integer_x: bool) -> Path:
    """Two panels (accuracy, accuracy − FP) against x; ours solid with std error bars, paper dashed and hollow;
    one legend below the panels (colours = series, line style = ours/paper)."""
    from matplotlib.lines import Line2D

    plt = _plt()
    fig, (ax_abs, ax_dfp) = plt.subplots(1, 2, figsize=(11, 4.2 + 0.2 * len(series)), layout="constrained")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    keys = sorted(series)
    labels, common = _short_labels(keys)
    handles = []
    for i, key in enumerate(keys):
        color, pts = colors[i % len(colors)], series[key]
        for ax, ours_of, paper_of in (
            (ax_abs, lambda r: r.ours.mean, lambda r: r.cell.paper),
            (ax_dfp, lambda r: r.ours_dfp, lambda r: r.paper_dfp),
        ):
            ours = [(x, ours_of(r), r.ours.std or 0.0) for x, r in pts if ours_of(r) is not None]
            if ours:
                xs, ys, es = zip(*ours)
                ax.errorbar(xs, ys, yerr=es, color=color, marker="o", capsize=3)
            paper = [(x, paper_of(r)) for x, r in pts if paper_of(r) is not None]
            if paper:
                xs, ys = zip(*paper)
                ax.plot(xs, ys, color=color, linestyle="--", marker="o", markerfacecolor="none")
        handles.append(Line2D([], [], color=color, marker="o", label=labels[i]))
    handles += [
        Line2D([], [], color="black", marker="o", label="ours (mean ± std over seeds)"),
        Line2D([], [], color="black", marker="o", markerfacecolor="none", linestyle="--", label="paper"),
    ]
    for ax, ylabel, title in (
        (ax_abs, f"{table.metric} (%)", f"accuracy vs {what}"),
        (ax_dfp, "quantized − FP (points)", f"robustness: accuracy − FP vs {what}"),
    ):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{table.name}: {title}", fontsize=9)
        ax.grid(alpha=0.3)
        if integer_x:
            ax.xaxis.get_major_locator().set_params(integer=True)
    if common:
        fig.suptitle(common, fontsize=9)
    fig.legend(handles=handles, loc="outside lower center", ncol=2, fontsize=7, frameon=False)
    return _save(plt, fig, path)


def _keep(series: dict) -> dict:
    """Series with two or more x values, at least one of them with our records; points sorted by x."""
    return {
        k: sorted(v, key=lambda p: p[0])
        for k, v in series.items()
        if len({x for x, _ in v}) >= 2 and any(r.ours.n for _, r in v)
    }


def bits_curves(table: Table, rows: Sequence[Row], out: Path) -> tuple[list[Path], str | None]:
    """Accuracy vs weight bits per method (left) and the robustness view, accuracy − FP vs bits (right)."""
    series: dict[tuple[str, ...], list[tuple[float, Row]]] = {}
    for r in rows:
        if r.cell.w_bits < 32:
            series.setdefault(_label(r, ("precision", "ptq.algorithm")), []).append((r.cell.w_bits, r))
    series = _keep(series)
    if not series:
        return [], f"{table.name}: no method has records at two or more bit-widths — skipped the bits figure"
    return [_series_figure(table, series, "weight bits", "bits", out / f"{table.name}_bits.png", True)], None


def sweep_curves(table: Table, rows: Sequence[Row], out: Path) -> tuple[list[Path], str | None]:
    """Accuracy vs any numeric override swept across otherwise identical cells (e.g. ``ptq.weight_step_scale``
    for the SymReg step-size robustness figure); one figure per swept key, ``<name>_sweep_<key>.png``."""
    by_key: dict[str, dict[tuple[str, ...], list[tuple[float, Row]]]] = {}
    for r in rows:
        for key, value in _overrides(r).items():
            x = _number(value)
            if key != "precision" and x is not None:
                line = _label(r, ("precision", "ptq.algorithm", key), precision=True)
                by_key.setdefault(key, {}).setdefault(line, []).append((x, r))
    written = []
    for key, series in sorted(by_key.items()):
        kept = _keep(series)
        if kept:
            written.append(_series_figure(table, kept, key, key, out / f"{table.name}_sweep_{key}.png", False))
    if not written:
        return [], f"{table.name}: no swept numeric override has records — skipped the sweep figure"
    return written, None


FIGURES = {
    "curves": learning_curves,
    "tr": tr_curves,
    "kappa": kappa_curves,
    "bits": bits_curves,
    "sweep": sweep_curves,
}


def make_figures(table: Table, rows: Sequence[Row], out: str | Path) -> tuple[list[Path], list[str]]:
    """Write every figure that has data; returns (written paths, notes about the skipped ones).

    A skipped figure's file from an earlier run is removed, so the folder never shows stale data.
    """
    written, notes = [], []
    for suffix, fn in FIGURES.items():
        paths, note = fn(table, rows, Path(out))
        # remove this figure's files from an earlier run that this run did not rewrite (no stale data)
        pattern = f"{table.name}_{suffix}_*.png" if suffix == "sweep" else f"{table.name}_{suffix}.png"
        for old in sorted(Path(out).glob(pattern)):
            if old not in paths:
                old.unlink()
        written += paths
        if note:
            notes.append(note)
    return written, notes
