"""A cell that starts from another cell: ``python -m qrepro.train +experiment=<cell>`` resolves the chain (the
README's "starts from another cell" paragraph describes it for users).

An experiment names its source with ``init_from_experiment: <experiment>``, or an external checkpoint with
``init_from_required: "<what>"``. The source run (the command line's overrides carried over, except those that
define the cell: ``precision``, ``quantizer``, ``name``, ``init_from``) is reused when finished, else trained first;
``init_from=<path>`` or ``init_from=null`` skips both, ``+plan=true`` prints the chain without training.

A multirun resolves every job's chain in the launching process and trains the sources its jobs need there, each
once, before the first job starts. Batched members (``seed=S trainer.members=K``): member i is the run ``seed=S+i``
and starts from the seed ``S+i`` run of its source; the K source runs of each step are trained as one batched job
(those finished are reused; a batch that would not write exactly those runs is trained one run at a time).
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper  # the sweeper a multirun uses (split_arguments)
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig

from qrepro.cli import split_argv
from qrepro.config import beside_hydra, compose, key_of, member_run_dir, quote_path_overrides, run_subdir
from qrepro.config import trains_from_scratch as needs_source  # a source cell or checkpoint, init_from not given
from qrepro.engine.members import member_overrides
from qrepro.engine.record import read_record
from qrepro.engine.rundir import file_sha256
from qrepro.errors import QreproError
from qrepro.run_table import hydra_quote, subprocess_runner

PLAN_KEYS = ("plan", "+plan", "++plan")
CELL_KEYS = ("precision", "quantizer", "name", "init_from", "experiment")  # not carried to the source runs
MULTIRUN_FLAGS = ("-m", "--multirun")


def pop_plan(argv: Sequence[str]) -> tuple[list[str], bool]:
    """``argv`` without ``+plan=<bool>``, and whether a plan preview was asked for."""
    rest, plan = [], False
    for a in argv:
        if "=" in a and a.split("=", 1)[0] in PLAN_KEYS:
            value = a.split("=", 1)[1].strip().lower()
            if value not in ("true", "false"):
                raise QreproError(f"plan takes true or false, got {a}")
            plan = value == "true"
        else:
            rest.append(a)
    return rest, plan


def experiment_of(argv: Sequence[str]) -> str | None:
    names = [a.split("=", 1)[1] for a in argv if "=" in a and key_of(a) == "experiment"]
    return names[-1] if names else None


def carried(overrides: Sequence[str]) -> list[str]:
    """The overrides a source run inherits from the cell's command line: not those that define the cell, nor
    Hydra's settings (``hydra.run.dir=X`` names the directory of the run asked for; its sources keep theirs)."""
    own = (*CELL_KEYS, "hydra")
    return [o for o in overrides if not any(key_of(o) == k or key_of(o).startswith((k + ".", k + "/")) for k in own)]


def explicit_init(overrides: Sequence[str]) -> bool:
    return any(key_of(o) == "init_from" for o in overrides)


@dataclass
class Step:
    """One run of the chain."""

    experiment: str
    overrides: list[str]  # without +experiment and init_from
    run_dir: Path
    complete: bool
    record: dict | None = None
    seed: int = 0  # the run's composed seed

    def refresh(self) -> None:
        """Read the run's record again (after it was trained)."""
        self.record = read_record(self.run_dir / "record.json")
        self.complete = bool(self.record and self.record.get("complete") is True)

    def command(self, init_from: str | None, python: str = "python") -> list[str]:
        init = hydra_quote(init_from) if init_from else "null"
        return [python, "-m", "qrepro.train", f"+experiment={self.experiment}", *self.overrides, f"init_from={init}"]


def _step(experiment: str, overrides: list[str], cfg: DictConfig | None = None) -> tuple[Step, DictConfig]:
    """The run of ``experiment`` with ``overrides`` (``cfg``: its config, when the caller composed it already)."""
    cfg = cfg if cfg is not None else compose([f"+experiment={experiment}", *overrides])
    asked = [o.split("=", 1)[1] for o in overrides if key_of(o) == "hydra.run.dir"]  # the user's directory
    sub = run_subdir([f"+experiment={experiment}", *overrides])
    run_dir = Path(asked[-1]) if asked else Path(str(cfg.out_root)) / str(cfg.name) / sub
    step = Step(experiment, list(overrides), run_dir, False, seed=int(cfg.seed))
    step.refresh()
    return step, cfg


