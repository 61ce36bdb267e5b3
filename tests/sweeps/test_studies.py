"""Whole studies through ``python -m sweeps``: trials as processes, storages, workers, tracking."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow import MlflowClient
from optuna.trial import TrialState

from sweeps.study import open_storage
from tests.sweeps.conftest import SIZES, sweeps_command, write_sweep
from tests.sweeps.trial_callbacks import WAIT_SECONDS


def trials_of(name: str, storage: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=open_storage(storage, heartbeat_seconds=None)).trials


def test_a_study_runs_tracks_reports_and_resumes(workdir, isolated_tracking):
    sweep = write_sweep(workdir, "lr-size", pruner={"name": "median", "n_startup_trials": 1})
    result = sweeps_command("run", "--config", str(sweep))
    storage = f"sqlite:///{workdir / 'optuna.db'}"
    trials = trials_of("lr-size", storage)
    assert len(trials) == 3 and {t.number for t in trials} == {0, 1, 2}
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    first = trials[0]  # never pruned: nothing to compare it with yet
    assert first.state == TrialState.COMPLETE and set(first.intermediate_values) == {10, 20}
    assert first.value == min(first.intermediate_values.values())  # the best validation
    for trial in trials:
        assert (workdir / "runs" / "lr-size" / f"trial-{trial.number:04d}" / "config.yaml").is_file()
        assert trial.user_attrs["n_parameters"] > 0
        overrides = trial.user_attrs["overrides"]
        assert overrides["model.init_args.lr"] == trial.params["model.lr"]
    assert "trial 2 [" in result.stdout and "report in" in result.stdout
    # Pruned trials keep no checkpoints; complete ones keep theirs, and the best is named.
    for trial in trials:
        checkpoints = workdir / "runs" / "lr-size" / f"trial-{trial.number:04d}" / "checkpoints"
        assert checkpoints.exists() == (trial.state == TrialState.COMPLETE), trial.number
        if trial.state == TrialState.COMPLETE:
            assert trial.user_attrs["best_checkpoint"] == str(checkpoints / "best.ckpt")
    assert "disk: " in result.stdout and "best trial" in result.stdout and "best.ckpt" in result.stdout
    log = (workdir / "runs" / "lr-size" / "sweep.log").read_text()
    assert log.count("] complete") + log.count("] pruned") == 3  # progress also in the log file
    report = workdir / "runs" / "lr-size" / "report"
    for name in ("trials.csv", "optimization_history.png", "optimization_history.html", "val_loss_vs_size.png",
                 "slice.png", "intermediate_values.png"):
        assert (report / name).is_file(), name

    client = MlflowClient(isolated_tracking)
    experiment = client.get_experiment_by_name("lr-size")
    runs = client.search_runs([experiment.experiment_id])
    parent = [r for r in runs if r.data.tags.get("sweep.kind") == "study"]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    parent = parent[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(int(r.data.tags["optuna.trial"]) for r in children) == [0, 1, 2]
    assert {r.data.tags["optuna.state"] for r in children} <= {"COMPLETE", "PRUNED"}
    best = min((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.value)
    assert parent.data.metrics["best_value"] == pytest.approx(best.value)
    assert parent.data.tags["best_trial"] == str(best.number)
    assert "optimization_history.png" in {Path(a.path).name for a in client.list_artifacts(parent.info.run_id, "report")}

    # The same name again is refused with the way out; --resume continues to a larger budget.
    again = sweeps_command("run", "--config", str(sweep), check=False)
    assert again.returncode == 2 and "continue it with --resume" in again.stderr
    assert again.stderr.count("\n") == 1
    sweeps_command("run", "--config", str(sweep), "--resume", "--n_trials", "4")
    assert len(trials_of("lr-size", storage)) == 4
    shown = sweeps_command("report", "--study", "lr-size")
    assert "study lr-size" in shown.stdout and "complete" in shown.stdout


def test_a_model_over_the_parameter_budget_is_infeasible_and_not_trained(workdir):
    sweep = write_sweep(workdir, "budget", n_trials=2, tracking_uri=False, sampler={"name": "grid"},
                        space={"size": {"choices": SIZES}}, constraints=[{"metric": "n_parameters", "max": 12000}])
    result = sweeps_command("run", "--config", str(sweep))
    trials = {t.params["size"]: t for t in trials_of("budget", f"sqlite:///{workdir / 'optuna.db'}")}
    small, medium = trials["small"], trials["medium"]
    assert small.user_attrs["n_parameters"] <= 12000 < medium.user_attrs["n_parameters"]  # the budget splits them
    assert small.state == medium.state == TrialState.COMPLETE  # infeasible is not failed
    assert small.constraints["n_parameters"] <= 0 < medium.constraints["n_parameters"]
    assert medium.value == float("inf") and not medium.intermediate_values  # stopped before its first step
    assert "n_parameters" in medium.user_attrs["infeasible"]
    assert not (workdir / "runs" / "budget" / f"trial-{medium.number:04d}" / "checkpoints").exists()
    assert f"trial {medium.number} [size=medium] infeasible, not trained" in result.stdout
    assert "sampler: grid (named in the sweep file)" in result.stdout


def test_a_failing_trial_is_one_failed_trial_not_a_dead_study(workdir):
    # The first source does not exist: its trials fail at data setup; the others train.
    sweep = write_sweep(workdir, "some-fail", n_trials=4, sampler={"name": "grid"},
                        space={"data.init_args.source": {"choices": ["missing.txt", "corpus.txt"]},
                               "model.init_args.lr": {"choices": [1e-3, 3e-3]}})
    sweeps_command("run", "--config", str(sweep))
    trials = trials_of("some-fail", f"sqlite:///{workdir / 'optuna.db'}")
    states = {t.params["data.source"]: set() for t in trials}
    for trial in trials:
        states[trial.params["data.source"]].add(trial.state)
    assert states == {"missing.txt": {TrialState.FAIL}, "corpus.txt": {TrialState.COMPLETE}}
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert all("missing.txt" in t.user_attrs["fail_reason"] for t in failed)
    assert all(Path(t.user_attrs["log"]).is_file() for t in failed)


def with_callbacks(workdir: Path, *callbacks: dict) -> None:
    """Add callbacks (``{"class_path": ..., "init_args": ...}``) to the trials' fit config."""
    fit = yaml.safe_load((workdir / "fit.yaml").read_text())
    fit["trainer"]["callbacks"] = list(callbacks)
    (workdir / "fit.yaml").write_text(yaml.safe_dump(fit))


