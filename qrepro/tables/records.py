"""Local run records (``record.json``) and how they are matched to table cells.

The matching rule is in docs/results_section.md ("Where the numbers come from"). Beyond it: the keys that keep the
recipe but change its numbers slightly (``qrepro.config.SAME_CELL_KEYS``, e.g. ``trainer.accumulate``) are ignored
too (such a run counts as the cell, and its table marks it: :meth:`Record.same_cell_notes`), and ``init_from=null``
is kept (the trainer records it on a chained cell trained from scratch).
"""

from __future__ import annotations

import functools
import json
import os
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser

from qrepro.config import NON_SEMANTIC_KEYS, SAME_CELL_KEYS
from qrepro.tables.schema import Cell

DEFAULT_RUN_ROOTS = ("runs", "results/records")
# Keys ignored when matching a record to a cell: the trainer's non-semantic keys (paths, device, logging, ...;
# also left out of the run directory name), the seed, and every key starting with a prefix.
IGNORED_EXACT = frozenset(NON_SEMANTIC_KEYS) | {"seed", "dataset.root", "init_from", "resume", "trainer.device"}
IGNORED_PREFIX = ("logger", "hydra")
# Directories never holding a record (pruned from the walk to keep it fast over big run trees).
_PRUNE = {"checkpoints", "wandb", ".hydra", "__pycache__", ".git"}


def _ignored(key: str, keep_seed: bool, keep_same_cell: bool = False) -> bool:
    if keep_seed and key == "seed":
        return False
    if key in SAME_CELL_KEYS:
        return not keep_same_cell
    return key in IGNORED_EXACT or key.startswith(IGNORED_PREFIX)


@functools.lru_cache(maxsize=1)
def _parser() -> Any:
    return OverridesParser.create()


@functools.lru_cache(maxsize=4096)
def _parse_one(text: str) -> tuple[str, str, str]:
    """``'+a.b=1e-4'`` -> ``('set', 'a.b', '0.0001')`` using Hydra's own override grammar."""
    try:
        (ov,) = _parser().parse_overrides([text])
        kind = "del" if ov.type.name == "DEL" else "set"
        key = ov.key_or_group if ov.package is None else f"{ov.key_or_group}@{ov.package}"
        value = None if kind == "del" else ov.value()
        return kind, key, json.dumps(value, sort_keys=True, default=str)
    except Exception:  # not valid Hydra syntax: compare as plain text
        kind = "del" if text.startswith("~") else "set"
        key, _, value = text.lstrip("+~").partition("=")
        return kind, key.strip(), json.dumps(value.strip())


def canonical_overrides(
    overrides: Iterable[str] | None, *, keep_seed: bool = False, keep_same_cell: bool = False
) -> frozenset:
    """The set of assignments that identify *what* a run trains (see module docstring); ``keep_same_cell``: with
    the ``SAME_CELL_KEYS`` (which tell two runs of one cell apart)."""
    out = set()
    for text in overrides or ():
        kind, key, value = _parse_one(str(text).strip())
        if not _ignored(key, keep_seed, keep_same_cell) or (key, value) == ("init_from", "null"):
            out.add((kind, key, value))  # init_from=null: a chained cell trained from scratch, not the chained run
    return frozenset(out)


def override_key(text: str) -> str:
    """The key an override assigns (``'++logger.group=x'`` -> ``'logger.group'``)."""
    return _parse_one(text)[1]


def override_value(text: str) -> Any:
    """The value an override assigns, as Hydra parses it (``'seed=3'`` -> ``3``)."""
    return json.loads(_parse_one(text)[2])


