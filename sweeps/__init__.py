"""Optuna studies over lmexp fit configs: ``python -m sweeps run|worker|report``.

A sweep file names the fit config(s) and a search space keyed by the options ``lmexp fit``
takes; each trial is an ``lmexp fit`` run (built by ``lmexp.runs.build``) in its own process,
tracked in MLflow under the study's run. See ``sweeps.spec`` for the file's format.
"""

from sweeps.spec import SweepSpec, load_spec, parse_spec

__all__ = ["SweepSpec", "load_spec", "parse_spec"]