@pytest.mark.parametrize("target", [10.0, 0.001])
def test_time_to_target_stops_at_the_target_or_counts_a_miss_double(workdir, target):
    # The trial's clock ticks 1 s per training step and 6 s per validation: the measured times
    # follow from the step counts (validations after steps 10 and 20 of 20), on any machine.
    with_callbacks(workdir, {"class_path": "tests.sweeps.trial_callbacks.StepClock",
                             "init_args": {"step_seconds": 1.0, "validation_seconds": 6.0}})
    sweep = write_sweep(workdir, "ttt", n_trials=1, objectives=["seconds_to_target"],
                        target={"metric": "val/loss", "value": target}, space={"model.init_args.lr": {"choices": [3e-3]}})
    sweeps_command("run", "--config", str(sweep))
    (trial,) = trials_of("ttt", f"sqlite:///{workdir / 'optuna.db'}")
    assert trial.state == TrialState.COMPLETE and trial.value == trial.user_attrs["seconds_to_target"]
    if target == 10.0:  # every loss of the run is below 10: it stops at its first validation (step 10 of 20)
        assert trial.user_attrs["reached_target"] is True
        assert trial.value == 10.0  # 10 steps; the validation that found the target left out
        assert trial.user_attrs["train_seconds"] == 10.0 + 6.0  # the whole fit: it stopped there
        assert list(trial.intermediate_values) == [10]  # the target's metric drew the curve
    else:
        assert trial.user_attrs["reached_target"] is False
        assert trial.value == 2 * 20.0  # twice its 20 steps of training, the two validations left out
        assert trial.user_attrs["train_seconds"] == 20.0 + 2 * 6.0
        assert list(trial.intermediate_values) == [10, 20]


def test_several_objectives_give_a_pareto_front(workdir):
    sweep = write_sweep(workdir, "front", n_trials=3, objectives=["val/loss", {"metric": "n_parameters"}])
    sweeps_command("run", "--config", str(sweep))
    trials = trials_of("front", f"sqlite:///{workdir / 'optuna.db'}")
    assert all(len(t.values) == 2 and t.values[1] == t.user_attrs["n_parameters"] for t in trials)
    assert (workdir / "runs" / "front" / "report" / "pareto_front.png").is_file()


