"""The study's sampler, chosen per search space, and the constraints that make trials infeasible.

``sampler: {name: auto}`` (the default) picks Optuna's GP sampler for a small continuous space
and a bounded budget, and TPE otherwise. GP (Gaussian-process Bayesian optimisation) models the objective over the whole
space and finds a good region in fewer trials than TPE when every searched option is a number
and there are few of them; it reads only complete trials (a pruned trial is invisible to it) and
has no model for a named model size. TPE handles choices, groups, pruned trials and several
objectives. For several objectives ``auto`` keeps TPE rather than NSGA-II: NSGA-II's first
generation (``population_size``, 50 by default) is sampled at random, more trials than a sweep
of tens of trials runs.

Constraints follow Optuna 5: each trial's constraint values are stored with
``Trial.set_constraint`` before it is told (a value <= 0 is satisfied), and TPE, GP and NSGA-II
read them from every trial they learn from (TPE: complete and pruned trials; GP and NSGA-II:
complete ones). The samplers' ``constraints_func`` argument is deprecated since Optuna 5.0 and is
not used: it would store the same values a second time, under the old ``constraints`` key, and
each violation would count twice. ``Study.best_trial`` and ``Study.best_trials`` then return
feasible trials only.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from lmexp.errors import ConfigError
from sweeps.spec import MEASURES, Objective, SweepSpec, param_name

GP_MAX_DIMS = 10
"""The most searched options for which ``auto`` picks GP: its model and acquisition search grow
with the dimension, and beyond about ten TPE is as good for the budgets sweeps run."""
GP_MAX_TRIALS = 100
"""The longest study for which ``auto`` picks GP: its ask grows with the trials it has seen (about
0.3-0.5 s at 30-90 trials, 1.3 s at 110, 2 threads), where TPE's stays well under a second."""
AUTO_OPTIONS = ("seed", "n_startup_trials")
"""The options ``sampler: {name: auto}`` passes on: those TPE and GP both take."""
INFEASIBLE_ATTR = "infeasible"
"""User attribute of a trial outside a constraint: why (``n_parameters=2.5e+06 > max 2e+06``)."""

# An infeasible trial stopped before training is told with the worst value (+inf or -inf); GP
# clips it to the worst finite value, as intended, and warns on every trial it samples.
warnings.filterwarnings("ignore", message="Clip non-finite values to the min/max finite values for GP")


# ------------------------------------------------------------------------------- which sampler
def choose_sampler(spec: SweepSpec) -> tuple[str, str]:
    """The sampler the spec runs and why: ``("gp", "auto: 2 numeric options, ...")``."""
    name = spec.sampler["name"]
    if name != "auto":
        return name, "named in the sweep file"
    reasons = []
    if spec.multi_objective:
        reasons.append(f"{len(spec.objectives)} objectives")
    if spec.groups:
        reasons.append(f"group {spec.groups[0].name}")
    categorical = [p.name for p in spec.params if p.kind == "categorical"]
    if categorical:
        reasons.append(f"choices of {param_name(categorical[0])}")
    dims = len(spec.params) + len(spec.groups)
    if dims > GP_MAX_DIMS:
        reasons.append(f"{dims} options (GP up to {GP_MAX_DIMS})")
    if spec.pruning:
        reasons.append(f"pruner {spec.pruner['name']} (GP does not learn from pruned trials)")
    if spec.n_trials is None or spec.n_trials > GP_MAX_TRIALS:
        budget = f"n_trials={spec.n_trials}" if spec.n_trials else "no n_trials"
        reasons.append(f"{budget} (GP up to {GP_MAX_TRIALS} trials)")
    if reasons:
        return "tpe", f"auto: {', '.join(reasons)}"
    kinds = sorted({p.kind for p in spec.params})
    return "gp", (f"auto: {dims} numeric option{'s' if dims != 1 else ''} ({'/'.join(kinds)}), one objective, "
                  f"no pruner, {spec.n_trials} trials")


