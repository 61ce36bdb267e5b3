"""Deprecated: ``lmexp.chaos`` is ``lmexp.verbs.chaos``."""

from __future__ import annotations

from lmexp.deprecation import warn_moved

warn_moved("lmexp.chaos", "lmexp.verbs.chaos")

from lmexp.verbs.chaos import *
from lmexp.verbs.chaos import __all__  # noqa: F401