@pytest.mark.distributed
def test_pruning_stops_every_rank_of_a_ddp_trial(workdir):
    fit = (workdir / "fit.yaml").read_text().replace("devices: 1", "devices: 2\n  strategy: ddp")
    (workdir / "fit.yaml").write_text(fit)
    # No loss of this model goes below 0.5: the threshold pruner stops the trial at its first validation.
    # keep_checkpoints: the pruned trial keeps the checkpoint its ranks saved together when they stopped.
    sweep = write_sweep(workdir, "ddp", n_trials=1, pruner={"name": "threshold", "upper": 0.5}, keep_checkpoints=True)
    sweeps_command("run", "--config", str(sweep))
    (trial,) = trials_of("ddp", f"sqlite:///{workdir / 'optuna.db'}")
    assert trial.state == TrialState.PRUNED
    assert list(trial.intermediate_values) == [10]
    log = Path(trial.user_attrs["log"]).read_text()
    assert "GLOBAL_RANK: 1" in log  # the trial really trained with two processes
    checkpoints = workdir / "runs" / "ddp" / "trial-0000" / "checkpoints"
    assert (checkpoints / "last.ckpt").is_file()


def _two_workers(workdir: Path, storage: str, name: str, tracking_uri: str) -> None:
    # Each trial waits, before its first step, until two trials have started: two at once are on
    # two workers, so both workers run trials however fast either one is.
    with_callbacks(workdir, {"class_path": "tests.sweeps.trial_callbacks.Rendezvous",
                             "init_args": {"folder": str(workdir / "started"), "parties": 2}})
    sweep = write_sweep(workdir, name, n_trials=5, workers=2, storage=storage)
    result = sweeps_command("run", "--config", str(sweep), timeout=3 * WAIT_SECONDS)  # a guard against a hang
    trials = trials_of(name, storage)
    numbers = [t.number for t in trials]
    assert len(trials) == 5 and sorted(numbers) == list(range(5))  # the count, and no number twice
    assert {t.state for t in trials} == {TrialState.COMPLETE}
    assert {t.user_attrs["worker"] for t in trials} == {"worker 0", "worker 1"}
    assert result.stdout.count("joined study") == 2
    # Both workers tracked into one SQLite MLflow store: no run lost.
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("sweep.kind") == "study"]
    nested = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(int(r.data.tags["optuna.trial"]) for r in nested) == list(range(5))
    assert {r.info.run_id for r in nested} == {t.user_attrs["mlflow_run_id"] for t in trials}


def test_two_workers_share_a_journal_study(workdir, isolated_tracking):
    _two_workers(workdir, f"journal:{workdir / 'optuna.journal'}", "journal", isolated_tracking)


def test_two_workers_share_a_postgresql_study(workdir, postgres_url, isolated_tracking):
    _two_workers(workdir, postgres_url, "postgres", isolated_tracking)