def describe_sampler(spec: SweepSpec) -> str:
    """One line for the terminal: ``sampler: GP (auto: 2 numeric options, ...), seed 0``."""
    name, why = choose_sampler(spec)
    options = {k: v for k, v in spec.sampler.items() if k != "name"}
    shown = "".join(f", {k} {v}" for k, v in options.items())
    constrained = ""
    if spec.constraints:
        bounds = "; ".join(c.describe() for c in spec.constraints)
        constrained = f"; constraints {bounds}" + (" (not used to sample: random and grid ignore them)"
                                                   if name in ("random", "grid") else "")
    return f"sampler: {name.upper() if name in ('tpe', 'gp') else name} ({why}){shown}{constrained}"


def make_sampler(spec: SweepSpec, worker_index: int = 0) -> optuna.samplers.BaseSampler:
    """The spec's sampler (``auto`` resolved). Each worker gets its own seed (seed + worker index),
    so workers that start together do not propose the same trials."""
    options = dict(spec.sampler)
    requested = options.pop("name")
    name, _ = choose_sampler(spec)
    if requested == "auto":
        extra = sorted(set(options) - set(AUTO_OPTIONS))
        if extra:
            raise ConfigError(f"sampler auto: option(s) {', '.join(extra)} unknown: auto takes "
                              f"{' and '.join(AUTO_OPTIONS)} (name tpe or gp to set others)")
    seed = options.pop("seed", None)
    if seed is not None:
        seed = int(seed) + worker_index
    samplers = {
        "tpe": optuna.samplers.TPESampler,
        "random": optuna.samplers.RandomSampler,
        "gp": optuna.samplers.GPSampler,
        "cmaes": optuna.samplers.CmaEsSampler,
        "nsga2": optuna.samplers.NSGAIISampler,
    }
    if name == "grid":
        grid = {param_name(p.name): p.grid() for p in spec.params}
        grid.update({g.name: list(g.choices) for g in spec.groups})
        return construct("sampler", name, GridSampler, {"search_space": grid, "seed": seed, **options})
    if name == "cmaes":
        try:
            import cmaes  # noqa: F401
        except ImportError:
            raise ConfigError("sampler cmaes needs the cmaes package: pip install cmaes") from None
    return construct("sampler", name, samplers[name], {"seed": seed, **options})


class GridSampler(optuna.samplers.GridSampler):
    """Optuna's grid sampler, for workers that ask and tell. After a trial Optuna's only calls
    ``Study.stop`` when the grid is done, which works only inside ``Study.optimize``; a worker
    asks ``exhausted`` before each trial instead."""

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
        pass


def exhausted(study: optuna.Study) -> bool:
    """True when the study's sampler has nothing left to propose (a finished grid)."""
    return isinstance(study.sampler, optuna.samplers.GridSampler) and study.sampler.is_exhausted(study)


def construct(kind: str, name: str, factory: Any, options: dict[str, Any]) -> Any:
    try:
        return factory(**options)
    except TypeError as err:
        raise ConfigError(f"{kind} {name}: {err} (the options are those of {factory.__module__}.{factory.__name__})") from None
    except ValueError as err:
        raise ConfigError(f"{kind} {name}: {err}") from None


# -------------------------------------------------------------------------------- constraints
def constraint_watch(spec: SweepSpec) -> list[Objective]:
    """The logged metrics a trial must collect for the constraints, beyond its objectives (with
    the direction that makes their 'best' value)."""
    watched = {o.metric for o in spec.objectives} | ({spec.target.metric} if spec.target else set())
    return [Objective(c.metric, c.direction, c.reduce) for c in spec.constraints
            if c.metric not in MEASURES and c.metric not in watched]


