"""Deprecated: transformers folders are ``lmexp.formats.huggingface``, and ``export_checkpoint``
is ``lmexp.checkpoints.export_checkpoint``."""

from __future__ import annotations

from lmexp.deprecation import warn_moved

warn_moved("lmexp.huggingface", "lmexp.formats.huggingface", stacklevel=2)

from lmexp.checkpoints import export_checkpoint
from lmexp.formats.huggingface import *
from lmexp.formats.huggingface import __all__ as _moved

__all__ = [*_moved, "export_checkpoint"]  # noqa: PLE0604  (the moved module's names, and one more)
