"""Deprecated: ``lmexp.cleanup`` is ``lmexp.verbs.clean``."""

from __future__ import annotations

from lmexp.deprecation import warn_moved

warn_moved("lmexp.cleanup", "lmexp.verbs.clean")

from lmexp.verbs.clean import *
from lmexp.verbs.clean import __all__  # noqa: F401
