"""A sweep worker: asks the study for trials and runs each as its own ``lmexp fit`` process.

Running a trial in its own process (or process group, under DDP) means a crash, a NaN or an
out-of-memory kill is one failed trial, never a dead study, and DDP inside a trial is exactly
DDP from the command line. Several workers, on one host or many, share a study through its
storage; each worker's trials get ``threads`` CPU threads, so N workers on one machine do not
oversubscribe its cores.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any, TextIO

import optuna
from filelock import FileLock
from optuna.trial import TrialState

from sweeps.samplers import record_constraints, untrained_values
from sweeps.spec import MEASURES, SweepSpec
from sweeps.study import (
    FAIL_REASON_ATTR,
    INTERRUPTED,
    PARENT_RUN_ATTR,
    TrialOutcome,
    BEST_CHECKPOINT_ATTR,
    INTERRUPTED_ATTR,
    RESTARTED_ATTR,
    RUN_NAME_ATTR,
    Owner,
    claim_trial,
    counted_trials,
    exhausted,
    fail_legacy_stale_trials,
    heartbeat_age,
    orphaned_trials,
    record_heartbeat,
    retried_trial_number,
    shown_url,
    suggest,
)
from sweeps.tracking import StudyRun, objective_tags

_RENAMED = {"Outcome": "sweeps.study.TrialOutcome"}


def __getattr__(name: str) -> Any:
    """``sweeps.worker.Outcome`` keeps working for one release, with a DeprecationWarning."""
    if name not in _RENAMED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, _, new_name = _RENAMED[name].rpartition(".")
    warnings.warn(f"{__name__}.{name} is deprecated and goes in the next release: use {_RENAMED[name]}",
                  DeprecationWarning, stacklevel=2)
    return getattr(importlib.import_module(module), new_name)


TRIAL_SERVER_PRELOAD = ["sweeps.trial", "optuna", "mlflow", "matplotlib.pyplot"]


def start_trial_server(threads: int) -> bool:
    """Start the process that forks every trial of this worker, with lmexp, torch, Lightning, Optuna
    and MLflow imported once (several seconds a trial otherwise); False where forking is not possible.

    Each trial is still its own process, forked from this server and not from the worker, whose
    threads (heartbeats) a fork would not carry. The server reads its environment once, so the
    trials' thread counts are set here.
    """
    if os.environ.get("LMEXP_SWEEP_FORK", "1") == "0" or "forkserver" not in multiprocessing.get_all_start_methods():
        return False
    os.environ.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"})
    os.environ.pop("LMEXP_RUN_DIR", None)
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(TRIAL_SERVER_PRELOAD)
    from multiprocessing import forkserver

    forkserver.ensure_running()
    return True


class ForkedTrial:
    """A trial forked from the trial server; waited for and stopped like a ``subprocess.Popen``."""

    def __init__(self, job_path: Path, log_path: Path, threads: int) -> None:
        context = multiprocessing.get_context("forkserver")
        self.process = context.Process(target=_run_forked, args=(str(job_path), str(log_path), threads),
                                       name="lmexp-trial", daemon=False)
        self.process.start()
        self.pid = self.process.pid

    def wait(self) -> int:
        self.process.join()
        return int(self.process.exitcode if self.process.exitcode is not None else 1)


def _run_forked(job_path: str, log_path: str, threads: int) -> None:
    from sweeps.trial import run_forked  # imported in the server already; the worker never imports torch

    run_forked(job_path, log_path, threads)


class Worker:
    """Runs trials of one study until ``n_trials`` are done, the timeout passes, or it is stopped."""

    def __init__(self, study: optuna.Study, spec: SweepSpec, storage: optuna.storages.BaseStorage, storage_url: str,
                 root: Path, threads: int, devices: int = 1, name: str = "worker", log: TextIO | None = None,
                 heartbeat_seconds: int | None = None) -> None:
        self.study = study
        self.spec = spec
        self.storage = storage
        self.storage_url = storage_url
        self.root = root
        self.threads = threads
        self.devices = max(1, devices)
        self.name = name
        self.log = log
        self.heartbeat_seconds = heartbeat_seconds
        self.study_id = storage.get_study_id_from_name(study.study_name)
        self.tracking = StudyRun.attach(spec, study.user_attrs.get(PARENT_RUN_ATTR))
        self._child: subprocess.Popen | ForkedTrial | None = None
        # Trials of one device are forked from a warm trial server; DDP trials are started as processes.
        self.fork_trials = self.devices == 1 and start_trial_server(max(1, threads))
        self.stopped = False  # by Ctrl-C or SIGTERM
        self._grid_done_said = False
        self._waited: tuple[set[int], float] = (set(), 0.0)  # the trials last named in a waiting line, and when

    # ------------------------------------------------------------------------------ the loop
    def run(self) -> list[TrialOutcome]:
        outcomes: list[TrialOutcome] = []
        deadline = time.monotonic() + self.spec.timeout if self.spec.timeout else None
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
        for sig in previous:
            signal.signal(sig, self._stop)
        try:
            while not self.stopped:
                if deadline is not None and time.monotonic() >= deadline:
                    self.say(f"{self.name}: timeout of {self.spec.timeout:g} s reached")
                    break
                asked = self._ask()
                if asked is None:
                    if self._wait_for_others():
                        continue  # asked again: the trial waited for is done, or orphaned and resumed here
                    break
                if self.stopped:  # stopped while asking: the trial is left for --resume, not started
                    self._leave_interrupted(asked[0])
                    break
                outcomes.append(self._run(*asked))
                if self._hopeless(outcomes):
                    break
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return outcomes

    def _hopeless(self, outcomes: list[TrialOutcome], limit: int = 3) -> bool:
        """Stop after ``limit`` failures in a row while no trial of the study has completed: a
        setting every trial shares is wrong, and each further trial would fail the same way."""
        recent = outcomes[-limit:]
        if len(recent) < limit or any(o.state != TrialState.FAIL or o.reason == INTERRUPTED for o in recent):
            return False
        if any(t.state == TrialState.COMPLETE for t in self.study.get_trials(deepcopy=False)):
            return False
        self.say(f"{self.name}: stopping: the first {limit} trials failed ({recent[-1].reason}); fix the sweep or "
                 f"fit config, then continue with python -m sweeps run --config FILE --resume")
        return True

    def _stop(self, signum: int, frame: Any) -> None:
        self.stopped = True
        self._stop_child()

    def _stop_child(self) -> None:
        """SIGTERM the running trial (it checkpoints and stops): its process group, or the process
        alone when it has not made its group yet (a forked trial sets up its session first).
        Nothing here reads the trial's exit status, which the waiting loop must get."""
        child = self._child
        if child is None:
            return
        try:
            os.killpg(child.pid, signal.SIGTERM)
        except ProcessLookupError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGTERM)
        except PermissionError:
            pass

    def _ask(self) -> tuple[optuna.Trial, str] | None:
        """The next trial to run, and why it is resumed ("" for a new one); None when the study is done."""
        # Counting and asking under one lock: workers on this host never start more than n_trials.
        with self._trial_slot():
            for frozen, why in orphaned_trials(self.study, self.heartbeat_seconds):
                if claim_trial(self.study, self.storage, frozen, self._owner()):
                    return optuna.Trial(self.study, self._trial_id(frozen.number)), why
            self._fail_legacy_stale_trials()
            trials = self.study.get_trials(deepcopy=False)
            if self.spec.n_trials is not None and counted_trials(trials) >= self.spec.n_trials:
                return None
            queued = any(t.state == TrialState.WAITING for t in trials)  # a retry runs even when the grid is done
            if not queued and exhausted(self.study):
                if not self._grid_done_said:
                    self._grid_done_said = True
                    self.say(f"{self.name}: every point of the grid has been tried")
                return None
            trial = self.study.ask()
            trial_id = self._trial_id(trial.number)
            # Owned from the start, and alive by heartbeat when beats are on: a trial with no beat
            # is never taken for orphaned by another host's worker.
            self.storage.set_trial_user_attr(trial_id, Owner.ATTR, self._owner().to_attr())
            if self.heartbeat_seconds:
                record_heartbeat(self.storage, trial_id)
            return trial, ""

    def _leave_interrupted(self, trial: optuna.Trial) -> None:
        trial.set_user_attr(INTERRUPTED_ATTR, True)
        self.say(f"{self.name}: trial {trial.number} interrupted before it started; it runs with --resume")

    def _owner(self, trial_pid: int | None = None) -> Owner:
        return Owner(socket.gethostname(), os.getpid(), trial_pid)

    def _trial_id(self, number: int) -> int:
        return self.storage.get_trial_id_from_study_id_trial_number(self.study_id, number)

    def _fail_legacy_stale_trials(self) -> None:
        """Fail the trials of dead workers of the earlier kind (queued to run again) and end their MLflow runs."""
        for number in fail_legacy_stale_trials(self.study, self.storage):
            trial = self.storage.get_trial(self._trial_id(number))
            reason = trial.user_attrs.get(FAIL_REASON_ATTR) or "its worker stopped beating"
            self.say(f"{self.name}: trial {number} of {trial.user_attrs.get('worker', 'a worker')} failed: {reason}; "
                     "it runs again")
            self.tracking.end_trial_run(self.study.study_name, number, reason, "KILLED",
                                        trial.user_attrs.get("mlflow_run_id"))

    def _wait_for_others(self, report_every: float = 30.0) -> bool:
        """While trials of other workers run, wait one poll and return True; False when none runs.

        The study is done only when every trial has ended: a live worker's trial is counted, and a
        dead worker's goes stale here, is failed and queued again, and this worker runs it. Without
        heartbeats a dead worker cannot be told from a slow one, so nothing is waited for.
        """
        running = self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if not running or self.stopped:
            return False
        if not self.heartbeat_seconds:
            self.say(f"{self.name}: not waiting for trial(s) {', '.join(str(t.number) for t in running)} of other "
                     "workers: heartbeats are off (--heartbeat 0), so a dead worker's trial cannot be told apart")
            return False
        numbers = {t.number for t in running}
        named, when = self._waited
        if numbers != named or time.monotonic() - when >= report_every:
            self._waited = (numbers, time.monotonic())
            for trial in running:
                age = heartbeat_age(trial)
                since = (f"last heartbeat {age:.0f} s ago" if age is not None else
                         f"running {time.time() - trial.datetime_start.timestamp():.0f} s"
                         if trial.datetime_start else "running")
                self.say(f"{self.name}: waiting for trial {trial.number} "
                         f"({trial.user_attrs.get('worker', 'another worker')}, {since})")
        time.sleep(min(float(self.heartbeat_seconds), 5.0))
        return True

    def _trial_slot(self) -> FileLock:
        """The lock workers on this host take to count running trials and ask for the next one."""
        return FileLock(self.root / ".trial-slot.lock")


    # ----------------------------------------------------------------------------- one trial
    def _run(self, trial: optuna.Trial, resumed_because: str = "") -> TrialOutcome:
        started = time.perf_counter()
        overrides = suggest(trial, self.spec)  # a resumed trial gets the parameters it had
        trial.set_user_attr("overrides", overrides)
        trial.set_user_attr("worker", self.name)
        trial_id = self._trial_id(trial.number)
        frozen = self.storage.get_trial(trial_id)
        run_name = frozen.user_attrs.get(RUN_NAME_ATTR) if resumed_because else None
        resume = bool(run_name) and (self.root / run_name).is_dir()
        if resumed_because:
            how = "from its last checkpoint" if resume else "from its first step: it left no run folder"
            self.say(f"{self.name}: trial {trial.number} resumed {how} ({resumed_because})")
        run_name = run_name if resume else self._run_name(trial.number)
        trial.set_user_attr(RUN_NAME_ATTR, run_name)
        if resumed_because and not resume and frozen.user_attrs.get(RUN_NAME_ATTR):
            trial.set_user_attr(RESTARTED_ATTR, "its worker left no run folder")
        log_path = self.root / "logs" / f"{run_name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="lmexp-trial-") as scratch:
            job = self._job(trial, trial_id, overrides, run_name, Path(scratch), resume)
            job_path = Path(scratch) / "job.json"
            job_path.write_text(json.dumps(job, default=str))
            code = self._launch(job_path, log_path, trial_id)
            result_path = Path(job["result"])
            result = json.loads(result_path.read_text()) if result_path.is_file() else {}
        if result.get("run_dir"):  # a trial that could not resume trains in another folder
            trial.set_user_attr(RUN_NAME_ATTR, Path(result["run_dir"]).name)
        if result.get("restarted"):
            trial.set_user_attr(RESTARTED_ATTR, result["restarted"])
        elif resume and result.get("state") in ("complete", "pruned") and not result.get("started_at_step"):
            trial.set_user_attr(RESTARTED_ATTR, "no checkpoint had been saved: trained from its first step")
        return self._finish(trial, code, result, log_path, time.perf_counter() - started, self.root / run_name)

    def _run_name(self, number: int) -> str:
        base = f"trial-{number:04d}"
        name, attempt = base, 1
        while (self.root / name).exists():  # a study of the same name made before, then deleted
            attempt += 1
            name = f"{base}-{attempt}"
        return name

    def _job(self, trial: optuna.Trial, trial_id: int, overrides: dict[str, Any], run_name: str,
             scratch: Path, resume: bool = False) -> dict[str, Any]:
        tags = {"optuna.study": self.study.study_name, "optuna.trial": str(trial.number),
                "optuna.storage": shown_url(self.storage_url), "sweep.worker": self.name}
        tags.update({f"optuna.param.{k}": str(v) for k, v in trial.params.items()})
        tags.update(objective_tags(self.spec))  # runs filter by tags.`sweep.objective`
        retry_of = retried_trial_number(self.storage.get_trial(trial_id))
        if retry_of is not None:
            tags["sweep.retry_of"] = str(retry_of)
        if self.tracking.run_id:
            tags["mlflow.parentRunId"] = self.tracking.run_id
        return {
            "study": self.study.study_name, "storage": self.storage_url, "trial_id": trial_id,
            "configs": self.spec.configs, "overrides": overrides, "run_name": run_name,
            "spec": self.spec.to_dict(), "tracking_uri": self.tracking.tracking_uri,
            "tags": tags, "result": str(scratch / "result.json"), "worker_pid": os.getpid(), "resume": resume,
        }

    def _launch(self, job_path: Path, log_path: Path, trial_id: int) -> int:
        env = dict(os.environ)
        per_rank = str(max(1, self.threads // self.devices))
        env.update({"OMP_NUM_THREADS": per_rank, "MKL_NUM_THREADS": per_rank, "PYTHONUNBUFFERED": "1"})
        env.pop("LMEXP_RUN_DIR", None)
        # Optuna beats only inside Study.optimize; a worker that runs trials as processes beats itself.
        interval = self.heartbeat_seconds
        stop_beat = threading.Event()
        if interval:
            record_heartbeat(self.storage, trial_id)

            def beat() -> None:
                while not stop_beat.wait(interval):
                    with contextlib.suppress(Exception):  # a missed beat is retried at the next one
                        record_heartbeat(self.storage, trial_id)

            threading.Thread(target=beat, daemon=True, name="trial-heartbeat").start()
        try:
            if self.devices == 1 and self.fork_trials:
                self._child = ForkedTrial(job_path, log_path, int(per_rank))
            else:  # DDP: Lightning starts the other ranks by running the trial's command line again
                with open(log_path, "ab") as log:
                    # Its own session: Ctrl-C in the terminal reaches the worker, which stops the trial cleanly.
                    self._child = subprocess.Popen([sys.executable, "-m", "sweeps.trial", str(job_path)], env=env,
                                                   stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                   start_new_session=True)
            if self.stopped:  # stopped while the trial started
                self._stop_child()
            with contextlib.suppress(Exception):  # who runs the trial: found gone when this host has no such process
                self.storage.set_trial_user_attr(trial_id, Owner.ATTR, self._owner(self._child.pid).to_attr())
            return self._child.wait()
        finally:
            stop_beat.set()
            self._child = None

    def _finish(self, trial: optuna.Trial, code: int, result: dict[str, Any], log_path: Path, seconds: float,
                run_dir: Path) -> TrialOutcome:
        state_name = result.get("state", "failed")
        reason = result.get("reason") or ""
        values: list[float] | None = None
        finished = code == 0 and state_name in ("complete", "pruned", "infeasible")
        for key in MEASURES:
            if result.get(key) is not None:
                trial.set_user_attr(key, result[key])
        if result.get("run_id"):
            trial.set_user_attr("mlflow_run_id", result["run_id"])
        if result.get("started_at_step"):
            trial.set_user_attr("resumed_at_step", result["started_at_step"])
        trial.set_user_attr("log", str(log_path))
        if self.stopped and not finished:
            # Stopped by Ctrl-C or SIGTERM after a checkpoint: left running, for the next worker
            # (or --resume) to resume; not failed, not counted twice.
            trial.set_user_attr(INTERRUPTED_ATTR, True)
            outcome = TrialOutcome(trial.number, TrialState.RUNNING, None, INTERRUPTED, seconds, result, "KILLED")
            self.say(f"{self.name}: trial {trial.number} interrupted; it resumes from its checkpoint with --resume")
            return outcome
        if code != 0:
            state_name = "failed"
            reason = reason or _exit_reason(code)
        if state_name == "complete":
            values, missing = objective_values(self.spec, result)
            if missing:
                state_name, reason = "failed", missing
        if "reached_target" in result:
            trial.set_user_attr("reached_target", result["reached_target"])
        if state_name == "failed":
            trial.set_user_attr(FAIL_REASON_ATTR, reason)
        elif state_name in ("complete", "pruned"):  # before tell: a told trial takes no constraints
            reason = record_constraints(trial, self.spec, result)
        elif state_name == "infeasible":  # stopped before training: told complete at the worst value
            reason = record_constraints(trial, self.spec, result, trained=False)
            values = untrained_values(self.spec)
        infeasible = reason if state_name in ("complete", "infeasible") else ""
        run_dir = Path(result.get("run_dir") or run_dir)
        if state_name == "complete" and not infeasible and (run_dir / "checkpoints" / "best.ckpt").is_file():
            trial.set_user_attr(BEST_CHECKPOINT_ATTR, str(run_dir / "checkpoints" / "best.ckpt"))
        elif not self.spec.keep_checkpoints:
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # pruned, failed, infeasible: none to go back to
        state = {"complete": TrialState.COMPLETE, "infeasible": TrialState.COMPLETE,
                 "pruned": TrialState.PRUNED}.get(state_name, TrialState.FAIL)
        self.study.tell(trial, values if state == TrialState.COMPLETE else None, state=state)
        outcome = TrialOutcome(trial.number, state, values, reason, seconds, result, "KILLED" if code < 0 else "FAILED",
                               infeasible)
        self.tracking.trial_finished(self.study, outcome)
        self.say(self._line(trial, outcome, log_path))
        return outcome

    # ---------------------------------------------------------------------------- progress
    def _line(self, trial: optuna.Trial, outcome: TrialOutcome, log_path: Path) -> str:
        params = ", ".join(f"{k}={_short(v)}" for k, v in trial.params.items())
        if outcome.result.get("state") == "infeasible":
            what = f"infeasible, not trained: {outcome.reason}"
        elif outcome.state == TrialState.COMPLETE:
            shown = ", ".join(f"{o.metric}={v:.4g}" for o, v in zip(self.spec.objectives, outcome.values or []))
            what = f"complete {shown}" + (f", infeasible: {outcome.reason}" if outcome.reason else "")
        elif outcome.state == TrialState.PRUNED:
            what = f"pruned at step {outcome.result.get('pruned_at')}"
        else:
            what = f"failed: {outcome.reason} (log: {log_path})"
        if outcome.result.get("started_at_step"):
            what += f", resumed at step {outcome.result['started_at_step']}"
        line = f"{self.name}: trial {trial.number} [{params}] {what} ({outcome.seconds:.0f} s)"
        if not self.spec.multi_objective:
            with contextlib.suppress(ValueError):
                best = self.study.best_trial
                line += f" | best {best.value:.4g} (trial {best.number})"
        return line

    def say(self, line: str) -> None:
        print(line, flush=True)
        if self.log is not None:
            self.log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")
            self.log.flush()


def objective_values(spec: SweepSpec, result: dict[str, Any]) -> tuple[list[float], str]:
    """The trial's objective values from what it measured; or a reason it has none."""
    values = []
    for objective in spec.objectives:
        if objective.metric in MEASURES:
            value = result.get(objective.metric)
        else:
            value = result.get(objective.reduce, {}).get(objective.metric)
        if value is None:
            logged = sorted(set(result.get("last", {})) | set(MEASURES))
            return [], f"metric {objective.metric!r} was never logged (objectives can use: {', '.join(logged)})"
        if not math.isfinite(float(value)):
            return [], f"{objective.metric} is {value}"
        values.append(float(value))
    return values, ""


def _exit_reason(code: int) -> str:
    if code < 0:
        name = signal.Signals(-code).name
        hint = " (out of memory?)" if -code == signal.SIGKILL else ""
        return f"trial process killed by {name}{hint}"
    return f"trial process exited with status {code}"


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)

