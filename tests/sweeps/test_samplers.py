"""The sampler chosen per space, and constraints: stored where Optuna's samplers read them."""

from __future__ import annotations

import math
import warnings

import optuna
import pytest
from optuna.trial import TrialState

from lmexp.errors import ConfigError
from sweeps.samplers import (
    INFEASIBLE_ATTR,
    best_trials,
    choose_sampler,
    constraint_values,
    constraint_watch,
    describe_sampler,
    exhausted,
    infeasible_before_training,
    is_feasible,
    make_sampler,
    record_constraints,
    untrained_values,
)
from sweeps.spec import param_name, parse_spec
from sweeps.study import suggest
from tests.sweeps.conftest import SIZES

optuna.logging.set_verbosity(optuna.logging.WARNING)
BASE = {"fit": {"config": ["fit.yaml"]}}
LR = {"model.init_args.lr": {"low": 1e-4, "high": 1e-2, "log": True}}
BUDGET = [{"metric": "n_parameters", "max": 2.0e6}]


def spec_with(space=None, **settings):
    return parse_spec({**BASE, "space": space or LR, **settings})


# ------------------------------------------------------------------------------ auto sampler
def test_auto_picks_gp_for_a_small_numeric_space_and_tpe_otherwise():
    numeric = {**LR, "model.init_args.warmup_steps": {"low": 0, "high": 200, "step": 50}}
    gp = spec_with(numeric, sampler={"name": "auto", "seed": 0, "n_startup_trials": 3}, n_trials=30)
    assert choose_sampler(gp)[0] == "gp"
    assert isinstance(make_sampler(gp), optuna.samplers.GPSampler)
    assert describe_sampler(gp).startswith("sampler: GP (auto: 2 numeric options")
    many = {f"model.init_args.x{i}": {"low": 0.0, "high": 1.0} for i in range(11)}
    for space, settings, why in [
        ({**LR, "size": {"choices": SIZES}}, {}, "group size"),
        ({**LR, "data.init_args.batch_size": {"choices": [4, 8]}}, {}, "choices of data.batch_size"),
        (many, {}, "11 options"),
        (LR, {"pruner": {"name": "median"}}, "pruner median"),
        (LR, {"objectives": ["val/loss", "n_parameters"]}, "2 objectives"),
        (LR, {"n_trials": 101}, "n_trials=101 (GP up to 100 trials)"),
        (LR, {"n_trials": None, "timeout": 600}, "no n_trials"),
    ]:
        spec = spec_with(space, sampler={"name": "auto", "seed": 0}, **{"n_trials": 20, **settings})
        name, reason = choose_sampler(spec)
        assert name == "tpe" and why in reason, (why, reason)
        assert isinstance(make_sampler(spec), optuna.samplers.TPESampler)
        assert f"TPE (auto: {reason[len('auto: '):]}" in describe_sampler(spec)
    named = spec_with(numeric, sampler={"name": "tpe", "seed": 3})
    assert choose_sampler(named) == ("tpe", "named in the sweep file")
    assert describe_sampler(named) == "sampler: TPE (named in the sweep file), seed 3"


def test_auto_takes_only_the_options_tpe_and_gp_share():
    with pytest.raises(ConfigError) as caught:
        make_sampler(spec_with(sampler={"name": "auto", "multivariate": True}))
    assert "option(s) multivariate unknown: auto takes seed and n_startup_trials" in str(caught.value)
    assert make_sampler(spec_with(sampler={"name": "auto", "n_startup_trials": 2}))._n_startup_trials == 2


def test_workers_get_consecutive_seeds():
    assert make_sampler(spec_with(sampler={"name": "tpe", "seed": 4}), worker_index=1)._rng.rng.randint(10**9) == \
        make_sampler(spec_with(sampler={"name": "tpe", "seed": 5}))._rng.rng.randint(10**9)
    with pytest.raises(ConfigError, match="sampler tpe: .*n_startup"):
        make_sampler(spec_with(sampler={"name": "tpe", "n_startup": 3}))


