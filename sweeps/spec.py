"""A sweep file: the fit config(s) a study trains, its search space, objectives, sampler and pruner.

The search space is keyed by the dotted names ``lmexp fit`` takes as flags, so whatever a fit
config can set, a sweep can search::

    study: shakespeare-lr-size
    fit:
      config: [configs/shakespeare_char.yaml]
    objectives: [{metric: val/loss, direction: minimize}]
    constraints: [{metric: n_parameters, max: 2.0e6}]   # trials over it are infeasible, not failed
    n_trials: 16
    sampler: {name: tpe, seed: 0}
    pruner: {name: hyperband, min_resource: 100}
    space:
      model.init_args.lr: {low: 1.0e-3, high: 2.0e-2, log: true}
      data.init_args.batch_size: {choices: [12, 24]}
      size:                      # a group: fields chosen together, by name
        choices:
          small: {model.init_args.network_overrides.n_layer: 2, model.init_args.network_overrides.n_embd: 96}

This module reads and checks the file; it imports neither Optuna nor Lightning.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from lmexp.errors import ConfigError

SAMPLERS = ("auto", "tpe", "random", "grid", "gp", "cmaes", "nsga2")
DEFAULT_SAMPLER = "auto"
"""The sampler of a sweep file that names none (``auto`` picks GP or TPE per space: sweeps.samplers)."""
PRUNERS = ("none", "median", "successive_halving", "hyperband", "threshold")
DIRECTIONS = ("minimize", "maximize")
# Measures every trial reports besides its logged metrics: the cost side of a Pareto front.
MEASURES = ("n_parameters", "train_seconds", "seconds_to_target")


@dataclass(frozen=True)
class Param:
    """One searched value: a float or int range, or a list of choices."""

    name: str
    kind: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()

    def probe_values(self) -> list[Any]:
        """Values that exercise the whole range when checked against the fit schema."""
        if self.kind == "categorical":
            return list(self.choices)
        cast = int if self.kind == "int" else float
        return [cast(self.low), cast(self.high)]

    def grid(self) -> list[Any]:
        """Every value, for the grid sampler: choices, or the range walked in steps."""
        if self.kind == "categorical":
            return list(self.choices)
        if self.step is None and self.kind == "float":
            raise ConfigError(f"space.{self.name}: the grid sampler needs 'choices' or a 'step' for a float range")
        step = self.step or 1
        count = int(math.floor((self.high - self.low) / step + 1e-9)) + 1
        values = [self.low + i * step for i in range(count)]
        return [int(v) for v in values] if self.kind == "int" else [round(v, 12) for v in values]


@dataclass(frozen=True)
class Group:
    """Named settings chosen together (a model size: layers, width and heads that fit each other)."""

    name: str
    choices: dict[str, dict[str, Any]]

    def keys(self) -> list[str]:
        return sorted({key for fields in self.choices.values() for key in fields})


@dataclass(frozen=True)
class Objective:
    metric: str = "val/loss"
    direction: str = "minimize"
    reduce: Literal["best", "last"] = "best"
    """best: the best value of any validation (what the best checkpoint scored); last: the final one."""


@dataclass(frozen=True)
class Target:
    """A value of a logged metric that ends a trial: the first validation reaching it stops the run
    and its training time so far (validation excluded) is the trial's ``seconds_to_target``."""

    metric: str = "val/loss"
    value: float = 0.0
    direction: str = "minimize"
    """minimize: reached at or below ``value``; maximize: at or above."""

    def reached(self, measured: float) -> bool:
        return measured <= self.value if self.direction == "minimize" else measured >= self.value