@pytest.mark.fault  # kills a worker: part of the fault-injection suite
@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_a_dead_workers_trial_is_resumed_from_its_checkpoint_under_its_number(workdir, kind):
    storage = f"sqlite:///{workdir / 'optuna.db'}" if kind == "sqlite" else f"journal:{workdir / 'optuna.journal'}"
    held = workdir / "held.pid"  # the first trial to reach step 2 writes it, then trains on only after a SIGTERM
    with_callbacks(workdir, {"class_path": "tests.sweeps.trial_callbacks.HoldUntilSigterm",
                             "init_args": {"marker": str(held), "step": 2}})
    sweep = write_sweep(workdir, "heartbeat", n_trials=2, storage=storage)
    first = subprocess.Popen([sys.executable, "-m", "sweeps", "run", "--config", str(sweep), "--heartbeat", "1"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + WAIT_SECONDS
        while not held.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert held.exists(), "no trial reached step 2"
        (running,) = [t for t in trials_of("heartbeat", storage) if t.state == TrialState.RUNNING]  # the held one
    finally:
        with contextlib.suppress(ProcessLookupError):
            # The worker alone dies without a word: its trial (a session of its own) and the trial server live on.
            os.kill(first.pid, signal.SIGKILL)
        first.communicate()

    # The orphaned trial notices its worker is gone and stops itself (SIGTERM: a checkpoint, then exit).
    trial_pid = int(held.read_text())
    try:
        deadline = time.monotonic() + WAIT_SECONDS
        while alive(trial_pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not alive(trial_pid), "the orphaned trial went on training"
    finally:
        if alive(trial_pid):  # a failed check leaves no trial behind
            os.kill(trial_pid, signal.SIGKILL)
    name = f"trial-{running.number:04d}"
    log = (workdir / "runs" / "heartbeat" / "logs" / f"{name}.log").read_text()
    assert "training stopped by SIGTERM at step 2" in log  # by the stop it was sent, not by an error
    assert (workdir / "runs" / "heartbeat" / name / "checkpoints" / "interrupted.ckpt").is_file()

    # A new worker on this host finds the trial's worker and process gone and resumes it: the same
    # trial, from the checkpoint it saved when it stopped, with what it reported to the pruner.
    reported = dict(running.intermediate_values)
    result = sweeps_command("worker", "--study", "heartbeat", "--storage", storage, "--heartbeat", "1",
                            timeout=3 * WAIT_SECONDS)
    trials = trials_of("heartbeat", storage)
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.COMPLETE]  # no retry trial
    resumed = trials[running.number]
    assert resumed.params == running.params and resumed.user_attrs["resumes"] == 1
    assert resumed.user_attrs["resumed_at_step"] == 2 and "restarted" not in resumed.user_attrs
    assert all(resumed.intermediate_values[step] == value for step, value in reported.items())
    assert f"trial {running.number} resumed from its last checkpoint (its worker" in result.stdout


def alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie, ended but not yet reaped, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def trials_of_safely(name: str, storage: str) -> list:
    try:
        return trials_of(name, storage)
    except (KeyError, ValueError):
        return []  # the study is not created yet


def test_sweep_bad_input_is_one_line(workdir):
    bad = write_sweep(workdir, "bad", space={"model.init_args.no_such_option": {"choices": [1, 2]}})
    result = sweeps_command("run", "--config", str(bad), check=False)
    assert result.returncode == 2
    assert result.stderr.startswith("error: sweep bad:") and "no_such_option" in result.stderr
    assert result.stderr.count("\n") == 1
    unknown = sweeps_command("worker", "--study", "nothing", check=False)
    assert unknown.returncode == 2 and "no study 'nothing'" in unknown.stderr
    flag = sweeps_command("run", "--confg", "x.yaml", check=False)
    assert flag.returncode == 2 and flag.stderr.count("\n") == 1


@pytest.mark.fault  # interrupts a sweep: part of the fault-injection suite
def test_ctrl_c_stops_the_trial_cleanly_and_resume_continues_it(workdir, isolated_tracking):
    storage = f"sqlite:///{workdir / 'optuna.db'}"
    held = workdir / "held.pid"  # the trial holds after step 2 until its SIGTERM: it is caught running
    with_callbacks(workdir, {"class_path": "tests.sweeps.trial_callbacks.HoldUntilSigterm",
                             "init_args": {"marker": str(held), "step": 2}})
    sweep = write_sweep(workdir, "stop", n_trials=1, storage=storage)
    run = subprocess.Popen([sys.executable, "-m", "sweeps", "run", "--config", str(sweep)], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + WAIT_SECONDS
        while not held.exists() and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        run.send_signal(signal.SIGINT)  # Ctrl-C
        out, err = run.communicate(timeout=WAIT_SECONDS)
    finally:
        if run.poll() is None:
            run.kill()  # its trial, orphaned, stops itself
            run.communicate()
    assert held.exists(), out + err
    assert run.returncode == 130, out + err
    assert "continue with python -m sweeps run --config" in err
    (trial,) = trials_of("stop", storage)
    # Left running, marked interrupted: --resume continues it from its checkpoint, not from scratch.
    assert trial.state == TrialState.RUNNING and trial.user_attrs["interrupted"] is True
    assert (workdir / "runs" / "stop" / "trial-0000" / "checkpoints" / "interrupted.ckpt").is_file()
    client = MlflowClient(isolated_tracking)
    runs = client.search_runs([client.get_experiment_by_name("stop").experiment_id])
    assert {r.info.status for r in runs} == {"KILLED"}  # the study's run and the trial's

    result = sweeps_command("run", "--config", str(sweep), "--resume")  # the marker is there: this trial trains on
    (trial,) = trials_of("stop", storage)
    assert trial.state == TrialState.COMPLETE and trial.user_attrs["resumes"] == 1
    assert trial.user_attrs["resumed_at_step"] == 2
    assert "trial 0 resumed from its last checkpoint (it was interrupted)" in result.stdout
    trial_runs = client.search_runs([client.get_experiment_by_name("stop").experiment_id],
                                    filter_string="tags.`optuna.trial` = '0'")
    assert [r.info.status for r in trial_runs] == ["FINISHED"]  # its MLflow run continued, not a second one
