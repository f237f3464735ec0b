"""The trainer's callbacks: each concern of a run beside the loop itself is one small class.

``Trainer.run`` (qrepro/engine/trainer.py) calls, in list order, ``on_fit_start(t)`` (before the first epoch of
this launch), ``on_epoch_start(t, epoch)``, ``on_train_epoch_end(t, epoch, train_metrics)`` (after training,
before evaluation), ``on_epoch_end(t, epoch, row)`` (the row already in ``t.state.curves``) and ``on_fit_end(t)``
(after the last epoch or a divergence). ``t`` is the Trainer (``t.f`` the Fit, ``t.state`` the FitState, ``t.ctx``
the hooks' Context). Callbacks that write or print act on the main process only; the NaN guard runs on every rank.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from qrepro.engine.checkpoint import atomic_save, check_finite, load_model_state, nonfinite_tensors, read_checkpoint
from qrepro.engine.loop import NonFiniteLoss
from qrepro.engine.record import device_name, git_info, versions, write_json_atomic
from qrepro.engine.rundir import identity_difference
from qrepro.errors import QreproError

RESUME_KEYS = ("model", "optimizer", "epoch", "best", "curves")
OPTIONAL = ("scheduler", "ema", "scaler")  # Fit members checkpointed when the run has them


class Callback:
    def on_fit_start(self, t: Any) -> None:
        pass

    def on_epoch_start(self, t: Any, epoch: int) -> None:
        pass

    def on_train_epoch_end(self, t: Any, epoch: int, train_metrics: dict[str, float]) -> None:
        pass

    def on_epoch_end(self, t: Any, epoch: int, row: dict[str, Any]) -> None:
        pass

    def on_fit_end(self, t: Any) -> None:
        pass


def progress_bar(total: int, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, leave=False, file=sys.stderr, mininterval=1.0, dynamic_ncols=True)


def _fmt_s(s: float) -> str:
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{sec:02d}s" if m else f"{sec}s")


class Checkpointer(Callback):
    """``checkpoints/last.pt`` every epoch and ``checkpoints/best.pt`` on a new best, kept in agreement: a new best
    goes to ``best.pt.pending``, then ``last.pt`` (naming the best epoch), then the rename over ``best.pt``; the next
    launch commits a pending file that ``last.pt`` names as best and drops any other. Resume restores ``last.pt``."""

    def __init__(self, run_dir: Path) -> None:
        self.dir = Path(run_dir) / "checkpoints"
        self.last = self.dir / "last.pt"
        self.best = self.dir / "best.pt"
        self.pending = self.dir / "best.pt.pending"

    def reconcile(self) -> None:
        if not self.pending.exists():
            return
        try:
            best_epoch = read_checkpoint(self.last)["best"]["epoch"] if self.last.exists() else None
            pending_epoch = read_checkpoint(self.pending).get("epoch")
        except (QreproError, KeyError, TypeError):
            best_epoch, pending_epoch = None, -1
        if best_epoch is not None and pending_epoch is not None and pending_epoch + 1 == best_epoch:
            os.replace(self.pending, self.best)  # killed after last.pt named it best: commit it
        else:
            self.pending.unlink()  # killed before last.pt was written: that epoch is re-run

    def on_fit_start(self, t: Any) -> None:
        f, st = t.f, t.state
        if f.is_main:
            self.reconcile()
        if not f.resume:
            return
        if not self.last.exists():
            if f.is_main:
                print(f"resume=true but no checkpoint at {self.last}: starting from scratch", flush=True)
            return
        ck = read_checkpoint(self.last)
        missing = [k for k in RESUME_KEYS if k not in ck]
        if missing:
            raise QreproError(
                f"{self.last} is not a resumable training checkpoint (no {', '.join(missing)}; a best.pt or a plain "
                "state_dict?); restore the run's own last.pt, or start over with force=true"
            )
        if f.identity is not None and (diff := identity_difference(ck.get("identity"), f.identity)):
            raise QreproError(
                f"{self.last} was written by a different run ({diff}); resume it with its own config, "
                "or start over with force=true"
            )
        check_finite(ck["model"], f"checkpoint {self.last}")

        load_model_state(f.model, ck["model"], strict=True)
        try:
            f.optimizer.load_state_dict(ck["optimizer"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise QreproError(
                f"{self.last}: its optimizer state does not fit this run's optimizer ({str(e).splitlines()[0]}); "
                "start over with force=true"
            ) from None
        for k in OPTIONAL:
            if getattr(f, k, None) is not None and k in ck:
                getattr(f, k).load_state_dict(ck[k])
        for h, hs in zip(f.hooks, ck.get("hooks", [])):
            h.load_state_dict(hs)
        st.epoch, st.best, st.curves = ck["epoch"] + 1, ck["best"], ck["curves"]
        st.wall_time_s = float(ck.get("wall_time_s") or 0.0)
        st.train_images = int(ck.get("train_images") or 0)
        st.train_seconds = float(ck.get("train_seconds") or 0.0)
        st.started = ck.get("started") or st.started
        st.segments = int(ck.get("segments") or 1) + 1
        if f.is_main:
            print(f"resumed from {self.last} after epoch {st.epoch}/{f.epochs}", flush=True)

    def state(self, t: Any, epoch: int) -> dict[str, Any]:
        f, st = t.f, t.state
        return {
            "model": f.model.state_dict(),
            "optimizer": f.optimizer.state_dict(),
            "epoch": epoch,
            "best": st.best,
            "curves": st.curves,
            "hooks": [h.state_dict() for h in f.hooks],
            "identity": f.identity,
            "wall_time_s": st.total_wall(),
            "train_images": st.train_images,
            "train_seconds": st.train_seconds,
            "started": st.started,
            "segments": st.segments,
            **{k: getattr(f, k).state_dict() for k in OPTIONAL if getattr(f, k, None) is not None},
        }

    def on_epoch_end(self, t: Any, epoch: int, row: dict[str, Any]) -> None:
        if not t.f.is_main:
            return
        if t.state.is_best:
            best = {"model": t.f.model.state_dict(), "epoch": epoch, "top1": row["test_top1"], "top5": row["test_top5"]}
            atomic_save(best, self.pending)
        atomic_save(self.state(t, epoch), self.last)
        if t.state.is_best:
            os.replace(self.pending, self.best)

    def last_good(self) -> str:
        """For the divergence message: the checkpoint a user can go back to, only if it exists and is finite."""
        if not self.last.exists():
            return "no checkpoint was written (it diverged in the first epoch)"
        try:
            ck = read_checkpoint(self.last)
        except QreproError as e:
            return f"no usable checkpoint ({e})"
        bad = nonfinite_tensors({"model": ck.get("model", {}), "ema": ck.get("ema", {})})
        if bad:
            return f"{self.last} holds non-finite values ({bad[0]}), so no good checkpoint is kept"
        return f"last good checkpoint {self.last} (after epoch {ck.get('epoch', -1) + 1})"


class NaNGuard(Callback):
    """Stops the run when the weights or statistics (BatchNorm running_var, quantizer scales, the EMA) are no
    longer finite after an epoch's training, before anything is evaluated or checkpointed. The loss itself is
    checked inside the epoch (``train_one_epoch``, every ``log_every`` steps and at the end)."""

    def on_train_epoch_end(self, t: Any, epoch: int, train_metrics: dict[str, float]) -> None:
        ema = {} if t.f.ema is None else {"ema": t.f.ema.state_dict()}
        bad = nonfinite_tensors({"model": t.f.model.state_dict(), **ema})
        if bad:
            raise NonFiniteLoss(f"non-finite weights or statistics after epoch {epoch + 1} ({', '.join(bad[:2])})")


class Console(Callback):
    """The progress bar and one line per epoch: metrics, epoch time, data-loading time and the run's ETA."""

    def __init__(self, progress: bool = True) -> None:
        self.progress = progress
        self.epoch_times: list[float] = []

    def on_epoch_start(self, t: Any, epoch: int) -> None:
        show = self.progress and t.f.is_main
        t.bar = progress_bar(len(t.f.data.train), f"epoch {epoch + 1}/{t.f.epochs}") if show else None

    def on_train_epoch_end(self, t: Any, epoch: int, train_metrics: dict[str, float]) -> None:
        if getattr(t, "bar", None) is not None:
            t.bar.close()
            t.bar = None

    def on_epoch_end(self, t: Any, epoch: int, row: dict[str, Any]) -> None:
        if not t.f.is_main:
            return
        self.epoch_times.append(row["epoch_s"])
        left = t.f.epochs - (epoch + 1)
        eta = _fmt_s(left * sum(self.epoch_times) / len(self.epoch_times)) if left else "0s"
        b = t.state.best
        print(
            f"epoch {epoch + 1}/{t.f.epochs}  loss {row['train_loss']:.4f}  train {row['train_top1']:.2f}%  "
            f"test {row['test_top1']:.2f}% (best {b['top1']:.2f}%)  lr {row['lr']:.3g}  "
            f"{row['images_per_s']:.0f} img/s  {row['epoch_s']:.1f}s (data {row['data_s']:.1f}s)  ETA {eta}",
            flush=True,
        )

    def on_fit_end(self, t: Any) -> None:
        self.on_train_epoch_end(t, -1, {})


