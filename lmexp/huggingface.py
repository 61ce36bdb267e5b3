"""Deprecated: transformers folders are ``lmexp.formats.huggingface``, and ``export_checkpoint``
is ``lmexp.checkpoints.export_checkpoint``."""

from __future__ import annotations

from typing import Any

from lmexp import checkpoints, deprecation
from lmexp.checkpoints import export_checkpoint
from lmexp.formats import huggingface as formats_huggingface
from lmexp.formats.huggingface import *
from lmexp.formats.huggingface import __all__ as _moved

deprecation.warn_moved("lmexp.huggingface", "lmexp.formats.huggingface")

__all__ = [*_moved, "export_checkpoint"]  # noqa: PLE0604  (the moved module's names, and one more)


def __getattr__(name: str) -> Any:
    """Any other name the old module had (``log``, ``IGNORED``, ``LoadedModel``...), with a warning
    naming where it is now."""
    homes = [checkpoints] if name in checkpoints.__all__ else [formats_huggingface, checkpoints]
    for module in homes:
        if name in vars(module) and not name.startswith("__"):
            deprecation.warn_moved(f"lmexp.huggingface.{name}", f"{module.__name__}.{name}")
            return vars(module)[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