def resolve(experiment: str, overrides: Sequence[str], cfg: DictConfig | None = None) -> list[Step]:
    """The runs a cell needs, sources first, the cell itself last (one step when it starts from nothing, or
    when ``init_from`` is given). Raises when the cell needs an external checkpoint that was not given.
    ``cfg``: the cell's composed config, when the caller has it (the launch composes once)."""
    overrides = [o for o in overrides if key_of(o) != "experiment"]
    step, cfg = _step(experiment, overrides, cfg)
    chain = [step]
    if explicit_init(overrides) or cfg.get("init_from"):
        return chain
    need = cfg.get("init_from_required")
    if need and not cfg.get("init_from_experiment"):
        raise QreproError(
            f"{experiment} starts from {need} in the paper: give init_from=<path>, or init_from=null to train it "
            "from scratch"
        )
    source, seen, rest = cfg.get("init_from_experiment"), {experiment}, carried(overrides)
    while source:
        if source in seen:
            raise QreproError(f"init_from_experiment chain of {experiment} is a cycle at {source}")
        seen.add(str(source))
        step, cfg = _step(str(source), rest)
        chain.append(step)
        need = cfg.get("init_from_required")
        source = cfg.get("init_from_experiment")
        if need and not source:
            raise QreproError(
                f"{experiment} starts from {step.experiment}, which starts from {need}: train {step.experiment} "
                "with init_from=<path> first"
            )
    return chain[::-1]


def last_checkpoint(step: Step) -> Path:
    return step.run_dir / "checkpoints" / "last.pt"


def reusable(step: Step, init: str | None) -> bool:
    """``step``'s finished run can be used: complete, with its ``last.pt``, initialised from ``init``'s content."""
    want = file_sha256(init) if init else None
    same_init = step.record is not None and (step.record.get("init_from_sha256") or None) == want
    return step.complete and same_init and last_checkpoint(step).is_file()


def describe(chain: Sequence[Step], python: str = "python") -> list[str]:
    """The plan preview: one block per run, in order."""
    lines = [f"plan: {chain[-1].experiment}: {len(chain)} run(s) in order"]
    init: str | None = None
    for i, step in enumerate(chain, 1):
        state = "to train" if not step.complete else ("finished" if i == len(chain) else "finished (reused)")
        origin = f"from {chain[i - 2].experiment}" if i > 1 else "from scratch"
        lines.append(f"  {i}. {step.experiment}  [{state}, {origin}]")
        lines.append(f"     run dir: {step.run_dir.as_posix()}")
        lines.append(f"     {shlex.join(step.command(init, python))}")
        init = last_checkpoint(step).as_posix()
    return lines


Runner = Callable[[list[str]], object]


def run_sources(
    chain: Sequence[Step], *, out: Callable[[str], None] = print, runner: Runner | None = None
) -> str | None:
    """Make sure every source run of ``chain`` is finished (training it when not); returns the checkpoint the
    cell itself starts from (None when the chain is the cell alone)."""
    runner = runner or subprocess_runner
    init: str | None = None
    target = chain[-1].experiment
    for step in chain[:-1]:
        ckpt = last_checkpoint(step)
        if reusable(step, init):
            out(f"chain: {target} starts from {step.experiment}: using its finished run {step.run_dir.as_posix()}")
        else:
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # every rank would train it: one process does, first
                raise QreproError(
                    f"{target} starts from {step.experiment}, which has no finished run in {step.run_dir.as_posix()}; "
                    f"under torchrun train it first: {shlex.join(step.command(init))} (or use qrepro-table run)"
                )
            why = "no finished run" if not step.complete else "its finished run has no checkpoint or another init"
            out(
                f"chain: {target} starts from {step.experiment} ({why} in {step.run_dir.as_posix()}): training it first"
            )
            cmd = step.command(init, sys.executable)
            out(shlex.join(cmd))
            result = runner(cmd)
            code, record = getattr(result, "returncode", 1), getattr(result, "record", None)
            if code != 0 or record is None:
                raise QreproError(f"the source run {step.experiment} failed (exit code {code}); {target} not started")
            step.run_dir = Path(record).parent
            ckpt = last_checkpoint(step)
        init = ckpt.as_posix()
    return init