def test_the_grid_sampler_walks_the_grid_and_then_says_it_is_exhausted():
    spec = spec_with({"model.init_args.warmup_steps": {"low": 0, "high": 10, "step": 5}, "size": {"choices": SIZES}},
                     sampler={"name": "grid"})
    study = optuna.create_study(sampler=make_sampler(spec))
    seen = set()
    while not exhausted(study):
        trial = study.ask()
        suggest(trial, spec)
        seen.add((trial.params[param_name("model.init_args.warmup_steps")], trial.params["size"]))
        study.tell(trial, 0.0)
    assert seen == {(w, s) for w in (0, 5, 10) for s in SIZES} and len(study.trials) == 6
    assert not exhausted(optuna.create_study(sampler=make_sampler(spec_with())))
    with pytest.raises(ConfigError, match="grid sampler needs"):
        make_sampler(spec_with(sampler={"name": "grid"}))


# ------------------------------------------------------------------------------- constraints
def test_constraint_values_are_relative_excesses_satisfied_at_or_below_zero():
    spec = spec_with(constraints=[{"metric": "n_parameters", "max": 2.0e6}, {"metric": "train_seconds", "min": 10},
                                  {"metric": "val/acc", "min": 0.5, "max": 0.9, "reduce": "last"}])
    within = {"n_parameters": 1.5e6, "train_seconds": 20.0, "best": {"val/acc": 0.95}, "last": {"val/acc": 0.8}}
    assert constraint_values(spec, within) == pytest.approx([-0.25, -1.0, -0.1 / 0.9])
    over = {"n_parameters": 2.5e6, "train_seconds": 5.0, "last": {"val/acc": 0.99}}
    assert constraint_values(spec, over) == pytest.approx([0.25, 0.5, 0.09 / 0.9])
    assert constraint_values(spec, {**within, "n_parameters": 2.0e6})[0] == 0.0  # on the bound: satisfied
    # A measure the trial lacks: a trained trial breaks the bound, an untrained one sits on it.
    assert constraint_values(spec, {"n_parameters": 1.0e6}) == [-0.5, math.inf, math.inf]
    assert constraint_values(spec, {"n_parameters": 3.0e6}, trained=False) == [0.5, 0.0, 0.0]
    assert constraint_values(spec_with(), within) is None


def test_a_constraint_on_a_logged_metric_is_collected_by_the_trial():
    spec = spec_with(objectives=["val/loss"], constraints=[{"metric": "val/acc", "min": 0.5},
                                                           {"metric": "val/loss", "max": 3.0}, *BUDGET])
    watched = constraint_watch(spec)
    assert [(o.metric, o.direction, o.reduce) for o in watched] == [("val/acc", "maximize", "best")]


def test_recorded_constraints_are_what_optuna_reads_and_a_feasible_trial_is_best():
    spec = spec_with(constraints=BUDGET)
    study = optuna.create_study()
    for n_parameters, loss in [(3.0e6, 1.0), (1.0e6, 2.0), (1.9e6, 1.5)]:
        trial = study.ask()
        trial.suggest_float("x", 0, 1)
        reason = record_constraints(trial, spec, {"n_parameters": n_parameters})
        assert bool(reason) == (n_parameters > 2.0e6)
        study.tell(trial, loss)
    first = study.trials[0]
    assert first.constraints == {"n_parameters": pytest.approx(0.5)}
    assert first.user_attrs[INFEASIBLE_ATTR] == "n_parameters=3e+06 > max 2e+06"
    assert [is_feasible(t) for t in study.trials] == [False, True, True]
    assert study.best_trial.number == 2 and best_trials(study)[0].number == 2  # not trial 0's lower loss
    assert record_constraints(study.ask(), spec_with(), {"n_parameters": 1}) == ""


