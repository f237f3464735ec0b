"""Config checks run before a run writes anything: types and ranges of the trainer, optimizer, scheduler,
precision, dataset, seed and run-control keys, unknown keys with a "did you mean", and the command line's
overrides (a misspelt key is one line, never Hydra's ``+key`` hint).

``validate_config(cfg)`` raises a one-line ``QreproError`` for the first bad value; ``precheck(argv, config)``
composes the command line's config in-process (exactly as Hydra will) and validates it, so that the entry points
fail before Hydra creates a run directory.
"""

from __future__ import annotations

import difflib
import math
import operator
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from qrepro.config import CONFIG_DIR, compose, quote_path_overrides
from qrepro.data.imagenet import CROPS
from qrepro.engine.checkpoint import read_checkpoint
from qrepro.engine.fsio import _blocking_file
from qrepro.engine.precision import amp_mode
from qrepro.errors import QreproError
from qrepro.ptq.core import ptq_configs
from qrepro.quant.methods import FP_BITS, VALID_BITS, build_method

SEED_MAX = 2**32 - 1  # numpy's seed range


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


def _bad(key: str, value: Any, want: str, example: str) -> QreproError:
    return QreproError(f"{key}={value!r} is invalid: expected {want}, e.g. {key}={example}")


def _int(d: Any, key: str, prefix: str, lo: int, example: str, nullable: bool = False) -> None:
    if key not in d:
        return
    v = d[key]
    if v is None and nullable:
        return
    if not _is_int(v) or v < lo:
        raise _bad(f"{prefix}{key}", v, f"an integer >= {lo}" + (" or null" if nullable else ""), example)


_OPS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}


def _num(d: Any, key: str, prefix: str, example: str, *bounds: tuple[str, float], nullable: bool = False) -> None:
    """``d[key]``, when present, is a finite number within ``bounds`` (such as ``(">=", 0.0)``), or null if allowed."""
    if key not in d or d[key] is None and nullable:
        return
    v = d[key]
    if not (_is_num(v) and all(_OPS[op](v, b) for op, b in bounds)):
        rng = " and ".join(f"{op} {b:g}" for op, b in bounds)
        want = "a finite number" + (f" {rng}" if rng else "") + (" or null" if nullable else "")
        raise _bad(f"{prefix}{key}", v, want, example)


def _bool(d: Any, key: str, prefix: str) -> None:
    if key in d and not isinstance(d[key], bool):
        raise _bad(f"{prefix}{key}", d[key], "true or false", "true")


