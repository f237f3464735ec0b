"""PTQ entry point: ``python -m qrepro.ptq +experiment=<FP experiment> init_from=<checkpoint> [ptq.* / precision=]``.

Rebuilds the experiment's FP model (its training quantizer, e.g. ``satnl``, at 32 bits), loads the checkpoint
read-only (EMA weights when present), folds weight transforms, takes ``ptq.calib_size`` calibration images,
runs ``ptq.algorithm`` for each bit configuration and writes one ``record.json`` per configuration
(``method: ptq_<algorithm>``). The input checkpoint is hashed before and after and never written.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from qrepro.builders import build_method_from_cfg, build_model_from_cfg, seed_everything, select_device, setup_run
from qrepro.cli import hydra_entry, in_multirun
from qrepro.config import hydra_context, plain, semantic_overrides
from qrepro.engine.checkpoint import check_finite, extract_state_dict, load_model_state, read_checkpoint
from qrepro.engine.loop import evaluate
from qrepro.engine.record import device_name, git_info, read_record, versions, write_json_atomic
from qrepro.engine.rundir import RunLock, file_sha256, init_source, mark_superseded
from qrepro.errors import QreproError
from qrepro.ptq.core import ptq_configs, quantize_model
from qrepro.quant import prepare
from qrepro.quant.methods import FP_BITS
from qrepro.validation import check_launch


def load_fp_model(cfg: DictConfig, num_classes: int, path: str, use_ema: str | bool) -> tuple[torch.nn.Module, str]:
    """The experiment's FP model with the checkpoint's (EMA) weights; returns (model, which weights)."""
    model = build_model_from_cfg(cfg, num_classes)
    try:
        method = build_method_from_cfg(cfg, FP_BITS, FP_BITS)
    except QreproError as e:
        raise QreproError(f"PTQ starts from a full-precision model, but quantizer={cfg.quantizer.name}: {e}") from None
    prepare(model, method)
    obj = read_checkpoint(path)
    if use_ema is True and "ema" not in obj:
        raise QreproError(f"ptq.use_ema=true but {path} has no EMA weights; use ptq.use_ema=auto")
    if use_ema in ("auto", True) and isinstance(obj.get("ema"), dict):
        sd, which = obj["ema"], "ema"
    else:
        sd, which = extract_state_dict(obj)[0], "model"
    check_finite(sd, f"checkpoint {path} ({which} weights)")
    load_model_state(model, sd, strict=True)
    return model.eval(), which


def calibration_images(loader: Any, n: int) -> torch.Tensor:
    """The first ``n`` training images (``ptq.calib_size``, at least 1 after the launch's check)."""
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(0)
    xs, have = [], 0
    for x, _ in loader:
        xs.append(x)
        have += len(x)
        if have >= n:
            break
    if have < n:
        raise QreproError(f"ptq.calib_size={n} exceeds the {have} training images available; lower it")
    return torch.cat(xs)[:n]


def run_ptq(
    cfg: DictConfig,
    run_dir: Path | None = None,
    experiment: str | None = None,
    overrides: list[str] | None = None,
    *,
    validate: bool = True,
) -> list[Path]:
    """Run every bit configuration of ``cfg.ptq``; returns the record paths. Under Hydra the run directory,
    experiment name and overrides come from Hydra; in-process callers may pass them. The start is the
    trainer's (``qrepro.launch.train``): the config checked (``validate=False``: the launch's check did it),
    then the checkpoint, the dataset and the FP model, all before the run directory is taken, so a bad launch
    is one line that writes nothing."""
    if validate:
        check_launch(cfg, "ptq")
    pcfgs = ptq_configs(plain(cfg.ptq), cfg.precision.w_bits, cfg.precision.a_bits, cfg.seed)
    src = Path(str(cfg.init_from))
    digest = init_source(src)["sha256"]  # a missing path or a directory is a one-line error
    h_dir, h_exp, h_over = hydra_context()
    base_dir = Path(run_dir or h_dir or Path(cfg.out_root) / cfg.name / "ptq" / "default")
    experiment = experiment or h_exp or cfg.get("experiment")
    overrides = semantic_overrides(overrides if overrides is not None else h_over, config_name="ptq")
    sweep = cfg.ptq.bits is not None
    targets = []
    for p in pcfgs:
        w, a = p.w_bits, p.a_bits
        run_dir = base_dir / f"w{w}a{a}" if sweep else base_dir
        ov = sorted([o for o in overrides if not o.startswith(("ptq.bits=", "precision="))] + [f"precision=w{w}a{a}"])
        targets.append((p, run_dir, ov if sweep else overrides))
    device = select_device(cfg.trainer.device)
    data = setup_run(cfg, device)  # a missing dataset.root is one line before the run directory is touched
    fp, which = load_fp_model(cfg, data.num_classes, str(src), plain(cfg.ptq.use_ema))  # a bad checkpoint too
    with RunLock(base_dir):  # one PTQ command owns its directory (and its per-bit subdirectories)
        todo = _todo(cfg, targets, digest)
        if not todo:
            return [t[1] / "record.json" for t in targets]
        fp = fp.to(device)
        fp_eval = evaluate(fp, data.test) if cfg.ptq.eval_fp else None
        if fp_eval is not None:
            print(f"FP ({which} weights): top1 {fp_eval['test_top1']:.2f}%", flush=True)
        calib = calibration_images(data.train, int(cfg.ptq.calib_size)).to(device)
        paths = []
        for pcfg, run_dir, ov in todo:
            w, a = pcfg.w_bits, pcfg.a_bits
            started, t0 = time.time(), time.perf_counter()
            seed_everything(int(cfg.seed))
            q = quantize_model(fp, calib, pcfg)
            ptq_s = time.perf_counter() - t0
            ev = evaluate(q, data.test)
            if file_sha256(src) != digest:  # cannot happen: the file is only read; guard the promise anyway
                raise QreproError(f"checkpoint {src} changed during PTQ; stopping")
            record = {
                "complete": True,
                "status": "complete",
                "name": cfg.name,
                "experiment": experiment,
                "overrides": ov,
                "run_dir": str(run_dir),
                "config": plain(cfg),
                "model": cfg.model.name,
                "method": f"ptq_{pcfg.algorithm}",
                "dataset": cfg.dataset.name,
                "precision": f"w{w}a{a}",
                "w_bits": w,
                "a_bits": a,
                "optimizer": None,
                "seed": int(cfg.seed),
                "init_from": str(src),
                "train_method": cfg.quantizer.name,
                "ptq": {
                    "algorithm": pcfg.algorithm,
                    "source": str(src),
                    "source_sha256": digest,
                    "weights": which,
                    "calib_size": int(cfg.ptq.calib_size),
                    "options": dict(vars(pcfg)),
                    "fp_top1": fp_eval["test_top1"] if fp_eval else None,
                    "fp_top5": fp_eval["test_top5"] if fp_eval else None,
                    "ptq_seconds": ptq_s,
                },
                "metrics": {
                    "best_top1": ev["test_top1"],
                    "best_top5": ev["test_top5"],
                    "best_epoch": None,
                    "last_top1": ev["test_top1"],
                    "last_top5": ev["test_top5"],
                    "test_loss": ev["test_loss"],
                },
                "curves": {},
                "git": git_info(),
                "versions": versions(),
                "device": device_name(device),
                "wall_time_s": time.perf_counter() - t0,
                "images_per_s": None,
                "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
            write_json_atomic(record, run_dir / "record.json")
            fp_s = f" (FP {fp_eval['test_top1']:.2f}%)" if fp_eval else ""
            top = f"top1 {ev['test_top1']:.2f}% top5 {ev['test_top5']:.2f}%"
            print(f"ptq {pcfg.algorithm} w{w}a{a}: {top}{fp_s}", flush=True)
            paths.append(run_dir / "record.json")
        return paths


def _todo(cfg: DictConfig, targets: list, digest: str) -> list:
    """The targets to (re)compute: a complete record of the same source checkpoint is skipped; one made from
    another checkpoint is refused (force=true replaces it, after marking it superseded)."""
    todo = []
    for t in targets:
        path = t[1] / "record.json"
        rec = read_record(path)
        if rec is not None and cfg.force:
            mark_superseded(path, rec, "force=true")
        elif rec is not None and rec.get("complete") is True:
            old = (rec.get("ptq") or {}).get("source_sha256")
            if old is not None and old != digest:
                raise QreproError(
                    f"{t[1]} holds a complete PTQ result of another checkpoint (sha256 {old[:12]}; init_from "
                    f"{cfg.init_from} has {digest[:12]}); pass another out_root=..., or force=true to replace it"
                )
            print(f"skip: {t[1]} already has a complete record (force=true to re-run)", flush=True)
            continue
        todo.append(t)
    return todo


def _task(cfg: DictConfig) -> None:
    # a single run's config was checked by the launch (hydra_entry's precheck); a multirun's jobs one by one
    paths = run_ptq(cfg, validate=in_multirun())
    for p in paths:
        print(f"record: {p}", flush=True)


def main() -> None:
    hydra_entry(_task, "ptq")


if __name__ == "__main__":
    main()