@dataclass(frozen=True)
class Constraint:
    """A bound on a measure or logged metric: a trial outside it is infeasible (told to the study
    with its value, never taken for the best), not failed."""

    metric: str
    max: float | None = None
    min: float | None = None
    reduce: Literal["best", "last"] = "best"
    """For a logged metric: its best value over the validations, or the last one (as objectives)."""
    direction: str = "minimize"
    """What 'best' means for a logged metric: that of the objective of the same metric, else
    minimize for a ``max`` bound and maximize for a ``min`` bound."""

    def excess(self, value: float) -> float:
        """How far ``value`` is outside the bounds, as a fraction of the bound it crosses (Optuna's
        convention: <= 0 is satisfied). Relative, so the violations of a parameter count and of a
        loss add up sensibly in TPE's and NSGA-II's ranking of infeasible trials."""
        excesses = []
        if self.max is not None:
            excesses.append((value - self.max) / (abs(self.max) or 1.0))
        if self.min is not None:
            excesses.append((self.min - value) / (abs(self.min) or 1.0))
        return max(excesses)

    def describe(self) -> str:
        """``n_parameters <= 2e+06``, ``0.8 <= val/acc``: the bound as people read it."""
        low = f"{self.min:.4g} <= " if self.min is not None else ""
        high = f" <= {self.max:.4g}" if self.max is not None else ""
        return f"{low}{self.metric}{high}"


