"""Paper-table files (``configs/table/<name>.yaml``): loading and validation.

The schema is the one in docs/architecture.md ("Tables"). Validation turns every mistake a transcriber can
make into a one-line :class:`QreproError` naming the file, the cell and the fix. Unknown extra keys (e.g. a
``note`` or the PTQ helper's ``ptq: {algorithm, from_cell}``) are kept in ``Cell.extra`` and otherwise
ignored.

A row is *runnable* iff its experiment exists as ``configs/experiment/<experiment>.yaml`` (the config root the
table file lives in). A row of the paper that cannot be run here (another paper's method not implemented, a
policy never published, object detection) still names the experiment it would run and carries a one-line
``why:``; it is rendered with the paper's number and the reason, and skipped by plan/run/sweep.
:func:`check_experiments` rejects a row with neither an existing experiment nor a ``why``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from qrepro.config import CONFIG_DIR
from qrepro.errors import QreproError

METRICS = ("top1", "top5", "ap")  # ap: a detection table's average precision (no runnable row yet)
SELECTIONS = ("best", "last")
TABLE_KEYS_REQUIRED = ("name", "paper", "title", "metric", "reported", "tolerance", "cells")
CELL_KEYS_REQUIRED = ("id", "experiment", "model", "dataset", "method", "w_bits", "a_bits", "paper")
CELL_KEYS_KNOWN = CELL_KEYS_REQUIRED + ("overrides", "optimizer", "paper_fp", "fp_cell", "init_from_cell", "why")


@dataclass(frozen=True)
class Cell:
    """One cell (row) of a paper table: the run that reproduces it and the paper's numbers."""

    id: str
    experiment: str
    model: str
    dataset: str
    method: str
    w_bits: int
    a_bits: int
    paper: float | None  # None: the paper prints no number here (a dash, a diverged run)
    overrides: tuple[str, ...] = ()
    optimizer: str | None = None
    paper_fp: float | None = None
    fp_cell: str | None = None
    init_from_cell: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    why: str | None = None  # why the row is not runnable here (only read while its experiment file is missing)
    runnable: bool = True  # False: a paper-only row (a ``why`` and no configs/experiment/<experiment>.yaml)

    @property
    def ptq_from_cell(self) -> str | None:
        """The cell whose checkpoint a post-training-quantization cell starts from (``ptq.from_cell``)."""
        ptq = self.extra.get("ptq")
        return ptq.get("from_cell") if isinstance(ptq, dict) else None

    @property
    def sources(self) -> list[str]:
        """The cells whose checkpoint this one starts from (``init_from_cell``, ``ptq.from_cell``)."""
        return [p for p in (self.init_from_cell, self.ptq_from_cell) if p]

    @property
    def precision(self) -> str:
        """``W4A4``-style label (``W4A32``: activations not quantized; ``FP``: nothing quantized)."""
        return "FP" if self.w_bits >= 32 and self.a_bits >= 32 else f"W{self.w_bits}A{self.a_bits}"


@dataclass(frozen=True)
class Table:
    name: str
    paper: str
    title: str
    metric: str  # top1 | top5
    reported: str  # best | last: what the paper reports
    tolerance: float
    cells: tuple[Cell, ...]
    path: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def cell(self, cell_id: str) -> Cell:
        for c in self.cells:
            if c.id == cell_id:
                return c
        raise QreproError(f"table {self.name!r} has no cell {cell_id!r}; cells: {', '.join(self.ids())}")

    def ids(self) -> list[str]:
        return [c.id for c in self.cells]


def _where(path: Path | None) -> str:
    return str(path) if path is not None else "<table>"


def _number(value: Any, what: str, where: str, *, allow_none: bool) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        hint = " (use null when the paper prints no number)" if allow_none else ""
        raise QreproError(f"{where}: {what} must be a number, got {value!r}{hint}")
    return float(value)


