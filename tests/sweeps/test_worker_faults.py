"""A study run to ``n_trials`` ends with ``n_trials`` finished trials, whatever befell its workers.

The trial processes are stand-ins (``Worker._launch`` replaced): they make the MLflow run a real
trial makes and end as told, so these tests take seconds, not trainings.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

import sweeps.__main__ as cli
from sweeps.spec import load_spec
from sweeps.study import (
    PARENT_RUN_ATTR, create_or_resume, finished_trials, open_storage, record_heartbeat, retried_trial_number, suggest,
)
from sweeps.tracking import StudyRun
from sweeps.worker import Worker
from tests.sweeps.conftest import write_sweep


def fake_trial(code: int = 0, report_run: bool = True) -> Callable[..., int]:
    """A ``Worker._launch`` whose trial makes its MLflow run (tagged as a trial's), then ends with
    exit status ``code``: 0 completes it, a negative one is a kill that leaves its run RUNNING."""

    def launch(self: Worker, job_path: Path, log_path: Path, trial_id: int) -> int:
        job = json.loads(Path(job_path).read_text())
        client = MlflowClient(job["tracking_uri"])
        experiment = client.get_experiment_by_name(job["study"])
        run = client.create_run(experiment.experiment_id, tags=job["tags"])
        result: dict[str, Any] = {"state": "running", "run_id": run.info.run_id} if report_run else {}
        if code == 0:
            client.set_terminated(run.info.run_id, "FINISHED")
            result.update({"state": "complete", "best": {"val/loss": 1.0}, "last": {"val/loss": 1.0}})
        Path(job["result"]).write_text(json.dumps(result))
        return code

    return launch


def make_worker(workdir: Path, name: str, n_trials: int, heartbeat: int = 1) -> Worker:
    """A worker of a new journal study, tracked under the study's MLflow run."""
    url = f"journal:{workdir / 'optuna.journal'}"
    spec = load_spec(write_sweep(workdir, name, n_trials=n_trials, storage=url))
    storage = open_storage(url, heartbeat_seconds=heartbeat)
    study = create_or_resume(spec, storage, url, resume=False)
    study.set_user_attr(PARENT_RUN_ATTR, StudyRun.start(spec, url).run_id)
    root = workdir / "runs" / name
    root.mkdir(parents=True)
    return Worker(study, spec, storage, url, root, threads=1, name="worker 0", heartbeat_seconds=heartbeat)


def other_workers_trial(worker: Worker) -> tuple[optuna.Trial, int, str]:
    """A trial that another worker runs: RUNNING, beating now, with its MLflow run open."""
    trial = worker.study.ask()
    suggest(trial, worker.spec)
    trial_id = worker.storage.get_trial_id_from_study_id_trial_number(worker.study_id, trial.number)
    worker.storage.set_trial_user_attr(trial_id, "worker", "worker 9")
    worker.storage.set_trial_user_attr(trial_id, "run_name", f"trial-{trial.number:04d}")  # on the other host
    record_heartbeat(worker.storage, trial_id)
    client = MlflowClient(worker.tracking.tracking_uri)
    experiment = client.get_experiment_by_name(worker.study.study_name)
    run = client.create_run(experiment.experiment_id, tags={
        "optuna.study": worker.study.study_name, "optuna.trial": str(trial.number),
        "mlflow.parentRunId": worker.tracking.run_id})
    return trial, trial_id, run.info.run_id


def test_a_dead_workers_last_trial_is_waited_for_and_resumed_under_its_number(workdir, isolated_tracking, monkeypatch,
                                                                             capsys):
    monkeypatch.setattr(Worker, "_launch", fake_trial())
    worker = make_worker(workdir, "dead-other", n_trials=2)
    dead, dead_id, _ = other_workers_trial(worker)  # its worker is gone: no beat after this one
    optuna.Trial(worker.study, dead_id).report(1.5, step=100)  # what the pruner saw before the worker died

    with open(worker.root / "sweep.log", "a", encoding="utf-8") as worker.log:
        worker.run()  # its own trial is done long before the dead one goes stale (4 beats of 1 s)

    trials = worker.study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.COMPLETE]  # no third trial: resumed
    assert finished_trials(trials) == 2
    resumed = trials[0]
    assert resumed.params == dead.params and resumed.user_attrs["resumes"] == 1
    assert resumed.intermediate_values == {100: 1.5}  # its reports to the pruner kept
    # The other worker left no run folder here: trained again from its first step, and marked so.
    assert resumed.user_attrs["restarted"] == "its worker left no run folder"
    out = capsys.readouterr().out
    assert "waiting for trial 0 (worker 9, last heartbeat" in out
    assert "trial 0 resumed from its first step" in out
    assert "trial 0 resumed" in (worker.root / "sweep.log").read_text()