@dataclass
class SweepSpec:
    """A parsed, checked sweep file."""

    study: str
    configs: list[str]
    overrides: dict[str, Any] = field(default_factory=dict)
    params: list[Param] = field(default_factory=list)
    groups: list[Group] = field(default_factory=list)
    objectives: list[Objective] = field(default_factory=lambda: [Objective()])
    n_trials: int | None = None
    timeout: float | None = None
    sampler: dict[str, Any] = field(default_factory=lambda: {"name": DEFAULT_SAMPLER})
    pruner: dict[str, Any] = field(default_factory=lambda: {"name": "none"})
    workers: int = 1
    threads: int | None = None
    storage: str | None = None
    tracking_uri: str | None = None
    source: str | None = None
    target: Target | None = None
    constraints: list[Constraint] = field(default_factory=list)
    keep_checkpoints: bool = False  # pruned, failed and infeasible trials keep their checkpoints and export
    sampler_named: bool = True  # False when the file names no sampler: a resumed study keeps its own

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    @property
    def directions(self) -> list[str]:
        return [objective.direction for objective in self.objectives]

    @property
    def pruning(self) -> bool:
        return self.pruner.get("name", "none") != "none"

    def space_signature(self) -> str:
        """What makes two sweeps the same study: configs, fixed overrides, space and objectives."""
        described = {
            "configs": self.configs,
            "overrides": self.overrides,
            "params": [asdict(p) for p in self.params],
            "groups": [asdict(g) for g in self.groups],
            "objectives": [asdict(o) for o in self.objectives],
            **({"target": asdict(self.target)} if self.target else {}),
            # Another constraint is another problem (another best trial), and GP reads only studies
            # whose complete trials all carry the same constraints.
            **({"constraints": [asdict(c) for c in self.constraints]} if self.constraints else {}),
        }
        return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        """The spec as plain data (what a trial process is given, and what the study stores)."""
        return {
            "study": self.study, "configs": self.configs, "overrides": self.overrides,
            "params": [asdict(p) for p in self.params], "groups": [asdict(g) for g in self.groups],
            "objectives": [asdict(o) for o in self.objectives], "n_trials": self.n_trials, "timeout": self.timeout,
            "sampler": self.sampler, "pruner": self.pruner, "workers": self.workers, "threads": self.threads,
            "storage": self.storage, "tracking_uri": self.tracking_uri, "source": self.source,
            "target": asdict(self.target) if self.target else None,
            "constraints": [asdict(c) for c in self.constraints], "keep_checkpoints": self.keep_checkpoints,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SweepSpec:
        values = dict(data)
        values["params"] = [Param(**{**p, "choices": tuple(p.get("choices", ()))}) for p in values.get("params", [])]
        values["groups"] = [Group(**g) for g in values.get("groups", [])]
        values["objectives"] = [Objective(**o) for o in values.get("objectives", [])]
        values["target"] = Target(**values["target"]) if values.get("target") else None
        values["constraints"] = [Constraint(**c) for c in values.get("constraints") or []]
        return cls(**values)


def load_spec(path: str | Path) -> SweepSpec:
    """Read and check a sweep file (the fit schema is checked later, by ``sweeps.study.check_space``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file {str(path)!r} does not exist: pass a YAML file such as "
                          "configs/sweeps/shakespeare-lr-size.yaml")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"sweep file {str(path)!r} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"sweep file {str(path)!r} must be a mapping of settings (study, fit, space, ...)")
    return parse_spec(data, default_study=path.stem, source=str(path))


_TOP_LEVEL = {"study", "fit", "space", "objectives", "n_trials", "timeout", "sampler", "pruner", "workers", "threads",
              "storage", "tracking_uri", "target", "constraints", "keep_checkpoints"}


def parse_spec(data: Mapping[str, Any], default_study: str = "sweep", source: str | None = None) -> SweepSpec:
    unknown = sorted(set(data) - _TOP_LEVEL)
    if unknown:
        raise ConfigError(f"sweep setting(s) {', '.join(unknown)} unknown: valid ones are {', '.join(sorted(_TOP_LEVEL))}")
    fit = data.get("fit") or {}
    if not isinstance(fit, dict) or not fit.get("config"):
        raise ConfigError("sweep: 'fit: {config: [FILE, ...]}' must name the fit config(s) the trials train")
    configs = fit["config"] if isinstance(fit["config"], list) else [fit["config"]]
    extra = sorted(set(fit) - {"config", "overrides"})
    if extra:
        raise ConfigError(f"sweep fit setting(s) {', '.join(extra)} unknown: use 'config' and 'overrides'")
    overrides = dict(fit.get("overrides") or {})
    params, groups = parse_space(data.get("space"))
    objectives = [_objective(o) for o in (data.get("objectives") or [{}])]
    metrics = [o.metric for o in objectives]
    if len(set(metrics)) != len(metrics):
        raise ConfigError(f"sweep objectives name a metric twice: {metrics}")
    target = _target(data.get("target"))
    if "seconds_to_target" in metrics and target is None:
        raise ConfigError("objective seconds_to_target needs a target: add 'target: {metric: val/loss, value: 1.9}'")
    n_trials = data.get("n_trials")
    timeout = data.get("timeout")
    if n_trials is not None and (not isinstance(n_trials, int) or n_trials < 1):
        raise ConfigError(f"n_trials={n_trials!r} must be a positive integer")
    if timeout is not None and (not isinstance(timeout, (int, float)) or timeout <= 0):
        raise ConfigError(f"timeout={timeout!r} must be a positive number of seconds")
    constraints = _constraints(data.get("constraints"), objectives, target)
    sampler = _named("sampler", data.get("sampler") or {"name": DEFAULT_SAMPLER}, SAMPLERS)
    if constraints and sampler["name"] == "cmaes":
        raise ConfigError("sampler cmaes ignores constraints: use auto, tpe, gp or nsga2, which keep to feasible regions")
    pruner = _named("pruner", data.get("pruner") or {"name": "none"}, PRUNERS)
    if pruner["name"] != "none" and len(objectives) > 1:
        raise ConfigError("pruning needs a single objective (Optuna prunes on one reported value): "
                          "set 'pruner: {name: none}' or keep one objective")
    workers = data.get("workers", 1)
    if not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"workers={workers!r} must be a positive integer")
    threads = data.get("threads")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"threads={threads!r} must be a positive integer")
    keep_checkpoints = data.get("keep_checkpoints", False)
    if not isinstance(keep_checkpoints, bool):
        raise ConfigError(f"keep_checkpoints={keep_checkpoints!r} must be true or false")
    study = str(data.get("study") or default_study)
    if not study.strip() or "/" in study:
        raise ConfigError(f"study name {study!r} must be non-empty and contain no '/'")
    return SweepSpec(
        study=study, configs=[str(c) for c in configs], overrides=overrides, params=params, groups=groups,
        objectives=objectives, n_trials=n_trials, timeout=timeout, sampler=sampler, pruner=pruner, workers=workers,
        threads=threads, storage=data.get("storage"), tracking_uri=data.get("tracking_uri"), source=source,
        target=target, constraints=constraints, keep_checkpoints=keep_checkpoints,
        sampler_named=data.get("sampler") is not None,
    )


def parse_space(space: Any) -> tuple[list[Param], list[Group]]:
    if not isinstance(space, dict) or not space:
        raise ConfigError("sweep: 'space' must map fit options (model.init_args.lr, ...) to ranges or choices")
    params: list[Param] = []
    groups: list[Group] = []
    for name, value in space.items():
        if not isinstance(value, dict):
            raise ConfigError(f"space.{name}: expected {{low: .., high: ..}} or {{choices: [...]}}, got {value!r}")
        kind = value.get("type")
        choices = value.get("choices")
        if kind == "group" or (isinstance(choices, dict)):
            groups.append(_group(name, choices))
        else:
            params.append(_param(name, value))
    keys = [p.name for p in params] + [k for g in groups for k in g.keys()]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise ConfigError(f"space: {', '.join(repeated)} searched twice (as an option and in a group, or in two groups)")
    return params, groups


def _param(name: str, value: dict[str, Any]) -> Param:
    allowed = {"type", "low", "high", "log", "step", "choices"}
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise ConfigError(f"space.{name}: unknown setting(s) {', '.join(unknown)}; use {', '.join(sorted(allowed))}")
    if "choices" in value:
        choices = value["choices"]
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"space.{name}: the choice list is empty: give at least one value, e.g. choices: [12, 24]")
        return Param(name, "categorical", choices=tuple(choices))
    if "low" not in value or "high" not in value:
        raise ConfigError(f"space.{name}: give 'low' and 'high' (a range) or 'choices' (a list)")
    low, high = value["low"], value["high"]
    for bound, number in (("low", low), ("high", high)):
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise ConfigError(f"space.{name}: {bound}={number!r} is not a number (write 1.0e-3, not 1e-3 without a dot)")
    kind = value.get("type") or ("int" if isinstance(low, int) and isinstance(high, int) and not value.get("log")
                                 and isinstance(value.get("step", 1), int) else "float")
    if kind not in ("float", "int"):
        raise ConfigError(f"space.{name}: type={kind!r} must be float, int, categorical or group")
    if low > high:
        raise ConfigError(f"space.{name}: low={low} is greater than high={high}: swap them")
    log = bool(value.get("log", False))
    if log and low <= 0:
        raise ConfigError(f"space.{name}: a log scale needs low > 0, got low={low}: use a small positive low such as 1.0e-5")
    step = value.get("step")
    if step is not None and (isinstance(step, bool) or not isinstance(step, (int, float)) or step <= 0):
        raise ConfigError(f"space.{name}: step={step!r} must be a positive number")
    if step is not None and log:
        raise ConfigError(f"space.{name}: 'step' and 'log: true' cannot be combined (Optuna allows one or the other)")
    return Param(name, kind, low=low, high=high, log=log, step=step)


def _group(name: str, choices: Any) -> Group:
    if not isinstance(choices, dict) or not choices:
        raise ConfigError(f"space.{name}: a group needs named choices, e.g. choices: {{small: {{KEY: VALUE, ...}}, ...}}; "
                          "the choice list is empty")
    for label, fields in choices.items():
        if not isinstance(fields, dict) or not fields:
            raise ConfigError(f"space.{name}.{label}: expected a mapping of fit options to values, got {fields!r}")
    return Group(name, {str(label): dict(fields) for label, fields in choices.items()})


def _objective(value: Any) -> Objective:
    if isinstance(value, str):
        value = {"metric": value}
    if not isinstance(value, dict):
        raise ConfigError(f"objective {value!r}: expected {{metric: val/loss, direction: minimize}}")
    unknown = sorted(set(value) - {"metric", "direction", "reduce"})
    if unknown:
        raise ConfigError(f"objective: unknown setting(s) {', '.join(unknown)}; use metric, direction and reduce")
    objective = Objective(**value)
    if objective.direction not in DIRECTIONS:
        raise ConfigError(f"objective {objective.metric}: direction={objective.direction!r} must be minimize or maximize")
    if objective.reduce not in ("best", "last"):
        raise ConfigError(f"objective {objective.metric}: reduce={objective.reduce!r} must be best or last")
    return objective


def _target(value: Any) -> Target | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("value"), (int, float)) or isinstance(value["value"], bool):
        raise ConfigError(f"target {value!r}: expected {{metric: val/loss, value: 1.9}} with a numeric value")
    unknown = sorted(set(value) - {"metric", "value", "direction"})
    if unknown:
        raise ConfigError(f"target: unknown setting(s) {', '.join(unknown)}; use metric, value and direction")
    target = Target(metric=str(value.get("metric", "val/loss")), value=float(value["value"]),
                    direction=value.get("direction", "minimize"))
    if target.direction not in DIRECTIONS:
        raise ConfigError(f"target {target.metric}: direction={target.direction!r} must be minimize or maximize")
    return target


def _constraints(value: Any, objectives: list[Objective], target: Target | None) -> list[Constraint]:
    if value is None:
        return []
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise ConfigError(f"constraints {value!r}: expected a list such as [{{metric: n_parameters, max: 2.0e6}}]")
    constraints = [_constraint(item, objectives, target) for item in value]
    metrics = [c.metric for c in constraints]
    repeated = sorted({m for m in metrics if metrics.count(m) > 1})
    if repeated:
        raise ConfigError(f"constraints name {', '.join(repeated)} twice: give one entry with both min and max")
    return constraints


def _constraint(value: Any, objectives: list[Objective], target: Target | None) -> Constraint:
    if not isinstance(value, dict) or not isinstance(value.get("metric"), str):
        raise ConfigError(f"constraint {value!r}: expected {{metric: n_parameters, max: 2.0e6}} (and/or min: VALUE)")
    metric = value["metric"]
    allowed = {"metric", "max", "min", "reduce", "direction"}
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise ConfigError(f"constraint {metric}: unknown setting(s) {', '.join(unknown)}; use {', '.join(sorted(allowed))}")
    if value.get("max") is None and value.get("min") is None:
        raise ConfigError(f"constraint {metric}: give 'max' and/or 'min', e.g. {{metric: {metric}, max: 2.0e6}}")
    for bound in ("max", "min"):
        number = value.get(bound)
        if number is not None and (isinstance(number, bool) or not isinstance(number, (int, float))
                                   or not math.isfinite(number)):
            raise ConfigError(f"constraint {metric}: {bound}={number!r} is not a finite number "
                              "(write 2.0e6, not 2e6 without a dot)")
    low, high = value.get("min"), value.get("max")
    if low is not None and high is not None and low > high:
        raise ConfigError(f"constraint {metric}: min={low:g} is greater than max={high:g}: swap them")
    if metric == "seconds_to_target" and target is None:
        raise ConfigError("constraint seconds_to_target needs a target: add 'target: {metric: val/loss, value: 1.9}'")
    reduce = value.get("reduce", "best")
    if reduce not in ("best", "last"):
        raise ConfigError(f"constraint {metric}: reduce={reduce!r} must be best or last")
    objective = next((o for o in objectives if o.metric == metric), None)
    direction = value.get("direction") or (objective.direction if objective else None)
    if direction is None:
        if low is not None and high is not None and reduce == "best" and metric not in MEASURES:
            raise ConfigError(f"constraint {metric}: with both min and max, say which value is the best "
                              "(direction: minimize or maximize) or use reduce: last")
        direction = "minimize" if high is not None else "maximize"
    if direction not in DIRECTIONS:
        raise ConfigError(f"constraint {metric}: direction={direction!r} must be minimize or maximize")
    if objective is not None and direction != objective.direction:
        raise ConfigError(f"constraint {metric}: direction={direction} differs from its objective's "
                          f"({objective.direction}): leave it out")
    return Constraint(metric=metric, max=None if high is None else float(high), min=None if low is None else float(low),
                      reduce=reduce, direction=direction)


def param_name(key: str) -> str:
    """How Optuna names a fit option: ``model.init_args.network_overrides.n_layer`` -> ``model.n_layer``,
    short enough for a plot's axis, and unique since a class's options have unique names."""
    return key.replace(".init_args.network_overrides.", ".").replace(".init_args.", ".")


def _named(kind: str, value: Any, names: tuple[str, ...]) -> dict[str, Any]:
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict) or "name" not in value:
        raise ConfigError(f"{kind}: expected {{name: ..., OPTION: VALUE}} with name one of {', '.join(names)}")
    if value["name"] not in names:
        raise ConfigError(f"{kind} {value['name']!r} unknown: choose one of {', '.join(names)}")
    return dict(value)