def _bits(value: Any, what: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not (1 <= value <= 32):
        raise QreproError(f"{where}: {what} must be an integer 1..32 (32 = full precision), got {value!r}")
    return value


def _string(value: Any, what: str, where: str, *, allow_none: bool = False) -> str | None:
    if value is None and allow_none:
        return None
    if not isinstance(value, str) or not value.strip():
        raise QreproError(f"{where}: {what} must be a non-empty string, got {value!r}")
    return value


def parse_table(data: Any, path: Path | None = None) -> Table:
    """Validate a loaded table mapping and return a :class:`Table` (raises QreproError on any mistake)."""
    where = _where(path)
    if not isinstance(data, dict):
        raise QreproError(f"{where}: a table file must be a mapping with keys {', '.join(TABLE_KEYS_REQUIRED)}")
    missing = [k for k in TABLE_KEYS_REQUIRED if k not in data]
    if missing:
        raise QreproError(f"{where}: missing table field(s) {', '.join(missing)} (see docs/architecture.md)")
    name = _string(data["name"], "name", where)
    if path is not None and path.stem != name:
        raise QreproError(f"{where}: name {name!r} must equal the file name {path.stem!r}")
    for key, allowed in (("metric", METRICS), ("reported", SELECTIONS)):
        if data[key] not in allowed:
            raise QreproError(f"{where}: {key} must be one of {', '.join(allowed)}, got {data[key]!r}")
    tolerance = _number(data["tolerance"], "tolerance", where, allow_none=False)
    if tolerance < 0:
        raise QreproError(f"{where}: tolerance must be >= 0 points, got {tolerance}")
    raw_cells = data["cells"]
    if not isinstance(raw_cells, list) or not raw_cells:
        raise QreproError(f"{where}: cells must be a non-empty list of cell mappings")

    cells: list[Cell] = []
    seen: set[str] = set()
    configs = _configs_of(path)
    for i, raw in enumerate(derive_sources(raw_cells, configs)):
        cells.append(_parse_cell(raw, i, where, configs))
        if cells[-1].id in seen:
            raise QreproError(f"{where}: duplicate cell id {cells[-1].id!r}; cell ids must be unique")
        seen.add(cells[-1].id)

    for c in cells:
        cw = f"{where}: cell {c.id!r}"
        refs = {"fp_cell": c.fp_cell, "init_from_cell": c.init_from_cell, "ptq.from_cell": c.ptq_from_cell}
        for key, ref in refs.items():
            if ref is None:
                continue
            if ref not in seen:
                raise QreproError(
                    f"{cw}: {key} {ref!r} points to no cell of this table (ids: {', '.join(sorted(seen))})"
                )
            if ref == c.id:
                raise QreproError(f"{cw}: {key} points to the cell itself; remove it or name another cell")
    _check_acyclic(cells, where)
    extra = {k: v for k, v in data.items() if k not in TABLE_KEYS_REQUIRED}
    return Table(
        name,
        _string(data["paper"], "paper", where),
        _string(data["title"], "title", where),
        data["metric"],
        data["reported"],
        tolerance,
        tuple(cells),
        path,
        extra,
    )


def experiment_source(experiment: str, configs: str | Path | None = None) -> str | None:
    """The ``init_from_experiment`` an experiment file names (the cell it starts from), or None."""
    try:
        data = yaml.safe_load(experiment_file(experiment, configs).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None
    src = data.get("init_from_experiment") if isinstance(data, dict) else None
    return src if isinstance(src, str) else None


def derive_sources(cells: list, configs: str | Path | None = None) -> list:
    """Cells (raw mappings) with ``init_from_cell`` filled in from their experiment's ``init_from_experiment``
    where a cell leaves the key out: the cell of the table that runs that experiment with the same overrides.
    ``init_from_cell: <id>`` (an ablation's own chain) or ``init_from_cell: null`` (from scratch) is kept."""
    out = []
    for c in cells:
        if isinstance(c, dict) and "init_from_cell" not in c and not c.get("ptq") and c.get("experiment"):
            src = experiment_source(str(c["experiment"]), configs)
            over = list(c.get("overrides") or [])
            hits = [
                d["id"]
                for d in cells
                if isinstance(d, dict) and d.get("experiment") == src and list(d.get("overrides") or []) == over
            ]
            if src and len(hits) == 1:
                c = {**c, "init_from_cell": hits[0]}
        out.append(c)
    return out


def _configs_of(path: Path | None) -> Path | None:
    """The config root a table file lives in (``<root>/table/<name>.yaml``), else None (the default root)."""
    if path is not None and path.parent.name == "table" and (path.parent.parent / "experiment").is_dir():
        return path.parent.parent
    return None


def experiment_file(experiment: str, configs: str | Path | None = None) -> Path:
    """``<configs>/experiment/<experiment>.yaml`` (``configs``: the default config root when None)."""
    return Path(configs or default_configs(), "experiment", f"{experiment}.yaml")


def _parse_cell(raw: Any, index: int, where: str, configs: str | Path | None = None) -> Cell:
    if not isinstance(raw, dict):
        raise QreproError(f"{where}: cell #{index} must be a mapping, got {type(raw).__name__}")
    cid = raw.get("id")
    cw = f"{where}: cell {cid!r}" if isinstance(cid, str) else f"{where}: cell #{index}"
    missing = [k for k in CELL_KEYS_REQUIRED if k not in raw]
    if missing:
        raise QreproError(f"{cw}: missing field(s) {', '.join(missing)} (paper: null when the paper has no number)")
    overrides = raw.get("overrides") or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) and "=" in o for o in overrides):
        raise QreproError(f"{cw}: overrides must be a list of 'key=value' strings, got {overrides!r}")
    ptq = raw.get("ptq")
    if ptq is not None and not (isinstance(ptq, dict) and isinstance(ptq.get("from_cell", ""), str)):
        raise QreproError(f"{cw}: ptq must be a mapping like {{algorithm: aciq, from_cell: <cell id>}}")
    experiment = _string(raw["experiment"], "experiment", cw)
    why = _string(raw.get("why"), "why", cw, allow_none=True)
    if why is not None and "\n" in why.strip():
        raise QreproError(f"{cw}: why must be one line (why the row is not runnable here), got {why!r}")
    return Cell(
        id=_string(cid, "id", cw),
        experiment=experiment,
        **{k: _string(raw[k], k, cw) for k in ("model", "dataset", "method")},
        **{k: _bits(raw[k], k, cw) for k in ("w_bits", "a_bits")},
        paper=_number(raw["paper"], "paper", cw, allow_none=True),
        overrides=tuple(o.strip() for o in overrides),
        optimizer=_string(raw.get("optimizer"), "optimizer", cw, allow_none=True),
        paper_fp=_number(raw.get("paper_fp"), "paper_fp", cw, allow_none=True),
        **{k: _string(raw.get(k), k, cw, allow_none=True) for k in ("fp_cell", "init_from_cell")},
        extra={k: v for k, v in raw.items() if k not in CELL_KEYS_KNOWN},
        why=why.strip() if why else None,
        # a row without a why is taken as runnable (check_experiments reports a missing experiment file)
        runnable=why is None or experiment_file(experiment, configs).is_file(),
    )