def _measure(measured: Mapping[str, Any], metric: str, reduce: str) -> float | None:
    value = measured.get(metric) if metric in MEASURES else (measured.get(reduce) or {}).get(metric)
    if value is None or isinstance(value, bool):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def constraint_values(spec: SweepSpec, measured: Mapping[str, Any], trained: bool = True) -> list[float] | None:
    """One value per constraint of the spec, in its order (<= 0: satisfied; > 0: the excess as a
    fraction of the bound); None when the spec has no constraints.

    ``measured`` is what a trial writes (``n_parameters``, ``train_seconds``, ``best``/``last``
    metrics). A measure it lacks is a violation (+inf) for a trained trial: a bound nobody checked
    is not met. For a trial stopped before training (``trained=False``) the measures training
    would have made count as 0.0, on the bound, so that only the known ones decide; every trial
    then carries every constraint, which GP needs.
    """
    if not spec.constraints:
        return None
    values = []
    for constraint in spec.constraints:
        value = _measure(measured, constraint.metric, constraint.reduce)
        values.append(constraint.excess(value) if value is not None else math.inf if trained else 0.0)
    return values


def violations(spec: SweepSpec, measured: Mapping[str, Any], trained: bool = True) -> list[str]:
    """The constraints a trial breaks, each as people read it: ``n_parameters=2.5e+06 > max 2e+06``."""
    broken = []
    for constraint, excess in zip(spec.constraints, constraint_values(spec, measured, trained) or []):
        if excess <= 0:
            continue
        value = _measure(measured, constraint.metric, constraint.reduce)
        if value is None:
            broken.append(f"{constraint.metric} was not measured")
        elif constraint.max is not None and value > constraint.max:
            broken.append(f"{constraint.metric}={value:.4g} > max {constraint.max:.4g}")
        else:
            broken.append(f"{constraint.metric}={value:.4g} < min {constraint.min:.4g}")
    return broken


def record_constraints(trial: optuna.Trial | FrozenTrial, spec: SweepSpec, measured: Mapping[str, Any],
                       trained: bool = True) -> str:
    """Store the trial's constraint values where Optuna's samplers read them; call it before
    ``study.tell`` (a told trial cannot be changed). Returns why the trial is infeasible, or ""."""
    values = constraint_values(spec, measured, trained)
    if values is None:
        return ""
    for constraint, value in zip(spec.constraints, values):
        trial.set_constraint(constraint.metric, value)
    reason = "; ".join(violations(spec, measured, trained))
    if reason:
        trial.set_user_attr(INFEASIBLE_ATTR, reason)
    return reason


def infeasible_before_training(spec: SweepSpec, n_parameters: int | None) -> str | None:
    """Why a model of ``n_parameters`` breaks a constraint known before it trains, or None: such a
    trial is stopped at its start and told with ``untrained_values`` (see ``record_constraints``)."""
    if n_parameters is None or not any(c.metric == "n_parameters" for c in spec.constraints):
        return None
    broken = [v for v in violations(spec, {"n_parameters": n_parameters}, trained=False)]
    return f"{'; '.join(broken)}: not trained" if broken else None


def untrained_values(spec: SweepSpec) -> list[float]:
    """The objective values of an infeasible trial that was not trained: the worst possible.

    It is told COMPLETE with these and its constraints: TPE ranks it among the infeasible by how
    far over its bound it is (its value unread), NSGA-II puts it behind every feasible trial, GP
    clips the value to the worst one seen and models the constraint. PRUNED would hide it from GP
    and NSGA-II, which read complete trials only, and FAIL from every sampler: each would propose
    the same too-large model again.
    """
    return [math.inf if o.direction == "minimize" else -math.inf for o in spec.objectives]


def is_feasible(trial: FrozenTrial) -> bool:
    """True when every constraint of the trial is satisfied (or it has none): Optuna's rule."""
    return all(value <= 0 for value in trial.constraints.values())


def best_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The best feasible trial (one objective) or the feasible Pareto front (several); [] when no
    trial is complete and feasible. Optuna 5's ``best_trial`` and ``best_trials`` skip infeasible
    trials themselves; this only spares callers the ValueError."""
    if len(study.directions) > 1:
        return study.best_trials
    try:
        return [study.best_trial]
    except ValueError:
        return []
