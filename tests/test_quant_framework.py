"""Layer swapping keeps parameter names; FP checkpoints load strictly into quantized models."""

import pytest
import torch
from torch import nn

from qrepro.engine.checkpoint import load_model_state
from qrepro.errors import QreproError
from qrepro.quant import QConv2d, QLinear, build_method, prepare, quantized_layers
from qrepro.quant.methods import Method, check_bits
from qrepro.quant.prepare import _layer_infos


class Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.s = nn.Parameter(torch.tensor(1.0))

    def forward(self, w):
        return w * self.s


def _net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, groups=4),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )


def test_roles_and_depthwise():
    infos = _layer_infos(_net(), 4, 4)
    assert [i.role for i in infos] == ["first", "middle", "last"]
    assert [i.is_depthwise for i in infos] == [False, True, False]
    assert isinstance(infos[0].next_module, nn.BatchNorm2d)


def test_prepare_shares_parameters_and_names():
    m = _net()
    fp_sd = {k: v.clone() for k, v in m.state_dict().items()}
    w0 = m[0].weight
    prepare(m, Method("t", lambda info: (Scale(), None)))
    assert isinstance(m[0], QConv2d) and isinstance(m[6], QLinear) and m[0].weight is w0
    assert len(list(quantized_layers(m))) == 3
    x = torch.randn(2, 3, 8, 8)
    ref = _net()
    ref.load_state_dict(fp_sd)
    m.eval(), ref.eval()
    assert torch.allclose(m(x), ref(x))  # identity quantizers: same function
    fresh = prepare(_net(), Method("t", lambda info: (Scale(), None)))
    kept = load_model_state(fresh, fp_sd, strict=True)
    assert sorted(kept) == ["0.wq.s", "3.wq.s", "6.wq.s"]
    with pytest.raises(QreproError, match="unexpected"):
        load_model_state(_net(), {**fp_sd, "extra.weight": torch.zeros(1)}, strict=True)


def test_fp_method_and_bit_checks():
    m = prepare(_net(), build_method("fp", 32, 32))
    assert not list(quantized_layers(m))
    with pytest.raises(QreproError, match="bit-width 9"):
        check_bits("x", 9, 4, [2, 3, 4])
    with pytest.raises(QreproError, match="unknown quantizer"):
        build_method("nope", 4, 4)


# ------------------------------------------------------------------------------------- ste.clip
@pytest.mark.parametrize("signed", [0.0, 1.0])
def test_clip_equals_the_where_formulation_in_value_and_gradient(signed: float) -> None:
    """``ste.clip`` (masks recomputed in backward) == ``where(x >= hi, hi, where(x <= lo, lo, x))``, float64,
    including values exactly on the bounds, a scalar bound shared by all elements and a per-element bound."""
    from qrepro.quant.ste import clip

    d = torch.float64
    x = torch.linspace(-3, 3, 61, dtype=d)  # hits -2, 0 and 2 exactly
    g = torch.randn(61, dtype=d, generator=torch.Generator().manual_seed(0))
    for alpha0 in (torch.tensor(2.0, dtype=d), torch.full((61,), 2.0, dtype=d)):
        outs = []
        for f in ("where", "clip"):
            xx = x.clone().requires_grad_()
            a = alpha0.clone().requires_grad_()
            lo = -a * signed
            y = torch.where(xx >= a, a, torch.where(xx <= lo, lo, xx)) if f == "where" else clip(xx, lo, a)
            outs.append((y, *torch.autograd.grad(y, (xx, a), g)))
        for ref, got in zip(outs[0], outs[1]):
            assert torch.equal(ref, got)
    xx = x.clone().requires_grad_()
    a = torch.tensor(2.0, dtype=d, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t, s: clip(t, -s * signed, s), (xx + 0.013, a))  # off the kinks