def prepare(
    argv: Sequence[str],
    *,
    out: Callable[[str], None] = print,
    runner: Runner | None = None,
    cfg: DictConfig | None = None,
    plan: bool = False,
) -> list[str] | None:
    """For the trainer's entry point: ``argv`` with the resolved ``init_from`` added (sources trained first), or
    None after a plan preview (nothing to train). ``cfg``: the command line's config, composed by the launch's
    check (``qrepro.validation.precheck``), reused for the cell itself; ``plan``: preview only (as ``+plan=true``)."""
    argv, asked = pop_plan(argv)
    plan = plan or asked
    experiment = experiment_of(argv)
    if experiment is None:
        if plan:
            raise QreproError("+plan=true previews a cell: give +experiment=<name>")
        return argv
    overrides = split_argv(argv)[1]
    multirun = any(a in MULTIRUN_FLAGS for a in argv)
    if explicit_init(overrides):
        if plan:
            for job in sweep_jobs(overrides) if multirun else [overrides]:
                out("\n".join(describe(resolve(experiment, job))))
            return None
        return argv
    if multirun:
        return prepare_sweep(argv, experiment, overrides, out=out, runner=runner, plan=plan)
    cfg = cfg if cfg is not None else compose(overrides)
    if members_of(cfg) > 1:  # batched members: one chain per member, each source step trained as one batch
        if not plan and not needs_source(cfg):
            return argv
        chains = member_chains(experiment, overrides, cfg)
        if plan:
            out("\n".join(describe_members(chains)))
            return None
        if len(chains[0]) > 1:
            run_member_sources(chains, out=out, runner=runner)
        return argv  # the job resolves each member's source run (member_inits)
    chain = resolve(experiment, overrides, cfg)
    if plan:
        out("\n".join(describe(chain)))
        return None
    if len(chain) == 1:
        return argv
    init = run_sources(chain, out=out, runner=runner)
    out(f"chain: {experiment} starts from {init}")
    return [*argv, f"init_from={hydra_quote(init)}"]


def sweep_jobs(overrides: Sequence[str]) -> list[list[str]]:
    """The override lists of a multirun's jobs, in Hydra's order (``seed=0,1 precision=w2a2,w4a4``: four)."""
    parsed = OverridesParser.create().parse_overrides(quote_path_overrides(list(overrides), multirun=True))
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def prepare_sweep(
    argv: Sequence[str],
    experiment: str,
    overrides: Sequence[str],
    *,
    out: Callable[[str], None] = print,
    runner: Runner | None = None,
    plan: bool = False,
) -> list[str] | None:
    """A multirun over a chained cell: every job's chain is resolved here, in the launching process, and the
    sources the jobs need are trained here, each once and in order, before any job starts (jobs may run
    concurrently; a source shared by several jobs is never trained twice). Each job then starts from its own
    source's finished run (:func:`job_init`; a batched members job: each member from its seed's run,
    :func:`member_inits`). Returns ``argv`` unchanged, or None after a plan preview."""
    jobs = sweep_jobs(overrides)
    # per job, its chains: one, or one per member of a batched job (trainer.members=K)
    cfgs = [compose(job) for job in jobs]
    batched = [members_of(cfg) > 1 and (plan or needs_source(cfg)) for cfg in cfgs]  # one chain per member
    chains = [
        member_chains(experiment, job, cfg) if b else [resolve(experiment, job, cfg)]
        for job, cfg, b in zip(jobs, cfgs, batched)
    ]
    if plan:
        for b, cs in zip(batched, chains):
            out("\n".join(describe_members(cs) if b else describe(cs[0])))
        return None
    done: set[Path] = set()
    for job, b, cs in zip(jobs, batched, chains):
        if len(cs[0]) == 1 or all(s.run_dir in done for c in cs for s in c[:-1]):
            continue
        # again: an earlier job may have trained a source it shares
        cs = member_chains(experiment, job) if b else [resolve(experiment, job)]
        done.update(s.run_dir for c in cs for s in c[:-1])
        if b:
            run_member_sources(cs, out=out, runner=runner)
        else:
            run_sources(cs[0], out=out, runner=runner)
    return list(argv)