def did_you_mean(key: str, known: Sequence[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f"; did you mean {prefix}{close[0]}?" if close else ""


def _trainer_keys() -> list[str]:
    """The keys the trainer section may hold: those of configs/trainer/*.yaml."""
    keys: list[str] = []
    for f in sorted(Path(CONFIG_DIR, "trainer").glob("*.yaml")):
        keys += [k for k in OmegaConf.load(f).keys() if k not in keys]
    return keys


def _check_trainer(t: dict[str, Any]) -> None:
    keys = _trainer_keys()
    for k in t:
        if k not in keys:
            hint = did_you_mean(k, keys, "trainer.")
            raise QreproError(f"unknown config key trainer.{k}{hint} (trainer keys: {', '.join(keys)})")
    _int(t, "epochs", "trainer.", 1, "30")
    _int(t, "batch_size", "trainer.", 1, "128")
    _num(t, "label_smoothing", "trainer.", "0.1", (">=", 0.0), ("<", 1.0))
    _num(t, "ema", "trainer.", "0.9999", (">", 0.0), ("<", 1.0), nullable=True)
    _int(t, "log_every", "trainer.", 1, "50")
    _int(t, "num_threads", "trainer.", 1, "4", nullable=True)
    _int(t, "members", "trainer.", 1, "4")
    _int(t, "accumulate", "trainer.", 1, "2")
    n, b = t.get("accumulate", 1), t.get("batch_size")
    if n > 1 and _is_int(b) and b % n:
        raise QreproError(
            f"trainer.batch_size={b} is not divisible by trainer.accumulate={n}: each step's batch is split into "
            f"{n} equal micro-batches; use a batch size that is a multiple of {n} or another trainer.accumulate"
        )
    if "amp" in t:
        amp_mode(t["amp"])
    for k in ("progress", "deterministic", "sync_bn", "find_unused_parameters", "channels_last"):
        _bool(t, k, "trainer.")
    if "device" in t and not isinstance(t["device"], str):
        raise _bad("trainer.device", t["device"], "auto, cpu, cuda or cuda:<index>", "cpu")
    if "compile" in t and not isinstance(t["compile"], (bool, str)):
        raise _bad("trainer.compile", t["compile"], "auto, true, false or a torch.compile mode", "false")


def _check_optimizer(o: dict[str, Any]) -> None:
    p = "optimizer."
    if not isinstance(o.get("name"), str):
        raise QreproError("optimizer.name is missing; choose e.g. optimizer=sgd")
    _num(o, "lr", p, "0.1", (">", 0.0))
    _num(o, "weight_decay", p, "5e-4", (">=", 0.0))
    _num(o, "momentum", p, "0.9", (">=", 0.0), ("<", 1.0))
    _num(o, "eps", p, "1e-8", (">", 0.0))
    _bool(o, "nesterov", p)
    if "betas" in o:
        b = o["betas"]
        if not (isinstance(b, list) and len(b) == 2 and all(_is_num(x) and 0 <= x < 1 for x in b)):
            raise _bad("optimizer.betas", b, "two numbers in [0, 1)", "[0.9,0.999]")
    groups = o.get("groups")
    if groups is None:
        return
    if not isinstance(groups, list):
        raise _bad("optimizer.groups", groups, "a list of {tags: [...], <option>: <value>} rules", "[]")
    for i, g in enumerate(groups):
        gp = f"optimizer.groups[{i}]."
        if not isinstance(g, dict) or not isinstance(g.get("tags"), list):
            raise QreproError(
                f"optimizer.groups[{i}]={g!r} needs 'tags: [...]', e.g. {{tags: [norm, bias], weight_decay: 0}}"
            )
        _num(g, "lr", gp, "0.1", (">", 0.0))
        _num(g, "weight_decay", gp, "0.0", (">=", 0.0))
        _num(g, "momentum", gp, "0.9", (">=", 0.0), ("<", 1.0))


def _check_scheduler(s: dict[str, Any]) -> None:
    p = "scheduler."
    if not isinstance(s.get("name"), str):
        raise QreproError("scheduler.name is missing; choose e.g. scheduler=cosine")
    _num(s, "warmup_epochs", p, "5", (">=", 0.0))
    for k in ("warmup_start_factor", "min_factor", "end_factor"):
        _num(s, k, p, "0.0", (">=", 0.0))
    _num(s, "gamma", p, "0.1", (">", 0.0))
    _bool(s, "per_epoch", p)
    if "milestones" in s:
        m = s["milestones"]
        if not (isinstance(m, list) and all(_is_int(x) and x >= 0 for x in m) and m == sorted(m)):
            raise _bad("scheduler.milestones", m, "an ascending list of epoch numbers", "[80,120]")


def check_precision(pr: dict[str, Any]) -> None:
    """``precision.w_bits``/``a_bits``: whole numbers in 1..8 or 32 (the launch's check and every build's)."""
    for k in ("w_bits", "a_bits"):
        v = pr.get(k)
        if not _is_int(v) or v not in VALID_BITS:
            raise QreproError(
                f"precision.{k}={v!r} is out of range; use 1..8 or 32 (full precision), e.g. precision=w4a4"
            )


def _check_dataset(d: dict[str, Any]) -> None:
    p = "dataset."
    if not isinstance(d.get("name"), str):
        raise QreproError("dataset.name is missing; choose e.g. dataset=digits")
    _int(d, "num_classes", p, 1, "10")
    _int(d, "test_batch_size", p, 1, "1000")
    _int(d, "crop_padding", p, 0, "4")
    _int(d, "subset", p, 1, "1000", nullable=True)
    _int(d, "image_size", p, 1, "32")
    _int(d, "resize", p, 1, "256")
    _int(d, "workers", p, 0, "8", nullable=True)
    if d.get("crop", CROPS[0]) not in CROPS:
        raise _bad("dataset.crop", d["crop"], " or ".join(CROPS), CROPS[1])
    for k in ("flip", "raw255", "download"):
        _bool(d, k, p)
    for k in ("mean", "std"):
        v = d.get(k)
        if v is None:
            continue
        if not (isinstance(v, list) and v and all(_is_num(x) for x in v)):
            raise _bad(f"dataset.{k}", v, "a list of per-channel numbers or null", "[0.5,0.5,0.5]")
        if k == "std" and any(x <= 0 for x in v):
            raise _bad("dataset.std", v, "positive per-channel numbers", "[0.25,0.25,0.25]")
    if d.get("root") is not None and not isinstance(d["root"], str):
        raise _bad("dataset.root", d["root"], "a path", "/data/cifar10")


def _check_ptq(q: dict[str, Any]) -> None:
    p = "ptq."
    _int(q, "calib_size", p, 1, "1024")
    _int(q, "batch_size", p, 1, "32", nullable=True)
    _int(q, "act_calib_size", p, 1, "256")
    _int(q, "iters", p, 0, "200", nullable=True)
    _bool(q, "eval_fp", p)
    if "use_ema" in q and q["use_ema"] not in ("auto", True, False):
        raise _bad("ptq.use_ema", q["use_ema"], "auto, true or false", "auto")


def validate_config(cfg: DictConfig | dict[str, Any]) -> None:
    """Raise a one-line QreproError for the first invalid value of ``cfg`` (see the module docstring)."""
    try:
        c = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    except Exception as e:  # noqa: BLE001 - interpolation errors in user values
        raise QreproError(f"config cannot be resolved: {str(e).splitlines()[0]}") from None
    if not _is_int(c.get("seed")) or not 0 <= c["seed"] <= SEED_MAX:
        raise _bad("seed", c.get("seed"), f"an integer in 0..{SEED_MAX}", "0")
    for k in ("resume", "force", "retry", "init_strict", "evaluate_only"):
        _bool(c, k, "")
    if c.get("evaluate_only") and not c.get("init_from"):
        raise QreproError("evaluate_only=true evaluates a checkpoint without training: add init_from=<path>")
    for k in ("init_from", "out_root"):
        if c.get(k) is not None and not isinstance(c[k], str):
            raise _bad(k, c[k], "a path", "runs" if k == "out_root" else "<run dir>/checkpoints/last.pt")
    if not c.get("out_root"):
        raise _bad("out_root", c.get("out_root"), "a directory", "runs")
    sections = {
        "trainer": _check_trainer,
        "optimizer": _check_optimizer,
        "scheduler": _check_scheduler,
        "precision": check_precision,
        "dataset": _check_dataset,
        "ptq": _check_ptq,
    }
    for name, check in sections.items():
        if name in c:
            if not isinstance(c[name], dict):
                raise QreproError(f"{name}={c[name]!r} replaces the whole {name} section; set {name}.<key>=... instead")
            check(c[name])


def check_training_bits(cfg: DictConfig) -> None:
    """Training with a method that ignores the bit budget (``quantizer=fp``) at bits other than 32 would record
    bits that did not run: one line instead. (PTQ quantizes an FP model to ``precision``: not checked there.)"""
    q, pr = cfg.quantizer, cfg.precision
    w, a = int(pr.w_bits), int(pr.a_bits)
    if (w, a) == (FP_BITS, FP_BITS):
        return
    opts = {k: v for k, v in OmegaConf.to_container(q, resolve=True).items() if k != "name"}
    if not build_method(str(q.name), w, a, **opts).uses_bits:
        raise QreproError(
            f"quantizer={q.name} trains full precision and ignores precision={pr.name}: the record would claim "
            f"{w}/{a} bits that did not run; use precision=w32a32, or a quantizer that quantizes (e.g. quantizer=apot)"
        )


def check_ptq(cfg: DictConfig) -> None:
    """What ``python -m qrepro.ptq`` needs beyond :func:`validate_config`: the FP checkpoint (``init_from``) and
    valid options for every bit configuration (``ptq.algorithm``, ``ptq.bits``, grids, ranges ...)."""
    if not cfg.get("init_from"):
        raise QreproError("ptq needs the FP checkpoint: add init_from=<run dir>/checkpoints/last.pt")
    ptq_configs(OmegaConf.to_container(cfg.ptq, resolve=True), cfg.precision.w_bits, cfg.precision.a_bits, cfg.seed)


# the checks of one entry point's config beyond validate_config (the primary config's name -> check)
ENTRY_CHECKS = {"train": check_training_bits, "ptq": check_ptq}


def check_launch(cfg: DictConfig, config_name: str) -> None:
    """Every check of a composed config that needs no file: :func:`validate_config`, then the entry point's own
    (:data:`ENTRY_CHECKS`). The launch's check (:func:`precheck`) runs it before Hydra writes anything, a
    multirun job or an in-process caller before it takes its run directory."""
    validate_config(cfg)
    check = ENTRY_CHECKS.get(config_name)
    if check is not None:
        check(cfg)


# ----------------------------------------------------------------------------------------- the command line
def _flat_keys(c: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in c.items():
        out += [f"{prefix}{k}"] + (_flat_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else [])
    return out


def _first_values(overrides: list[str]) -> list[str]:
    """Each sweep override (``a=1,2``, ``a=range(3)``) replaced by its first value, for a trial composition."""
    out = []
    for o in OverridesParser.create().parse_overrides(overrides):
        if o.is_sweep_override():
            first = next(iter(o.sweep_string_iterator()))
            prefix = {"ADD": "+", "FORCE_ADD": "++"}.get(o.type.name, "")
            out.append(f"{prefix}{o.key_or_group}={first}")
        else:
            out.append(o.input_line)
    return out


def precheck(argv: Sequence[str], config_name: str) -> tuple[list[str], DictConfig, bool]:
    """Check the command line before Hydra runs it. Returns (argv with path values quoted, the composed config,
    multirun). A multirun's config is composed with each sweep's first value: its keys are checked here, and
    every job's values again in the job (a bad job fails alone)."""
    multirun = any(a in ("-m", "--multirun") for a in argv)
    argv = quote_path_overrides(argv, multirun)
    overrides = [a for a in argv if not a.startswith("-") and "=" in a and not a.lstrip("+~").startswith("hydra")]
    try:
        trial = _first_values(overrides) if multirun else overrides
        cfg = compose(trial, config_name=config_name)
    except (HydraException, OmegaConfBaseException, ValueError) as e:
        raise _composition_error(e, overrides, config_name=config_name) from None
    _check_added_keys(overrides, config_name=config_name)
    if not multirun:
        check_launch(cfg, config_name)
        check_output_root(str(cfg.out_root))
        if cfg.get("init_from"):
            check_init_path(str(cfg.init_from))
    return argv, cfg, multirun


def check_init_path(path: str) -> None:
    """``init_from`` names a readable checkpoint file (a directory, a missing path or a corrupt file is one
    line, before the run directory is written)."""
    read_checkpoint(Path(path))  # raises the one-line error ("is a directory" with a hint, "does not exist", "corrupt")


def check_output_root(out_root: str) -> None:
    """``out_root`` must be (or be creatable as) a writable directory: a file in the way or no permission is one
    line before anything is written."""
    p = Path(out_root).expanduser().absolute()
    blocker = _blocking_file(p)
    if blocker is not None:
        raise QreproError(
            f"out_root={out_root}: {blocker} is a file, not a directory; move it or pick another out_root"
        )
    existing = next(q for q in (p, *p.parents) if q.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise QreproError(
            f"out_root={out_root}: {existing} is not writable; fix its permissions or pick another out_root"
        )


def _composition_error(e: Exception, overrides: list[str], config_name: str) -> QreproError:
    msg = str(e)
    if m := re.search(r"Could not override '([^']+)'", msg):
        key = m.group(1)
        base = [o for o in overrides if not o.lstrip("+~").startswith(f"{key}=")]
        try:
            known = _flat_keys(
                OmegaConf.to_container(compose(_first_values(base), config_name=config_name), resolve=False)
            )
        except Exception:  # noqa: BLE001 - the hint is optional
            known = []
        return QreproError(f"unknown config key {key}{did_you_mean(key, known)}")
    if m := re.search(r"Could not append to config. An item is already at '([^']+)'", msg):
        return QreproError(f"{m.group(1)} already exists: set it without the leading '+' ({m.group(1)}=...)")
    first = next((ln.strip() for ln in msg.splitlines() if ln.strip()), type(e).__name__)
    if "mismatched input" in msg or "token recognition error" in msg or "no viable alternative" in msg:
        return QreproError(f"cannot parse the overrides ({first}); quote values holding '=' or ',': key='...'")
    return QreproError(first)


def _check_added_keys(overrides: list[str], config_name: str) -> None:
    """``+trainer.epoch=1`` (Hydra's hint for a misspelt key) would run with the key silently ignored: the
    trainer and top-level sections take no keys beyond their own."""
    groups = {p.name for p in Path(CONFIG_DIR).iterdir() if p.is_dir()}
    top = set(OmegaConf.load(Path(CONFIG_DIR) / "train.yaml").keys()) | groups | {"ptq", "table"}
    for o in overrides:
        if not o.startswith("+") or o.startswith("++"):
            continue
        key = o[1:].split("=", 1)[0]
        if key in groups or key.split("/")[0] in groups:
            continue
        if key.startswith("trainer."):
            sub = key.split(".", 1)[1]
            if sub not in _trainer_keys():
                hint = did_you_mean(sub, _trainer_keys(), "trainer.")
                raise QreproError(f"unknown config key {key}{hint} (the trainer takes no other keys)")
        elif "." not in key and key not in top:
            raise QreproError(f"unknown config key {key}{did_you_mean(key, sorted(top))}")
