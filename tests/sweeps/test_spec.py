"""Sweep files and search spaces: parsing, checks against the fit schema, one-line errors."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState, create_trial

from lmexp.errors import ConfigError
from sweeps.samplers import choose_sampler
from sweeps.spec import load_spec, parse_spec
from sweeps.study import (
    FAIL_REASON_ATTR,
    INTERRUPTED,
    check_space,
    counted_trials,
    create_or_resume,
    make_pruner,
    open_storage,
    param_name,
    suggest,
)
from sweeps.worker import objective_values
from tests.sweeps.conftest import SIZES, write_sweep

BASE = {"fit": {"config": ["fit.yaml"]}}


def spec_with(space=None, **settings):
    return parse_spec({**BASE, "space": space or {"model.init_args.lr": {"low": 1e-3, "high": 1e-2}}, **settings})


@pytest.mark.parametrize("space, settings, expected", [
    ({"model.init_args.lr": {"choices": []}}, {}, "choice list is empty"),
    ({"size": {"type": "group", "choices": {}}}, {}, "choice list is empty"),
    ({"model.init_args.lr": {"low": 0.1, "high": 0.01}}, {}, "low=0.1 is greater than high=0.01"),
    ({"model.init_args.lr": {"low": 0.0, "high": 0.01, "log": True}}, {}, "log scale needs low > 0"),
    ({"model.init_args.lr": {"low": "1e-3", "high": 0.01}}, {}, "is not a number"),
    ({"model.init_args.lr": {"low": 1e-3}}, {}, "give 'low' and 'high'"),
    ({"model.init_args.lr": {"low": 1e-3, "high": 1e-2, "step": 1e-3, "log": True}}, {}, "cannot be combined"),
    (None, {"pruner": {"name": "median"}, "objectives": ["val/loss", "n_parameters"]}, "pruning needs a single objective"),
    (None, {"sampler": {"name": "annealing"}}, "sampler 'annealing' unknown"),
    (None, {"n_trials": 0}, "n_trials=0 must be a positive integer"),
    (None, {"trials": 3}, "sweep setting(s) trials unknown"),
    (None, {"objectives": [{"metric": "val/loss", "direction": "down"}]}, "direction='down' must be minimize or maximize"),
    (None, {"objectives": ["seconds_to_target"]}, "objective seconds_to_target needs a target"),
    (None, {"target": {"metric": "val/loss", "value": "low"}}, "with a numeric value"),
    (None, {"target": {"value": 1.9, "when": "early"}}, "target: unknown setting(s) when"),
    (None, {"target": {"value": 0.9, "direction": "up"}}, "direction='up' must be minimize or maximize"),
    (None, {"constraints": [{"metric": "n_parameters"}]}, "constraint n_parameters: give 'max' and/or 'min'"),
    (None, {"constraints": [{"metric": "n_parameters", "max": 2e6, "below": 1}]},
     "constraint n_parameters: unknown setting(s) below"),
    (None, {"constraints": [{"metric": "val/acc", "min": 0.9, "max": 0.5}]}, "min=0.9 is greater than max=0.5: swap them"),
    (None, {"constraints": [{"metric": "n_parameters", "max": "2e6"}]}, "max='2e6' is not a finite number"),
    (None, {"constraints": [{"max": 2.0e6}]}, "expected {metric: n_parameters, max: 2.0e6}"),
    (None, {"constraints": "n_parameters < 2e6"}, "expected a list such as"),
    (None, {"constraints": [{"metric": "train_seconds", "max": 60}, {"metric": "train_seconds", "min": 5}]},
     "constraints name train_seconds twice"),
    (None, {"constraints": [{"metric": "seconds_to_target", "max": 60}]}, "constraint seconds_to_target needs a target"),
    (None, {"constraints": [{"metric": "val/acc", "min": 0.5, "max": 0.9}]}, "say which value is the best"),
    (None, {"constraints": [{"metric": "val/loss", "max": 2.0, "direction": "maximize"}]},
     "differs from its objective's (minimize)"),
    (None, {"constraints": [{"metric": "val/loss", "max": 2.0, "reduce": "mean"}]}, "reduce='mean' must be best or last"),
    (None, {"constraints": [{"metric": "n_parameters", "max": 2.0e6}], "sampler": {"name": "cmaes"}},
     "sampler cmaes ignores constraints"),
])
def test_bad_sweep_files_are_one_line_errors(space, settings, expected):
    with pytest.raises(ConfigError) as caught:
        spec_with(space, **settings)
    assert expected in str(caught.value)
    assert "\n" not in str(caught.value)


def test_constraints_are_parsed_kept_and_part_of_the_study_identity():
    spec = spec_with(constraints=[{"metric": "n_parameters", "max": 2.0e6}, {"metric": "val/acc", "min": 0.5},
                                  {"metric": "val/loss", "max": 3, "reduce": "last"}])
    budget, accuracy, loss = spec.constraints
    assert (budget.max, budget.min, budget.describe()) == (2.0e6, None, "n_parameters <= 2e+06")
    assert (accuracy.direction, accuracy.describe()) == ("maximize", "0.5 <= val/acc")  # its best is its highest
    assert (loss.direction, loss.reduce, loss.max) == ("minimize", "last", 3.0)  # as its objective
    assert type(spec).from_dict(spec.to_dict()).constraints == spec.constraints
    # A constraint changes which trial is best: the same study name with another one is another study.
    assert spec.space_signature() != spec_with().space_signature()
    assert spec_with(constraints={"metric": "n_parameters", "max": 2.0e6}).constraints == [budget]
    # A sweep file that names no sampler lets the space choose: GP here, TPE where it has choices or groups.
    default = parse_spec({**BASE, "space": {"model.init_args.lr": {"low": 1e-3, "high": 1e-2}}, "n_trials": 20})
    assert default.sampler == {"name": "auto"} and choose_sampler(default)[0] == "gp"


def test_a_missing_sweep_file_names_itself(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_spec(tmp_path / "nope.yaml")


def test_ranges_choices_and_groups_become_fit_overrides():
    spec = parse_spec({"fit": {"config": ["fit.yaml"], "overrides": {"trainer.max_steps": 7}}, "space": {
        "model.init_args.lr": {"low": 1e-4, "high": 1e-2, "log": True},
        "model.init_args.warmup_steps": {"low": 0, "high": 20, "step": 5},
        "model.init_args.betas": {"choices": [[0.9, 0.95], [0.9, 0.99]]},
        "size": {"choices": SIZES},
    }})
    assert [p.kind for p in spec.params] == ["float", "int", "categorical"]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    for _ in range(8):
        trial = study.ask()
        overrides = suggest(trial, spec)
        assert overrides["trainer.max_steps"] == 7
        assert 1e-4 <= overrides["model.init_args.lr"] <= 1e-2
        assert overrides["model.init_args.warmup_steps"] in (0, 5, 10, 15, 20)
        assert overrides["model.init_args.betas"] in ([0.9, 0.95], [0.9, 0.99])
        size = SIZES[trial.params["size"]]
        assert {k: overrides[k] for k in size} == size  # a group's fields are chosen together
        assert set(trial.params) == {"model.lr", "model.warmup_steps", "model.betas", "size"}
        study.tell(trial, 1.0)
    assert param_name("model.init_args.network_overrides.n_layer") == "model.n_layer"


def test_sampler_and_pruner_options_are_checked():
    assert isinstance(make_pruner(spec_with(pruner={"name": "hyperband", "min_resource": 10})),
                      optuna.pruners.HyperbandPruner)
    with pytest.raises(ConfigError, match="pruner median: .*patience"):
        make_pruner(spec_with(pruner={"name": "median", "patience": 3}))


def test_every_key_and_group_is_checked_against_the_fit_schema(workdir):
    assert check_space(load_spec(write_sweep(workdir)))["model"]["init_args"]["network"] == "gpt-tiny"
    bad_key = write_sweep(workdir, "bad-key", space={"model.init_args.learning_rate": {"low": 1e-3, "high": 1e-2}})
    with pytest.raises(ConfigError) as caught:
        check_space(load_spec(bad_key))
    assert "no option 'learning_rate'" in str(caught.value) and "\n" not in str(caught.value)
    bad_size = write_sweep(workdir, "bad-size", space={"size": {"choices": {
        "fine": SIZES["small"], "odd": {**SIZES["small"], "model.init_args.network_overrides.n_head": 3}}}})
    with pytest.raises(ConfigError, match=r"n_embd=16 is not divisible by n_head=3.*size=odd"):
        check_space(load_spec(bad_size))
    bad_value = write_sweep(workdir, "bad-value", space={"data.init_args.batch_size": {"choices": [4, "many"]}})
    with pytest.raises(ConfigError, match="batch_size"):
        check_space(load_spec(bad_value))


def test_unreachable_storage_is_one_line_without_the_password():
    with pytest.raises(ConfigError) as caught:
        open_storage("postgresql://lmexp:secret@127.0.0.1:9/nowhere", heartbeat_seconds=None)
    message = str(caught.value)
    assert "cannot be reached" in message and "secret" not in message and "\n" not in message
    with pytest.raises(ConfigError, match="is not a URL"):
        open_storage("optuna.db")


def test_a_study_name_taken_by_another_space_is_refused(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    storage = open_storage(url)
    first = spec_with(study="s")
    create_or_resume(first, storage, url, resume=False)
    with pytest.raises(ConfigError, match="exists .* with 0 trials: continue it with --resume"):
        create_or_resume(first, storage, url, resume=False)
    assert create_or_resume(first, storage, url, resume=True).study_name == "s"
    other = spec_with({"model.init_args.lr": {"low": 1e-4, "high": 1e-2}}, study="s")
    with pytest.raises(ConfigError, match="with another search space: resume it .* or give this one another name"):
        create_or_resume(other, storage, url, resume=True)
    with pytest.raises(ConfigError, match="no study 'new'"):
        create_or_resume(spec_with(study="new"), storage, url, resume=True)


def test_retried_and_interrupted_trials_do_not_count_towards_n_trials():
    done = create_trial(state=TrialState.COMPLETE, value=1.0)
    stale = create_trial(state=TrialState.FAIL)
    retry = create_trial(state=TrialState.WAITING, system_attrs={"failed_trial": 1})
    interrupted = create_trial(state=TrialState.FAIL, user_attrs={FAIL_REASON_ATTR: INTERRUPTED})
    crashed = create_trial(state=TrialState.FAIL, user_attrs={FAIL_REASON_ATTR: "exit status 1"})
    assert RetryHeartbeatStaleTrialCallback.retried_trial_number(retry) == 1
    # The waiting retry must still be run: the stale trial it repeats leaves its place free.
    assert counted_trials([done, stale, retry, interrupted, crashed]) == 2
    running = create_trial(state=TrialState.RUNNING, system_attrs={"failed_trial": 1})
    assert counted_trials([done, stale, running, interrupted, crashed]) == 3


def test_objective_values_come_from_metrics_or_measures():
    spec = spec_with(objectives=[{"metric": "val/loss"}, {"metric": "n_parameters"}])
    result = {"best": {"val/loss": 1.5}, "last": {"val/loss": 1.6}, "n_parameters": 1000}
    assert objective_values(spec, result) == ([1.5, 1000.0], "")
    last = spec_with(objectives=[{"metric": "val/loss", "reduce": "last"}])
    assert objective_values(last, result) == ([1.6], "")
    values, reason = objective_values(spec_with(objectives=["val/acc"]), result)
    assert values == [] and "'val/acc' was never logged" in reason


def test_a_target_is_reached_from_its_side_and_survives_the_trip_to_a_trial():
    spec = spec_with(objectives=["seconds_to_target"], target={"metric": "val/loss", "value": 1.9})
    assert spec.target.reached(1.9) and spec.target.reached(1.5) and not spec.target.reached(1.91)
    accuracy = spec_with(target={"metric": "val/acc", "value": 0.8, "direction": "maximize"}).target
    assert accuracy.reached(0.85) and not accuracy.reached(0.7)
    assert type(spec).from_dict(spec.to_dict()).target == spec.target
    assert spec.space_signature() != spec_with(objectives=["seconds_to_target"], target={"value": 1.8}).space_signature()


def test_the_shipped_sweep_files_check_against_their_fit_configs(monkeypatch):
    root = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(root)
    for path in sorted((root / "configs" / "sweeps").glob("*.yaml")):
        spec = load_spec(path)
        if spec.overrides.get("model.init_args.pretrained") == "path/to/transformers-folder":
            continue  # the user's encoder: checked with a real folder in tests/objectives/test_schedule_recipes.py
        config = check_space(spec)
        assert config["trainer"]["max_steps"] > 0 or config["trainer"]["max_epochs"] > 0, path.name


def test_a_study_with_tracking_off_records_nothing_and_goes_on(tmp_path):
    from sweeps.study import TrialOutcome as Outcome
    from sweeps.tracking import StudyRun

    run = StudyRun.attach(spec_with(tracking_uri=False), "a-parent-run")
    study = optuna.create_study()
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=2)
    run.trial_finished(study, Outcome(1, TrialState.COMPLETE, [0.5], "", 1.0, {"run_id": "a-trial-run"}))
    run.log_artifacts(tmp_path)
    run.end()
    assert run.client is None and run.run_id is None


def test_the_old_path_of_a_trial_outcome_still_works_and_warns():
    import sweeps.worker
    from sweeps.study import TrialOutcome

    with pytest.warns(DeprecationWarning, match="sweeps.study.TrialOutcome"):
        assert sweeps.worker.Outcome is TrialOutcome