def _refuse(cmd: list[str]) -> object:
    raise QreproError(
        f"a source run is not finished; the launch trains sources before its jobs start: {shlex.join(cmd)}"
    )


def job_init(experiment: str | None, overrides: Sequence[str]) -> str | None:
    """The checkpoint a multirun job of a chained cell starts from: its source's finished run, trained by the
    launch (:func:`prepare_sweep`); None when the cell starts from nothing or ``init_from`` is given. A job never
    trains a source (concurrent jobs would race on it): an unfinished one is an error."""
    if experiment is None or explicit_init(overrides):
        return None
    with beside_hydra():
        chain = resolve(experiment, overrides)
    return run_sources(chain, runner=_refuse) if len(chain) > 1 else None


# ------------------------------------------------------------------------------------------ batched members
def members_of(cfg: DictConfig) -> int:
    return int(cfg.trainer.get("members") or 1)


def member_chains(experiment: str, overrides: Sequence[str], cfg: DictConfig | None = None) -> list[list[Step]]:
    """The chains of a batched job's K members (``seed=S trainer.members=K``): member i's is the chain of its
    separate run ``seed=S+i`` (the overrides ``qrepro.engine.members.member_overrides`` gives it), so its sources
    carry its seed. ``cfg``: the job's composed config, when the caller has it."""
    overrides = [o for o in overrides if key_of(o) != "experiment"]
    cfg = cfg if cfg is not None else compose([f"+experiment={experiment}", *overrides])
    s0, seed_given = int(cfg.seed), any(key_of(o) == "seed" for o in overrides)
    return [resolve(experiment, member_overrides(overrides, s0, i, seed_given)) for i in range(members_of(cfg))]


def batch_command(steps: Sequence[Step], python: str = "python", init_null: bool = False) -> list[str] | None:
    """One batched job (``trainer.members=K``) whose member i is the run ``steps[i]``, or None when no batch is:
    the runs are not the seeds S..S+K-1 of one experiment with the same other overrides. Without ``init_null``
    the job resolves each member's source itself (:func:`member_inits`)."""
    first = steps[0]
    seed_given = any(key_of(o) == "seed" for o in first.overrides)
    ovr = [o for o in first.overrides if key_of(o) != "seed"] + ([f"seed={first.seed}"] if seed_given else [])
    ovr.append(f"trainer.members={len(steps)}")
    for i, step in enumerate(steps):
        if step.experiment != first.experiment or member_overrides(ovr, first.seed, i, seed_given) != step.overrides:
            return None
    return [python, "-m", "qrepro.train", f"+experiment={first.experiment}", *ovr] + (
        ["init_from=null"] if init_null else []
    )


def _seeds(steps: Sequence[Step]) -> str:
    return ", ".join(str(s.seed) for s in steps)


def _member_dir(steps: Sequence[Step], s: Step) -> Path:
    """Where the batched job trains the member run ``s`` (``qrepro.config.member_run_dir``): the step's own
    directory, or inside the directory the user chose for the cell (``hydra.run.dir``, the same for every member)."""
    if len({t.run_dir for t in steps}) > 1:
        return s.run_dir
    return member_run_dir(s.run_dir, steps[0].overrides, s.overrides)