def test_an_interrupted_trial_is_resumed_from_its_run_folder(workdir, monkeypatch, capsys):
    jobs: list[dict[str, Any]] = []

    def launch(self: Worker, job_path: Path, log_path: Path, trial_id: int) -> int:
        job = json.loads(Path(job_path).read_text())
        jobs.append(job)
        (self.root / job["run_name"]).mkdir(exist_ok=True)
        if len(jobs) == 1:  # Ctrl-C while the first trial trains
            self.stopped = True
            return -15
        Path(job["result"]).write_text(json.dumps({"state": "complete", "best": {"val/loss": 1.0},
                                                   "last": {"val/loss": 1.0}, "started_at_step": 200}))
        return 0

    monkeypatch.setattr(Worker, "_launch", launch)
    worker = make_worker(workdir, "interrupted", n_trials=1)
    worker.tracking.tracking_uri = None
    worker.run()
    (trial,) = worker.study.get_trials()
    assert trial.state == TrialState.RUNNING and trial.user_attrs["interrupted"] is True  # left for --resume

    again = Worker(worker.study, worker.spec, worker.storage, worker.storage_url, worker.root, threads=1,
                   name="worker 1", heartbeat_seconds=1)
    again.run()
    (trial,) = worker.study.get_trials()
    assert trial.state == TrialState.COMPLETE and trial.user_attrs["resumes"] == 1
    assert jobs[1]["resume"] is True and jobs[1]["run_name"] == jobs[0]["run_name"] == "trial-0000"
    assert jobs[0]["resume"] is False
    assert "trial 0 resumed from its last checkpoint (it was interrupted)" in capsys.readouterr().out


def test_a_stale_trial_of_an_earlier_database_study_is_failed_and_run_again(workdir, monkeypatch):
    """Workers of the earlier kind beat in Optuna's heartbeat table only; their dead trials are retried as before."""

    def launch(self: Worker, job_path: Path, log_path: Path, trial_id: int) -> int:
        job = json.loads(Path(job_path).read_text())
        Path(job["result"]).write_text(json.dumps({"state": "complete", "best": {"val/loss": 1.0}}))
        return 0

    monkeypatch.setattr(Worker, "_launch", launch)
    url = f"sqlite:///{workdir / 'optuna.db'}"
    spec = load_spec(write_sweep(workdir, "legacy", n_trials=1, storage=url))
    storage = open_storage(url, heartbeat_seconds=1)
    study = create_or_resume(spec, storage, url, resume=False)
    old = study.ask()
    suggest(old, spec)
    storage.record_heartbeat(old._trial_id)  # Optuna's own heartbeat, no heartbeat attribute
    time.sleep(5)  # past the grace period of 4 beats
    root = workdir / "runs" / "legacy"
    root.mkdir(parents=True)
    worker = Worker(study, spec, storage, url, root, threads=1, name="worker 0", heartbeat_seconds=1)
    worker.tracking.tracking_uri = None
    worker.run()
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert retried_trial_number(trials[1]) == 0 and trials[1].params == old.params


def test_a_live_workers_trial_is_waited_for_and_counted(workdir, monkeypatch, capsys):
    monkeypatch.setattr(Worker, "_launch", fake_trial())
    worker = make_worker(workdir, "live-other", n_trials=2)
    _, trial_id, _ = other_workers_trial(worker)
    storage = worker.storage

    def other_worker() -> None:  # beats, then completes its trial a few beats after this worker's is done
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any(
                t.state == TrialState.COMPLETE for t in worker.study.get_trials(deepcopy=False)):
            record_heartbeat(storage, trial_id)
            time.sleep(0.3)
        for _ in range(8):
            record_heartbeat(storage, trial_id)
            time.sleep(0.3)
        storage.set_trial_state_values(trial_id, TrialState.COMPLETE, [2.0])

    thread = threading.Thread(target=other_worker)
    thread.start()
    worker.run()
    thread.join()

    assert "waiting for trial 0 (worker 9, last heartbeat" in capsys.readouterr().out
    trials = worker.study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.COMPLETE]  # no retry of a live trial


