"""Training entry point: ``python -m qrepro.train +experiment=<name> [overrides]``.

This module (with evaluate/ptq/tables) is the only place that sees Hydra's DictConfig; everything it calls
takes plain arguments. The command line: its arguments and the launch call (``qrepro.launch.train``).
"""

from __future__ import annotations

import os
import sys

from omegaconf import DictConfig, open_dict

from qrepro.builders import (  # noqa: F401  (re-exported: scripts and tests import them from here)
    build_data_from_cfg,
    build_model_and_method,
    compose,
    hydra_context,
    semantic_overrides,
)
from qrepro.chain import job_init, member_inits, members_of, pop_plan, prepare
from qrepro.cli import handle_sigterm, hydra_entry, in_multirun, one_line_errors
from qrepro.launch import train
from qrepro.run_table import from_train_argv


def _task(cfg: DictConfig) -> str:
    # a single run's config was validated by the launch's check; a multirun's jobs are validated one by one
    multirun = in_multirun()
    inits = None
    if members_of(cfg) > 1:  # a chained cell's members: each from its seed's source run
        inits = member_inits(*hydra_context()[1:])
    elif multirun and (init := job_init(*hydra_context()[1:])):  # a chained cell: the source the launch trained
        with open_dict(cfg):
            cfg.init_from = init
    result = train(cfg, validate=multirun, member_inits=inits)
    results = result if isinstance(result, list) else [result]  # batched members: one result per member
    if os.environ.get("RANK", "0") == "0":
        for r in results:
            print(f"record: {r.record_path}", flush=True)
    return "skipped" if all(r.skipped for r in results) else "finished"


def main() -> None:
    handle_sigterm()  # SIGTERM ends a run like Ctrl-C: last checkpoint kept, lock released, one line
    # `python -m qrepro.train +table=<name> [overrides]` runs every cell of a paper table (qrepro.run_table)
    if (code := from_train_argv(sys.argv[1:])) is not None:
        sys.exit(code)
    sys.argv[1:], plan = one_line_errors(pop_plan)(sys.argv[1:])
    # checked once (bad values, misspelt keys: one line before anything runs); then a cell that starts from
    # another cell uses (or trains first) that cell's run, or previews the chain with +plan=true
    hydra_entry(_task, "train", prepare=lambda argv, cfg: prepare(argv, cfg=cfg, plan=plan))


if __name__ == "__main__":
    main()
