"""Old import paths that keep working for one release, with a DeprecationWarning naming the new one.

A module whose names moved declares ``MOVED = {"name": "new.module", ...}`` and
``__getattr__ = moved_names(__name__, MOVED)``; a module that moved whole becomes a shim that
calls ``warn_moved`` (with the default ``stacklevel``) and re-exports the new module.
``tests/test_layering.py`` reads every ``MOVED`` table as imports, so an old path can only point
down the layers, like any import.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["moved_names", "warn_moved"]


def warn_moved(old: str, new: str, stacklevel: int = 3) -> None:
    """Warn that ``old`` moved to ``new``, blaming the caller of the function that calls this.

    Called at a shim's top level, that caller is the line importing the shim (``warnings`` skips
    the import machinery's frames). Python's default filters show a DeprecationWarning only when
    it blames code in __main__, so one that blamed the shim itself would never be seen.
    """
    warnings.warn(f"{old} is deprecated and goes in the next release: use {new}", DeprecationWarning,
                  stacklevel=stacklevel)


def moved_names(module: str, moved: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` serving the names in ``moved`` (name -> the module that now holds it)."""

    def __getattr__(name: str) -> Any:
        if name not in moved:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        warn_moved(f"{module}.{name}", f"{moved[name]}.{name}")
        return getattr(importlib.import_module(moved[name]), name)

    return __getattr__
