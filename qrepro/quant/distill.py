"""Distillation from a real-valued teacher: ReActNet's distributional loss (Liu et al., ECCV 2020, Sec. 3.3).

    L = −(1/n) Σ_i Σ_c p_c^T(X_i) · log p_c^S(X_i)        (p = softmax of the logits; T teacher, S student)

i.e. the cross-entropy of the student's softmax against the teacher's (the KL divergence up to the teacher's
entropy, a constant: same gradients). The labels are not used, as in the authors' training script, whose only
training loss this is. The teacher (any registered model, loaded from a checkpoint) runs in eval mode without
gradients on the same input batch as the student.

:class:`Distillation` is a method's training loss (``Method.loss``, called as ``loss(logits, y, x)``) and a
:class:`~qrepro.hooks.Hook`: at the start of training it builds the teacher with the student's class count,
loads its checkpoint strictly and moves it to the student's device and dtype. The teacher is held here, not in
the student, so it is neither trained nor saved with the student's checkpoints. A teacher given by name needs
the model factory (``qrepro.models.build_model``), which the quantization layer does not import: whoever builds
the method hands it over through ``bind_models(factory)`` (``qrepro.builders`` does).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qrepro.errors import QreproError
from qrepro.hooks import Context, Hook


def distribution_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """mean over the batch of −Σ_c softmax(teacher)_c · log_softmax(student)_c (no gradient to the teacher)."""
    p_t = F.softmax(teacher_logits.detach(), dim=1)
    return -(p_t * F.log_softmax(student_logits, dim=1)).sum(dim=1).mean()


def _last_linear_out(model: nn.Module) -> int:
    last = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not last:
        raise QreproError("distillation needs a student whose classifier is an nn.Linear (its class count)")
    return int(last[-1].out_features)


def load_state(model: nn.Module, path: str | Path) -> None:
    """Strict load of a checkpoint ({'model': ...}, {'state_dict': ...} or a bare state_dict; a DataParallel
    ``module.`` prefix is removed)."""
    p = Path(path)
    if not p.is_file():
        raise QreproError(f"distillation teacher checkpoint {p} does not exist; set quantizer.distill.checkpoint")
    obj = torch.load(p, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    sd = {k.removeprefix("module."): v for k, v in obj.items()}
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1].strip()
        raise QreproError(f"distillation teacher checkpoint {p} does not fit the teacher model: {first}") from None


class Distillation(Hook):
    """``loss(logits, y, x)`` = :func:`distribution_loss` of the student's logits against ``teacher(x)``.

    ``teacher``: a module, or ``spec = {model, options, checkpoint}`` built at ``on_train_start`` with the
    student's class count by the factory given to :meth:`bind_models` (``checkpoint`` None: the teacher's
    initial weights, for tests only).
    """

    takes_input = True  # the training-loss contract: called as loss(logits, y, x) (qrepro.engine.fast)

    def __init__(self, teacher: nn.Module | None = None, *, spec: dict[str, Any] | None = None) -> None:
        if (teacher is None) == (spec is None):
            raise ValueError("Distillation needs a teacher module or a spec, not both")
        self.teacher = teacher
        self.spec = spec
        self.factory: Callable[..., nn.Module] | None = None
        if teacher is not None:
            self._freeze(teacher)

    @staticmethod
    def _freeze(teacher: nn.Module) -> None:
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)

    def bind_models(self, factory: Callable[..., nn.Module]) -> None:
        """``factory(name, num_classes, **options) -> nn.Module`` that builds the teacher of a spec."""
        self.factory = factory

    def on_train_start(self, ctx: Context) -> None:
        ref = next(ctx.model.parameters())
        if self.teacher is None:
            if self.factory is None:
                raise RuntimeError("Distillation(spec=...) needs bind_models(build_model) before training starts")
            spec = dict(self.spec or {})
            opts = dict(spec.get("options") or {})
            self.teacher = self.factory(str(spec["model"]), _last_linear_out(ctx.model), **opts)
            if spec.get("checkpoint"):
                load_state(self.teacher, spec["checkpoint"])
        self._freeze(self.teacher)
        self.teacher.to(device=ref.device, dtype=ref.dtype)

    def __call__(self, logits: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.teacher is None:
            raise RuntimeError("distillation teacher not built: the method's hooks must run on_train_start first")
        with torch.no_grad():
            t = self.teacher(x)
        return distribution_loss(logits, t)
