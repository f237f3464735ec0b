"""ASAM: adaptive sharpness-aware minimisation (Kwon et al., ICML 2021), used by the SymReg/SatNL paper
to pre-train its FP models (supplement Table 1A: ρ = 1, or 0.2 for MobileNet-V3).

One step (Kwon et al., Eq. 9 / Algorithm 1), with T_w = diag(|w| + η) element-wise:
    g   = ∇L(w)
    ε   = ρ · T_w² g / (‖T_w g‖₂ + 1e-16)   (one norm over all parameters)
    g'  = ∇L(w + ε)
    w  ← base_optimizer_step(w, g')         (SGD with momentum here; weight decay applied by the base)
``adaptive=False`` gives plain SAM (T_w = I).

Which parameters get the adaptive scale (``scale_scope``): ``"weights"`` (default) follows the ASAM reference
implementation (SamsungLabs/ASAM, ``asam.py``): T = |w| + η only for parameters whose qualified name contains
"weight" (conv/linear and normalisation weights); every other parameter (biases, quantizer parameters) is
perturbed SAM-style with T = 1 and still enters the one shared norm. ``"all"`` applies T = |w| + η to every
parameter. Contract with the training loop (engine/loop.py): the loop has
already run forward/backward at w (the gradients g are in ``p.grad``) and, because this optimizer sets
``needs_closure = True``, passes a closure that zeroes the gradients, recomputes the loss (with the method's
regularizer) and backpropagates; ``step`` calls it once, at w + ε. Note: BatchNorm running statistics see
both passes (as in the ASAM/SAM reference implementations).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from qrepro.errors import QreproError
from qrepro.optim import OPTIMIZERS, torch_kwargs

#: ``weights``: adaptive scale on parameters named "*weight*", T = 1 elsewhere (reference); ``all``: everywhere
SCALE_SCOPES = ("weights", "all")


class ASAM(torch.optim.Optimizer):
    """Wraps a base optimizer; shares its ``param_groups`` so schedulers act on the base learning rates."""

    needs_closure = True

    def __init__(
        self,
        base: torch.optim.Optimizer,
        rho: float = 1.0,
        eta: float = 0.01,
        adaptive: bool = True,
        scale_scope: str = "weights",
        model: nn.Module | None = None,
    ):
        if not rho > 0:
            raise QreproError(f"ASAM rho must be > 0, got {rho}")
        if eta < 0:
            raise QreproError(f"ASAM eta must be >= 0, got {eta}")
        if scale_scope not in SCALE_SCOPES:
            raise QreproError(f"ASAM scale_scope={scale_scope!r}; choose one of: {', '.join(SCALE_SCOPES)}")
        self.base = base
        self.rho, self.eta, self.adaptive = float(rho), float(eta), bool(adaptive)
        self.scale_scope = scale_scope
        super().__init__(base.param_groups, dict(rho=self.rho, eta=self.eta))
        self.param_groups = base.param_groups
        self.state = base.state
        self._eps: dict[torch.Tensor, torch.Tensor] = {}
        self._scaled = self._scaled_params(model) if adaptive and scale_scope == "weights" else None

    def _scaled_params(self, model: nn.Module | None) -> set[int]:
        """ids of the parameters that get T = |w| + η: qualified name contains "weight" (the reference's rule).
        Names come from ``model`` or from the groups' ``param_names`` (set by ``build_optimizer``)."""
        if model is not None:
            names = {id(p): n for n, p in model.named_parameters()}
        else:
            names = {}
            for g in self.param_groups:
                pn = g.get("param_names") or []
                if len(pn) != len(g["params"]):
                    raise QreproError(
                        "ASAM with scale_scope=weights needs parameter names: pass model=... "
                        "(or scale_scope='all' to scale every parameter)"
                    )
                names.update({id(p): n for p, n in zip(g["params"], pn)})
        return {id(p) for g in self.param_groups for p in g["params"] if "weight" in names.get(id(p), "")}

    def _scale(self, p: torch.Tensor) -> torch.Tensor | None:
        """T for ``p`` (None = identity)."""
        if not self.adaptive or (self._scaled is not None and id(p) not in self._scaled):
            return None
        return p.abs() + self.eta

    @torch.no_grad()
    def _perturb(self) -> None:
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not params:
            return
        scales = [self._scale(p) for p in params]
        tg = [p.grad if t is None else t * p.grad for t, p in zip(scales, params)]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x) for x in tg]))
        factor = self.rho / (norm + 1e-16)
        for p, t, x in zip(params, scales, tg):
            e = x * t * factor if t is not None else x * factor  # ρ T² g / ‖T g‖
            p.add_(e)
            self._eps[p] = e

    @torch.no_grad()
    def _restore(self) -> None:
        for p, e in self._eps.items():
            p.sub_(e)
        self._eps.clear()

    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:  # type: ignore[override]
        """Perturb with the gradients already in ``p.grad``, re-evaluate through ``closure`` at w + ε, restore
        w and take the base step with ∇L(w + ε). Returns the loss at w + ε."""
        if closure is None:
            raise QreproError("ASAM needs a closure (zero_grad, forward, backward, return loss) in step()")
        self._perturb()
        try:
            with torch.enable_grad():
                loss = closure()
        finally:
            self._restore()
        self.base.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.base.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base.load_state_dict(state_dict)
        self.param_groups = self.base.param_groups
        self.state = self.base.state


def _asam_factory(adaptive: bool):
    def factory(
        groups, *, model=None, rho: float = 1.0, eta: float = 0.01, scale_scope: str = "weights", **cfg
    ) -> ASAM:
        torch_kwargs("asam_sgd" if adaptive else "sam_sgd", cfg, "sgd", also=("rho", "eta", "scale_scope"))
        base = OPTIMIZERS.get("sgd")(groups, model=model, **cfg)
        return ASAM(base, rho=rho, eta=eta, adaptive=adaptive, scale_scope=scale_scope, model=model)

    return factory


OPTIMIZERS.register("asam_sgd")(_asam_factory(adaptive=True))
OPTIMIZERS.register("sam_sgd")(_asam_factory(adaptive=False))
