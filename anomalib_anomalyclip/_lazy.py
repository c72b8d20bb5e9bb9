"""Lazy public names for packages that must stay cheap to import."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_attributes(
    namespace: dict[str, Any], names: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """Build a package's ``__getattr__`` and ``__dir__`` that import public names on first access.

    Args:
        namespace: the package's ``globals()``; imported names are cached there.
        names: public name -> module that defines it.

    Returns:
        ``(__getattr__, __dir__)`` for the package module.
    """
    package = namespace["__name__"]

    def __getattr__(name: str) -> Any:  # noqa: N807 - the module protocol's name
        module_name = names.get(name)
        if module_name is None:
            msg = f"module {package!r} has no attribute {name!r}"
            raise AttributeError(msg)
        value = getattr(importlib.import_module(module_name), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:  # noqa: N807 - the module protocol's name
        return sorted(set(namespace) | set(names))

    return __getattr__, __dir__
