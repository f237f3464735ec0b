"""Paper tables regenerated from local run records.

Paper value, ours (mean ± std over seeds), differences, tolerance verdicts, links to the records and configs,
and figures. Entry point: ``python -m qrepro.tables``.
"""

from qrepro.tables.compare import Row, Stats, compare, failures, summary
from qrepro.tables.records import Record, canonical_overrides, load_records, match_cell
from qrepro.tables.schema import Cell, Table, check_experiments, load_table, parse_table, resolve_table, table_paths

__all__ = [
    "Cell",
    "Record",
    "Row",
    "Stats",
    "Table",
    "canonical_overrides",
    "check_experiments",
    "compare",
    "failures",
    "load_records",
    "load_table",
    "match_cell",
    "parse_table",
    "resolve_table",
    "summary",
    "table_paths",
]
