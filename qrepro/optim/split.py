"""``optimizer=sgd_adam``: SGD for the network, Adam for the parameter groups flagged ``adam: true``.

Several QAT recipes train the quantizer parameters with their own Adam optimizer next to SGD for the weights
(EWGS; Nagel et al.: ``--sep-quant-optimizer --quant-optimizer Adam``). One optimizer with both update rules keeps
one set of param groups, so the LR schedule, checkpoints and param-group rules work unchanged:

```yaml
optimizer:
  name: sgd_adam
  lr: 1.0e-2
  momentum: 0.9
  weight_decay: 1.0e-4
  groups:
    - {tags: [ewgs_interval, ewgs_scale], adam: true, lr: 1.0e-5, weight_decay: 0.0}
```

Adam groups follow ``torch.optim.Adam`` (L2 weight decay added to the gradient, bias-corrected moments,
``betas``/``eps`` per group, defaults (0.9, 0.999) and 1e-8); SGD groups are ``torch.optim.SGD``'s own step.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from qrepro.errors import QreproError
from qrepro.optim import OPTIMIZERS, TORCH_OPTIMIZERS, _strip, keep_names, torch_kwargs

SGD_KEYS = TORCH_OPTIMIZERS["sgd"][1]
ADAM_KEYS = {"adam", "betas", "eps", "fixed_lr"}  # fixed_lr: the LR schedule leaves the group alone


class SGDAdam(torch.optim.SGD):
    """torch.optim.SGD whose groups with ``adam=True`` take Adam steps instead."""

    def __init__(self, params: Any, **defaults: Any) -> None:
        super().__init__(params, **defaults)
        for g in self.param_groups:
            g.setdefault("adam", False)
            if g["adam"]:
                g["betas"] = tuple(g.get("betas", (0.9, 0.999)))
                g.setdefault("eps", 1e-8)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = self.param_groups
        self.param_groups = [g for g in groups if not g["adam"]]
        try:
            super().step()
        finally:
            self.param_groups = groups
        for g in groups:
            if g["adam"]:
                self._adam_group(g)
        return loss

    def _adam_group(self, g: dict[str, Any]) -> None:
        beta1, beta2 = g["betas"]
        for p in g["params"]:
            if p.grad is None:
                continue
            grad = p.grad
            if g["weight_decay"] != 0:
                grad = grad.add(p, alpha=g["weight_decay"])
            st = self.state[p]
            if "step" not in st:
                st["step"] = torch.zeros((), dtype=torch.float32)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["step"] += 1
            step = float(st["step"])
            st["exp_avg"].lerp_(grad, 1 - beta1)
            st["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            bias1 = 1 - beta1**step
            bias2_sqrt = math.sqrt(1 - beta2**step)
            denom = (st["exp_avg_sq"].sqrt() / bias2_sqrt).add_(g["eps"])
            p.addcdiv_(st["exp_avg"], denom, value=-g["lr"] / bias1)


@OPTIMIZERS.register("sgd_adam")
def build_sgd_adam(groups: list[dict[str, Any]], *, model: nn.Module | None = None, **cfg: Any) -> SGDAdam:
    cfg = torch_kwargs("sgd_adam", cfg, "sgd")
    if not any(g.get("adam") for g in groups):
        raise QreproError(
            "optimizer=sgd_adam: no parameter group has adam: true; add one, e.g. "
            "groups: [{tags: [quant], adam: true, lr: 1.0e-5}]"
        )
    return keep_names(SGDAdam(_strip(groups, SGD_KEYS | ADAM_KEYS), **cfg), groups)