class LoggerCallback(Callback):
    """Per-epoch metrics to the logger (W&B); at the end its summary holds the best and the last metrics."""

    def on_epoch_end(self, t: Any, epoch: int, row: dict[str, Any]) -> None:
        if t.f.is_main and t.f.logger is not None:
            t.f.logger.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=t.ctx.step)

    def on_fit_end(self, t: Any) -> None:
        if t.f.is_main and t.f.logger is not None:
            summary = {k: v for k, v in t.state.metrics().items() if v is not None}
            t.f.logger.finish({**summary, "status": t.state.status})


class RecordWriter(Callback):
    """``record.json`` at the end of the run: config, metrics, curves and provenance over the whole run
    (wall time and throughput accumulate across resumed segments)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / "record.json"
        self.git: dict[str, Any] = {}

    def on_fit_start(self, t: Any) -> None:
        self.git = git_info()  # the code that runs is the code at the start (a long run may outlive commits)

    def on_fit_end(self, t: Any) -> None:
        f, st = t.f, t.state
        record = {
            "complete": st.status == "complete",
            "status": st.status,
            **f.record_base,
            "run_dir": str(f.run_dir),
            "metrics": st.metrics(),
            "curves": st.curves,
            "git": self.git,
            "versions": versions(),
            "device": device_name(f.device),
            "wall_time_s": st.total_wall(),
            "images_per_s": st.train_images / st.train_seconds if st.train_seconds else None,
            "segments": st.segments,
            "started": st.started,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "checkpoint": str(Path(f.run_dir) / "checkpoints" / "last.pt"),
        }
        if f.identity is not None:
            record["identity"] = {k: v for k, v in f.identity.items() if k != "config"}
        if st.error:
            record["error"] = st.error
        t.record = record
        if f.is_main:
            write_json_atomic(record, self.path)


def default_callbacks(f: Any) -> list[Callback]:
    """The standard run: NaN guard, checkpoints, console, logger, record (in this order)."""
    return [NaNGuard(), Checkpointer(f.run_dir), Console(f.progress), LoggerCallback(), RecordWriter(f.run_dir)]
