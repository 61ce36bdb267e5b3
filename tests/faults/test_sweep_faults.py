"""Sweep workers killed for real: the study still ends with every trial it was asked for."""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from sweeps.study import finished_trials
from tests.sweeps.conftest import workdir, write_sweep  # noqa: F401 (workdir: a fixture)
from tests.sweeps.test_studies import trials_of, trials_of_safely

pytestmark = pytest.mark.fault


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state first, then parent pid); None when gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _descendants(pid: int) -> list[int]:
    parents = {int(p.name): (_stat(int(p.name)) or ["", "0"])[1] for p in Path("/proc").glob("[0-9]*")}
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if int(parent or 0) in frontier]
        found += children
        frontier = children
    return found


def _alive(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z"


def _poll(condition, timeout: float = 300, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.3)


def test_a_worker_killed_mid_trial_leaves_the_study_complete(workdir, isolated_tracking):
    storage = f"journal:{workdir / 'optuna.journal'}"
    sweep = write_sweep(workdir, "killed-worker", n_trials=3, workers=2, storage=storage)
    with open(workdir / "run.out", "w") as out:
        run = subprocess.Popen([sys.executable, "-m", "sweeps", "run", "--config", str(sweep), "--heartbeat", "1"],
                               stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    client = MlflowClient(isolated_tracking)
    try:
        log = workdir / "runs" / "killed-worker" / "sweep.log"
        victim: list = []

        def tracked_in_worker_1() -> bool:  # a trial of worker 1 that is training: its MLflow run is there
            victim[:] = [t for t in trials_of_safely("killed-worker", storage)
                         if t.state == TrialState.RUNNING and t.user_attrs.get("worker") == "worker 1"]
            experiment = client.get_experiment_by_name("killed-worker")
            return bool(victim) and experiment is not None and bool(client.search_runs(
                [experiment.experiment_id], filter_string=f"tags.`optuna.trial` = '{victim[0].number}'"))

        _poll(tracked_in_worker_1, what="a tracked trial of worker 1")
        (pid,) = re.findall(r"worker 1: joined study \S+ \(pid (\d+)", log.read_text())
        trial_processes = _descendants(int(pid))
        assert trial_processes, "worker 1 runs no trial process"
        os.kill(int(pid), signal.SIGKILL)  # the worker dies without a word, mid-trial

        assert run.wait(timeout=600) == 0, (workdir / "run.out").read_text()
        # The orphaned trial stopped itself; nothing of the dead worker is left running.
        _poll(lambda: not any(_alive(p) for p in trial_processes), timeout=60, what="the orphaned trial to stop")
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()

    dead = victim[0].number
    trials = trials_of("killed-worker", storage)
    assert finished_trials(trials) == 3 and len(trials) == 3  # the dead worker's trial resumed, not retried
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    resumed = trials[dead]
    assert resumed.state == TrialState.COMPLETE and resumed.params == victim[0].params
    assert resumed.user_attrs["resumes"] == 1
    with open(workdir / "runs" / "killed-worker" / "report" / "trials.csv") as table:
        rows = {int(row["trial"]): row for row in csv.DictReader(table)}
    assert rows[dead]["resumed"].startswith("1x")

    runs = client.search_runs([client.get_experiment_by_name("killed-worker").experiment_id])
    assert not [r for r in runs if r.info.status == "RUNNING"]
    assert "FINISHED" in {r.info.status for r in runs if r.data.tags.get("optuna.trial") == str(dead)}
