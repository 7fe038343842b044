"""Package attributes imported on first use (PEP 562): `import cnnlab` stays cheap, torch comes when it is needed."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_attributes(
    namespace: dict[str, Any], table: Mapping[str, str | Callable[[], Any]]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """A module's `__getattr__` and `__dir__` for `table`.

    Each name maps to where it lives, "module" (the same name there) or "module:name", or to a function computing it.
    """

    def __getattr__(name: str) -> Any:
        target = table.get(name)
        if target is None:
            raise AttributeError(f"module {namespace['__name__']!r} has no attribute {name!r}")
        if callable(target):
            value = target()
        else:
            module, _, attribute = target.partition(":")
            value = getattr(importlib.import_module(module), attribute or name)
        namespace[name] = value  # found directly from now on, without calling __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *table})

    return __getattr__, __dir__
