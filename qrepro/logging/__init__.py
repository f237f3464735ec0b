"""Loggers: W&B (online/offline/disabled) or none. Local run records never depend on them."""

from __future__ import annotations

import os
from typing import Any

from qrepro.errors import QreproError


class NullLogger:
    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        pass

    def finish(self, summary: dict[str, Any] | None = None) -> None:
        pass


class WandbLogger:
    """Thin wrapper over ``wandb``; offline by default here (no internet)."""

    def __init__(
        self,
        *,
        project: str,
        run_dir: str,
        name: str,
        config: dict[str, Any],
        mode: str = "offline",
        entity: str | None = None,
        group: str | None = None,
        tags: list[str] | None = None,
        job_type: str = "train",
        resume_id: str | None = None,
        concurrent: bool = False,
    ) -> None:
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb  # imported here: slow to import, and only logger=wandb needs it

        self.run = wandb.init(
            project=project,
            entity=entity,
            name=name,
            group=group,
            tags=tags or [],
            config=config,
            dir=run_dir,
            mode=mode,
            job_type=job_type,
            id=resume_id,
            resume="allow" if resume_id else None,
            reinit="create_new" if concurrent else True,  # batched members: K runs open at once
        )
        self.id = getattr(self.run, "id", None)

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        self.run.log(metrics, step=step)

    def finish(self, summary: dict[str, Any] | None = None) -> None:
        """Write ``summary`` (best and last metrics) and close the run; later calls do nothing."""
        if self.run is None:
            return
        for k, v in (summary or {}).items():
            self.run.summary[k] = v
        self.run.finish()
        self.run = None


def build_logger(kind: str, **kw: Any):
    """``kind`` is ``wandb`` or ``none``; keyword arguments go to the logger."""
    if kind in ("none", None):
        return NullLogger()
    if kind == "wandb":
        return WandbLogger(mode=os.environ.get("WANDB_MODE", kw.pop("mode", "offline")), **kw)
    raise QreproError(f"unknown logger {kind!r}; choose logger=wandb or logger=none")