def describe_members(chains: Sequence[Sequence[Step]], python: str = "python") -> list[str]:
    """The plan preview of a batched job: one block per step of the chain, its K members' run directories and the
    batched command that trains them."""
    k, n = len(chains), len(chains[0])
    target = chains[0][-1]
    seeds = _seeds([c[-1] for c in chains])
    lines = [f"plan: {target.experiment}: {n} run(s) in order, each for {k} batched members (seeds {seeds})"]
    for j in range(n):
        steps = [c[j] for c in chains]
        done = sum(s.complete for s in steps)
        state = "to train" if not done else f"{done} of {k} finished" + (", the others to train" if done < k else "")
        if done == k:
            state = "finished" if j == n - 1 else "finished (reused)"
        origin = f"from {chains[0][j - 1].experiment}, each member from its seed's run" if j else "from scratch"
        lines.append(f"  {j + 1}. {steps[0].experiment}  [{state}, {origin}]")
        for s in steps:
            lines.append(f"     run dir (seed={s.seed}): {_member_dir(steps, s).as_posix()}")
        cmd = batch_command(steps, python, init_null=j == 0)
        if cmd is not None:
            lines.append(f"     {shlex.join(cmd)}")
        else:  # not one batch: the runs one at a time
            for i, s in enumerate(steps):
                init = last_checkpoint(chains[i][j - 1]).as_posix() if j else None
                lines.append(f"     {shlex.join(s.command(init, python))}")
    return lines


def run_member_sources(
    chains: Sequence[Sequence[Step]], *, out: Callable[[str], None] = print, runner: Runner | None = None
) -> list[str | None]:
    """:func:`run_sources` for the K members of a batched job: every step of the chain before the cell is made
    finished for all members (the unfinished ones trained as one batched job of the source cell, or one run at a
    time when they do not form one batch); returns the checkpoint each member starts from."""
    runner = runner or subprocess_runner
    k, n = len(chains), len(chains[0])
    target = chains[0][-1].experiment
    inits: list[str | None] = [None] * k
    for j in range(n - 1):
        steps = [c[j] for c in chains]
        src = steps[0].experiment
        todo = [i for i, s in enumerate(steps) if not reusable(s, inits[i])]
        if not todo:
            dirs = ", ".join(s.run_dir.as_posix() for s in steps)
            out(f"chain: {target} starts from {src} (seeds {_seeds(steps)}): using its finished runs {dirs}")
        else:
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                raise QreproError("trainer.members cannot be combined with several processes (torchrun/DDP); use one")
            out(
                f"chain: {target} starts from {src} ({len(todo)} of its {k} runs for seeds {_seeds(steps)} not "
                "finished): training them first"
            )
            cmd = batch_command(steps, sys.executable, init_null=j == 0)
            cmds = [cmd] if cmd is not None else [steps[i].command(inits[i], sys.executable) for i in todo]
            for c in cmds:
                out(shlex.join(c))
                code = getattr(runner(c), "returncode", 1)
                if code != 0:
                    raise QreproError(f"the source run {src} failed (exit code {code}); {target} not started")
            for i in todo:
                steps[i].refresh()
                if not reusable(steps[i], inits[i]):
                    raise QreproError(
                        f"the source run {src} (seed {steps[i].seed}) left no finished run in "
                        f"{steps[i].run_dir.as_posix()}; {target} not started"
                    )
        inits = [last_checkpoint(s).as_posix() for s in steps]
    return inits


def member_inits(experiment: str | None, overrides: Sequence[str]) -> list[str] | None:
    """The checkpoint each member of a batched job starts from (its seed's source run, trained by the launch:
    :func:`prepare` or :func:`prepare_sweep`); None when the cell starts from nothing or ``init_from`` is given.
    A job never trains a source: an unfinished one is an error."""
    if experiment is None or explicit_init(overrides):
        return None
    with beside_hydra():
        cfg = compose([f"+experiment={experiment}", *[o for o in overrides if key_of(o) != "experiment"]])
        if not needs_source(cfg):
            return None
        chains = member_chains(experiment, overrides, cfg)
    if len(chains[0]) == 1:
        return None
    inits = run_member_sources(chains, runner=_refuse, out=lambda s: None)
    for c, init in zip(chains, inits):
        print(f"chain: {experiment} (seed {c[-1].seed}) starts from {init}", flush=True)
    return inits