@pytest.mark.parametrize("report_run", [True, False], ids=["run-id-reported", "found-by-tags"])
def test_a_killed_trial_process_ends_its_mlflow_run(workdir, isolated_tracking, monkeypatch, report_run):
    monkeypatch.setattr(Worker, "_launch", fake_trial(code=-9, report_run=report_run))
    worker = make_worker(workdir, f"killed-{report_run}", n_trials=1)
    worker.run()
    (trial,) = worker.study.get_trials()
    assert trial.state == TrialState.FAIL and "SIGKILL" in trial.user_attrs["fail_reason"]
    client = MlflowClient(isolated_tracking)
    (run,) = client.search_runs([client.get_experiment_by_name(worker.study.study_name).experiment_id],
                                filter_string="tags.`optuna.trial` = '0'")
    assert run.info.status == "KILLED" and run.data.tags["optuna.state"] == "FAIL"


def test_a_study_left_short_of_n_trials_makes_run_exit_non_zero(workdir, monkeypatch, capsys):
    monkeypatch.setattr(Worker, "_launch", fake_trial(code=1))  # every trial fails: the worker gives up after 3
    sweep = write_sweep(workdir, "short", n_trials=5)
    with pytest.raises(SystemExit) as ended:
        cli.main(["run", "--config", str(sweep)])
    assert ended.value.code == cli.INCOMPLETE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "study short is incomplete: 2 of its 5 trials are missing" in err[0]
    assert f"python -m sweeps run --config {sweep} --resume" in err[0]


def test_a_resumed_trial_measures_the_whole_trial(workdir):
    """What a trial measured before its checkpoint travels in it: the best validation and the
    training time count both parts of a resumed trial, not only the part after the resume."""
    from sweeps.trial import ReportToStudy

    spec = load_spec(write_sweep(workdir, "measures", objectives=["val/loss"]))
    job = {"spec": spec.to_dict(), "result": str(workdir / "result.json")}
    now = [100.0]
    first = ReportToStudy(job, clock=lambda: now[0])
    first._train_start = now[0]
    first.best, first.last = {"val/loss": 1.5}, {"val/loss": 1.7}
    first.validation_seconds = 4.0
    now[0] += 30.0  # 30 s of training, then the checkpoint
    saved = first.state_dict()

    resumed = ReportToStudy(job, clock=lambda: now[0])
    resumed.load_state_dict(saved)
    resumed._train_start = now[0]
    now[0] += 20.0
    resumed.on_train_end(None, None)
    measured = resumed.measured()
    assert measured["best"] == {"val/loss": 1.5}  # a better validation before the resume is kept
    assert measured["train_seconds"] == 50.0 and resumed.validation_seconds == 4.0


def test_a_study_made_with_another_default_sampler_keeps_it_on_resume(workdir):
    url = f"sqlite:///{workdir / 'optuna.db'}"
    storage = open_storage(url, heartbeat_seconds=None)
    made = load_spec(write_sweep(workdir, "keep-sampler", sampler={"name": "tpe", "seed": 3}))
    create_or_resume(made, storage, url, resume=False)
    again = load_spec(write_sweep(workdir, "keep-sampler", sampler=None))  # the file names none: default auto
    assert not again.sampler_named and again.sampler["name"] == "auto"
    study = create_or_resume(again, storage, url, resume=True)
    assert type(study.sampler).__name__ == "TPESampler" and again.sampler == {"name": "tpe", "seed": 3}


def test_an_infeasible_trained_trial_keeps_no_checkpoints(workdir, monkeypatch):
    def launch(self: Worker, job_path: Path, log_path: Path, trial_id: int) -> int:
        job = json.loads(Path(job_path).read_text())
        checkpoints = self.root / job["run_name"] / "checkpoints"
        checkpoints.mkdir(parents=True)
        (checkpoints / "best.ckpt").write_bytes(b"weights")
        Path(job["result"]).write_text(json.dumps({"state": "complete", "best": {"val/loss": 1.0},
                                                   "train_seconds": 30.0, "run_dir": str(checkpoints.parent)}))
        return 0

    monkeypatch.setattr(Worker, "_launch", launch)
    url = f"sqlite:///{workdir / 'optuna.db'}"
    spec = load_spec(write_sweep(workdir, "over-time", n_trials=1, tracking_uri=False,
                                 constraints=[{"metric": "train_seconds", "max": 10}]))
    storage = open_storage(url, heartbeat_seconds=None)
    study = create_or_resume(spec, storage, url, resume=False)
    root = workdir / "runs" / "over-time"
    root.mkdir(parents=True)
    Worker(study, spec, storage, url, root, threads=1, name="worker 0").run()
    (trial,) = study.get_trials()
    assert trial.state == TrialState.COMPLETE and "train_seconds" in trial.user_attrs["infeasible"]
    assert "best_checkpoint" not in trial.user_attrs
    assert not (root / "trial-0000" / "checkpoints").exists()
