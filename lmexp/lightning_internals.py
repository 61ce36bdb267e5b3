"""Every use lmexp makes of Lightning's private API, in one place.

Each function names the private attribute it reads or overrides and why no public hook does the
job. ``tests/test_lightning_internals.py`` exercises each against the installed Lightning, so an
upgrade that changes one fails there, loudly, rather than somewhere in a run;
``pyproject.toml`` bounds ``lightning`` to the versions tested. Nothing else in lmexp touches an
underscore attribute of Lightning.
"""

from __future__ import annotations

# ------------------------------------------------------------------ trainer, loops, checkpoints

# ------------------------------------------------------------------ LightningCLI