@dataclass(frozen=True)
class Record:
    """One run's ``record.json`` (see docs/architecture.md, "Checkpoints and records")."""

    path: Path
    data: dict[str, Any]
    root: Path | None = None  # the search root it was found under

    @property
    def complete(self) -> bool:
        return self.data.get("complete") is True

    @property
    def diverged(self) -> bool:
        """The trainer stopped the run on a non-finite loss (``status: diverged``)."""
        return not self.complete and self.data.get("status") == "diverged"

    @property
    def experiment(self) -> str | None:
        return self.data.get("experiment")

    @property
    def num_classes(self) -> int | None:
        """``config.dataset.num_classes`` (None when the record does not say)."""
        n = ((self.data.get("config") or {}).get("dataset") or {}).get("num_classes")
        return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None

    @property
    def seed(self) -> Any:
        return self.data.get("seed")

    @property
    def run_dir(self) -> Path:
        """The run directory (the record's own folder: robust to runs moved or copied elsewhere)."""
        return self.path.parent

    def checkpoint_dir(self) -> Path | None:
        """The run directory that still holds ``checkpoints/last.pt`` (the record's folder, else the
        ``run_dir`` it names), or None: committed copies under ``results/records`` carry no checkpoint."""
        for d in (self.run_dir, Path(str(self.data.get("run_dir") or ""))):
            if str(d) not in ("", ".") and (d / "checkpoints" / "last.pt").is_file():
                return d
        return None

    def canonical(self, *, keep_seed: bool = False, keep_same_cell: bool = False) -> frozenset:
        return canonical_overrides(self.data.get("overrides"), keep_seed=keep_seed, keep_same_cell=keep_same_cell)

    def same_cell_notes(self) -> list[str]:
        """The table notes of this run's ``SAME_CELL_KEYS`` (e.g. gradient accumulation): what sets it apart from a
        run of the cell's recipe as written (empty for such a run)."""
        batch = ((self.data.get("config") or {}).get("trainer") or {}).get("batch_size", "B")
        notes = []
        for kind, key, value in sorted(self.canonical(keep_same_cell=True) - self.canonical()):
            v = json.loads(value)
            if kind == "set" and v != SAME_CELL_KEYS[key].default:
                notes.append(SAME_CELL_KEYS[key].note.format(value=v, batch=batch))
        return notes

    def metric(self, select: str, metric: str) -> float | None:
        """``metrics[f"{select}_{metric}"]`` (e.g. best_top1), or None when absent."""
        value = (self.data.get("metrics") or {}).get(f"{select}_{metric}")
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    def curve(self, key: str) -> list[float] | None:
        values = (self.data.get("curves") or {}).get(key)
        return list(values) if isinstance(values, list) and values else None

    def curve_keys(self) -> list[str]:
        return sorted((self.data.get("curves") or {}).keys())


def _walk(root: Path) -> Iterable[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _PRUNE)
        if "record.json" in filenames:
            yield Path(dirpath, "record.json")


def load_records(roots: Sequence[str | Path] = DEFAULT_RUN_ROOTS, *, complete_only: bool = True) -> list[Record]:
    """Every ``record.json`` under the roots (missing roots are skipped), sorted by path; with
    ``complete_only=False`` also diverged and unfinished ones.

    The same run found twice (e.g. under ``runs/`` and copied into ``results/records/``) counts once: records
    with equal experiment, overrides and seed are duplicates; the one finished last wins (ties: first root).
    """
    found: dict[tuple, Record] = {}
    for root in roots:
        root = Path(root)
        for path in _walk(root):  # nothing under a missing root
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                print(f"note: skipping unreadable record {path} ({type(exc).__name__})", file=sys.stderr)
                continue
            if not isinstance(data, dict):
                continue
            rec = Record(path, data, root)
            if complete_only and not rec.complete:
                continue
            key = (rec.experiment, rec.canonical(keep_seed=True, keep_same_cell=True), json.dumps(rec.seed))
            prev = found.get(key)
            if prev is None or str(data.get("finished") or "") > str(prev.data.get("finished") or ""):
                found[key] = rec
    return sorted(found.values(), key=lambda r: str(r.path))


def match_cell(cell: Cell, records: Iterable[Record], *, extra_overrides: Sequence[str] = ()) -> list[Record]:
    """The records that belong to ``cell`` (any seed; sorted by seed, then path)."""
    want = canonical_overrides(list(cell.overrides) + list(extra_overrides))
    hits = [r for r in records if r.experiment == cell.experiment and r.canonical() == want]
    return sorted(hits, key=lambda r: (_seed_order(r.seed), str(r.path)))


