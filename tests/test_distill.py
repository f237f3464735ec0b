"""Method.loss (a training loss that sees the input batch) and ReActNet's distributional loss against a teacher."""

from __future__ import annotations

import torch
from torch import nn

from qrepro.engine.fast import make_forward_loss, with_input
from qrepro.hooks import Context
from qrepro.quant.distill import Distillation, distribution_loss

D = torch.float64


def test_distribution_loss_is_cross_entropy_to_teacher_softmax():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 7, dtype=D, generator=g), torch.randn(5, 7, dtype=D, generator=g)
    p, q = t.softmax(1), s.softmax(1)
    assert torch.allclose(distribution_loss(s, t), -(p * q.log()).sum(1).mean(), atol=1e-14)
    # = KL(p || q) + H(p): gradient of KL, softmax(s) − p per row / n, nothing to the teacher
    s.requires_grad_(True)
    t.requires_grad_(True)
    distribution_loss(s, t).backward()
    assert torch.allclose(s.grad, (q - p) / 5, atol=1e-14)
    assert t.grad is None
    # equal logits: the teacher's entropy (the minimum over the student)
    assert torch.allclose(distribution_loss(t.detach(), t.detach()), -(p * p.log()).sum(1).mean(), atol=1e-14)


def test_method_loss_sees_the_input_and_replaces_cross_entropy():
    torch.manual_seed(0)
    student, teacher = nn.Linear(4, 3).double(), nn.Linear(4, 3).double()
    kd = Distillation(teacher)
    kd.on_train_start(Context(model=student))
    x, y = torch.randn(6, 4, dtype=D), torch.tensor([0, 1, 2, 0, 1, 2])
    loss, _ = make_forward_loss(student, kd)(x, y)
    assert torch.allclose(loss, distribution_loss(student(x), teacher(x)), atol=0)
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    # a plain criterion keeps its (logits, y) signature
    ce = with_input(nn.functional.cross_entropy)
    assert torch.equal(ce(student(x), y, x), nn.functional.cross_entropy(student(x), y))


def test_teacher_built_from_spec_with_student_classes(tmp_path):
    from qrepro.models import build_model

    ref = build_model("small_cnn", 10).double()
    torch.save({"state_dict": {"module." + k: v for k, v in ref.state_dict().items()}}, tmp_path / "t.pt")
    kd = Distillation(spec={"model": "small_cnn", "checkpoint": str(tmp_path / "t.pt")})
    kd.bind_models(build_model)
    student = build_model("small_cnn", 10).double()
    kd.on_train_start(Context(model=student))
    x = torch.randn(2, 3, 32, 32, dtype=D)
    assert torch.equal(kd.teacher(x), ref.eval()(x)) and next(kd.teacher.parameters()).dtype == D