def test_no_feasible_trial_means_no_best_trial_and_pareto_fronts_keep_feasible_ones():
    spec = spec_with(constraints=BUDGET)
    study = optuna.create_study()
    trial = study.ask()
    record_constraints(trial, spec, {"n_parameters": 5.0e6})
    study.tell(trial, 0.1)
    assert best_trials(study) == []
    multi = spec_with(objectives=["val/loss", "n_parameters"], constraints=BUDGET)
    pareto = optuna.create_study(directions=multi.directions)
    for n_parameters, loss in [(3.0e6, 1.0), (1.0e6, 2.0), (1.5e6, 1.8)]:
        trial = pareto.ask()
        record_constraints(trial, multi, {"n_parameters": n_parameters})
        pareto.tell(trial, [loss, n_parameters])
    assert sorted(t.number for t in best_trials(pareto)) == [1, 2]


def test_a_model_over_a_known_budget_is_stopped_before_training():
    spec = spec_with(constraints=[{"metric": "n_parameters", "max": 2.0e6}, {"metric": "train_seconds", "max": 60}])
    assert infeasible_before_training(spec, 2_500_000) == "n_parameters=2.5e+06 > max 2e+06: not trained"
    assert infeasible_before_training(spec, 2_000_000) is None
    assert infeasible_before_training(spec_with(constraints=[{"metric": "n_parameters", "min": 1.0e5}]), 50_000) == \
        "n_parameters=5e+04 < min 1e+05: not trained"
    assert infeasible_before_training(spec_with(constraints=[{"metric": "train_seconds", "max": 1}]), 10**9) is None
    assert untrained_values(spec_with(objectives=[{"metric": "val/loss"}, {"metric": "val/acc",
                                                                          "direction": "maximize"}])) == \
        [math.inf, -math.inf]


def _constrained_search(sampler: optuna.samplers.BaseSampler, spec, record: bool, trials: int,
                        untrained: bool = False) -> optuna.Study:
    """Minimise a loss falling with x, under a parameter count also growing with x: the unconstrained
    optimum (x = 1) is 3x over the budget; the best feasible point is x = 0.5."""
    study = optuna.create_study(sampler=sampler)
    for _ in range(trials):
        trial = study.ask()
        x = trial.suggest_float("x", 0.0, 1.0)
        y = trial.suggest_float("y", 0.0, 1.0)
        measured = {"n_parameters": 4.0e6 * x, "best": {"val/loss": 2.0 - x + 0.2 * (y - 0.5) ** 2}}
        stop = untrained and infeasible_before_training(spec, measured["n_parameters"])
        if record:
            record_constraints(trial, spec, measured, trained=not stop)
        study.tell(trial, untrained_values(spec) if stop else measured["best"]["val/loss"])
    return study


@pytest.mark.filterwarnings("ignore:Clip non-finite values")  # GP clips the untrained trials' inf: meant
@pytest.mark.parametrize("name, trials, untrained", [("tpe", 30, False), ("tpe", 30, True), ("gp", 16, True)])
def test_samplers_keep_to_the_feasible_region_once_told(name, trials, untrained):
    spec = spec_with({"model.init_args.x": {"low": 0.0, "high": 1.0}, "model.init_args.y": {"low": 0.0, "high": 1.0}},
                     sampler={"name": name, "seed": 1, "n_startup_trials": 6}, constraints=BUDGET)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # no deprecated constraints_func
        told = _constrained_search(make_sampler(spec), spec, record=True, trials=trials, untrained=untrained)
    untold = _constrained_search(make_sampler(spec), spec, record=False, trials=trials)

    def feasible_share(study: optuna.Study) -> float:
        later = study.trials[6:]
        return sum(t.params["x"] <= 0.5 for t in later) / len(later)

    # The best feasible point lies on the bound, so about half of the proposals near it fall over;
    # untold, the sampler walks away to x = 1.
    assert feasible_share(told) >= feasible_share(untold) + 0.3
    assert untold.best_trial.params["x"] > 0.5
    best = told.best_trial
    assert best.params["x"] <= 0.5 and best.value >= 1.5
    assert all(t.state == TrialState.COMPLETE for t in told.trials)
