"""Deprecated: ``lmexp.predict`` is ``lmexp.verbs.predict``."""

from __future__ import annotations

from lmexp.deprecation import warn_moved

# Blames the line that imports this module (or this file, run as python -m lmexp.predict).
warn_moved("lmexp.predict", "lmexp.verbs.predict", stacklevel=2 if __name__ == "__main__" else 3)

from lmexp.verbs.predict import *
from lmexp.verbs.predict import __all__  # noqa: F401

if __name__ == "__main__":
    import sys

    run(sys.argv[1:])
