"""Model zoo: full-precision models registered by name in ``MODELS``.

Every model uses plain ``nn.Conv2d`` / ``nn.Linear`` / ``nn.BatchNorm2d`` modules so that
``qrepro.quant.prepare`` can swap the conv/linear layers later. Two layout rules hold for every model
(tested in tests/test_models.py):

- the stem (first) conv is the first ``nn.Conv2d``/``nn.Linear`` in ``named_modules()`` order;
- the classifier is the *last* ``nn.Linear`` in ``named_modules()`` order.

Every module in this package is imported here (pkgutil), so a new model is one new file with
``@MODELS.register("name")`` plus ``configs/model/<name>.yaml``.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from qrepro.errors import QreproError
from qrepro.registry import Registry, import_submodules

MODELS = Registry("model")


def build_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """Build the registered model ``name`` with a ``num_classes``-way classifier.

    ``kwargs`` are the model's options (``configs/model/<name>.yaml`` minus ``name``). Unknown or
    missing options raise a one-line QreproError listing the valid ones.
    """
    factory = MODELS.get(name)
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise QreproError(f"num_classes must be a positive integer, got {num_classes!r} (model={name})")
    sig = inspect.signature(factory)
    try:
        sig.bind(num_classes, **kwargs)
    except TypeError as e:
        valid = ", ".join(p for p in sig.parameters if p != "num_classes") or "none"
        raise QreproError(f"bad options for model={name}: {e} (valid options: {valid})") from None
    return factory(num_classes, **kwargs)


def model_names() -> list[str]:
    """Sorted names of all registered models."""
    return MODELS.names()


import_submodules(__name__, __path__)