def _seed_order(seed: Any) -> tuple:
    """Numeric seeds first, in numeric order (2 before 10), then anything else by its text."""
    if isinstance(seed, (int, float)) and not isinstance(seed, bool):
        return (0, seed, "")
    return (1, 0, json.dumps(seed))


OUT_ROOT, LOCAL = "<out_root>", "<local>"
_OUTSIDE = ("/", "../")  # absolute paths and paths that leave the project: specific to one machine
# an absolute path inside free text (a command line, a log line, a markdown cell); not the tail of a word, a
# relative path (a markdown link's ../), a URL ('https://...') or a placeholder ('<out_root>/...'); it ends at
# whitespace, a quote or a bracket
_PATH_IN_TEXT = re.compile(r"(?<![\w.<>/:~-])/[^\s\"'`|;()\[\]{}]+")


def _local(p: str) -> str:
    name = Path(p.rstrip("/")).name
    return f"{LOCAL}/{name}" if name and name != ".." else LOCAL


def portable_str(text: str) -> str:
    """``text`` with every absolute path written ``<local>/<file name>`` (the rule of :func:`portable` for free
    text: command lines, logs, markdown; relative paths, such as a markdown link's ``../``, are kept)."""
    return _PATH_IN_TEXT.sub(lambda m: _local(m.group(0)), text)


def portable(data: Any) -> Any:
    """A record without the machine's absolute paths, for committing: a path under the run's output root
    (``run_dir`` minus ``<name>/...``) becomes ``<out_root>/<rest>`` and any other absolute path or path
    leaving the project (``../``) ``<local>/<file name>``, wherever it appears (also in ``key=path`` strings and
    inside text such as a command line). Records, benchmark and wall-time files and logs go through it on their
    way into ``results/``; a run directory keeps its absolute paths (resume, chains and tables read them there).
    Everything else, hashes included (``init_from_sha256`` names the checkpoint's content), is kept."""
    info = data if isinstance(data, dict) else {}
    run_dir, name = str(info.get("run_dir") or ""), str(info.get("name") or "")
    base = run_dir[: run_dir.rindex(f"/{name}/")] if run_dir.startswith("/") and f"/{name}/" in run_dir else None

    def path(p: str) -> str:
        if base and (p == base or p.startswith(base + "/")):
            return OUT_ROOT + p[len(base) :]
        return _local(p)

    def fix(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: fix(x) for k, x in v.items()}
        if isinstance(v, list):
            return [fix(x) for x in v]
        if isinstance(v, str) and v.startswith(_OUTSIDE):
            return path(v)
        if isinstance(v, str) and "=" in v and " " not in v and v.partition("=")[2].lstrip("\"'").startswith(_OUTSIDE):
            key, _, value = v.partition("=")
            return f"{key}={path(value.strip(chr(34) + chr(39)))}"
        if isinstance(v, str):
            return _PATH_IN_TEXT.sub(lambda m: path(m.group(0)), v)  # a path inside text: a command, a note
        return v

    return fix(data)


def portable_text(data: Any) -> str:
    """The JSON text of :func:`portable` (the layout the trainer writes: indent 1, a final newline)."""
    return json.dumps(portable(data), indent=1) + "\n"


def collect(records: Iterable[Record], dest: str | Path) -> list[Path]:
    """Copy records (``record.json`` only, no checkpoints) under ``dest``, keeping their path below their
    search root, so the runs behind a table can be committed (``results/records``); the copies hold no
    absolute path of this machine (:func:`portable`). Returns the new files."""
    dest = Path(dest)
    written = []
    for rec in records:
        if rec.root is None or rec.path.resolve().is_relative_to(dest.resolve()):
            continue  # already there
        target = dest / rec.path.relative_to(rec.root)
        text = portable_text(rec.data)
        if target.is_file() and target.read_text(encoding="utf-8") == text:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
        written.append(target)
    return written