def _check_acyclic(cells: list[Cell], where: str) -> None:
    """init_from_cell / ptq.from_cell chains must end (a cycle could never be run)."""
    parents = {c.id: c.sources for c in cells}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(cid: str, path: list[str]) -> None:
        if state.get(cid) == 2:
            return
        if state.get(cid) == 1:
            cycle = " -> ".join(path[path.index(cid) :] + [cid])
            raise QreproError(f"{where}: init_from_cell chain is a cycle ({cycle}); one cell must start from scratch")
        state[cid] = 1
        for p in parents[cid]:
            visit(p, path + [cid])
        state[cid] = 2

    for c in cells:
        visit(c.id, [])


def load_table(path: str | Path) -> Table:
    """Load and validate one table YAML (plain OmegaConf load, no Hydra composition)."""
    path = Path(path)
    if not path.is_file():
        raise QreproError(f"table file {path} not found; list the tables with: ls configs/table/")
    try:
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except QreproError:
        raise
    except Exception as exc:  # yaml syntax, bad interpolation
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise QreproError(f"{path}: cannot parse the table YAML ({first})") from None
    return parse_table(data, path)


def default_configs() -> str:
    """The config root the table commands default to: ``configs`` in the working directory when it holds tables (a
    checkout; links in rendered tables stay relative), else the configs qrepro runs with (an installed package)."""
    return "configs" if Path("configs", "table").is_dir() else CONFIG_DIR


def table_paths(configs: str | Path = "configs") -> list[Path]:
    """Every ``configs/table/*.yaml``, sorted by name."""
    return sorted(Path(configs, "table").glob("*.yaml"))


def resolve_table(name_or_path: str, configs: str | Path = "configs") -> Path:
    """A table name (``sat_table1``) or a path to a YAML file -> the file path."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return p
    candidate = Path(configs, "table", f"{name_or_path}.yaml")
    if candidate.is_file():
        return candidate
    known = ", ".join(t.stem for t in table_paths(configs)) or "none yet"
    raise QreproError(f"unknown table {name_or_path!r}; known tables in {Path(configs, 'table')}: {known}")


def check_experiments(table: Table, configs: str | Path = "configs") -> None:
    """Every row is runnable (its experiment exists as ``configs/experiment/<experiment>.yaml``) or says ``why`` it
    is not; a runnable row never starts from a row that is not runnable."""
    runnable = {c.id: experiment_file(c.experiment, configs).is_file() for c in table.cells}
    for c in table.cells:
        exp = experiment_file(c.experiment, configs)
        if not runnable[c.id] and c.why is None:
            raise QreproError(
                f"{_where(table.path)}: cell {c.id!r}: experiment {c.experiment!r} has no file {exp}; add it, "
                "fix the name, or give the row a one-line why: saying why it is not runnable here"
            )
        for src in c.sources:
            if runnable[c.id] and not runnable[src]:
                raise QreproError(
                    f"{_where(table.path)}: cell {c.id!r} is runnable but starts from {src!r}, which is not "
                    f"({table.cell(src).why or 'no experiment file'}); add {src}'s experiment or drop the chain"
                )
