"""A tiny name -> factory registry whose unknown-name error lists the known names, and the registry of converters
for foreign checkpoint formats (methods register them; the engine applies them when loading)."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterable
from typing import Any

from qrepro.errors import QreproError


class Registry:
    def __init__(self, kind: str, config_group: str | None = None) -> None:
        self.kind = kind
        self.config_group = config_group or kind
        self._items: dict[str, Callable[..., Any]] = {}

    def register(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def deco(obj: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> Callable[..., Any]:
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items))
            raise QreproError(
                f"unknown {self.kind} {name!r}; choose one of: {known} "
                f"(e.g. {self.config_group}={next(iter(sorted(self._items)), '?')})"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items


_imported: set[str] = set()


def import_submodules(package: str, path: Iterable[str]) -> None:
    """Import every module of a package once, so that its ``@REG.register`` decorators run."""
    if package in _imported:
        return
    for mod in pkgutil.iter_modules(path):
        importlib.import_module(f"{package}.{mod.name}")
    _imported.add(package)


# fn(state_dict) -> converted state_dict, or None when it does not recognise the format
Converter = Callable[[dict[str, Any]], "dict[str, Any] | None"]
CONVERTERS: list[tuple[str, Converter]] = []


def register_converter(name: str) -> Callable[[Converter], Converter]:
    """Register a converter for a foreign checkpoint format (e.g. the APoT authors' release)."""

    def deco(fn: Converter) -> Converter:
        CONVERTERS.append((name, fn))
        return fn

    return deco
