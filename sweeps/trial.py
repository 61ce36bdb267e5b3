"""One trial: an ``lmexp fit`` process that reports each validation to the study.

A worker starts ``python -m sweeps.trial JOB.json`` for every trial. The trial trains through
``lmexp.runs.build`` (the run ``lmexp fit`` would make, nested in the study's MLflow run), reports
its validation metric to the study's storage, stops when the pruner says so, and writes what it
measured to the job's result file. Training with DDP works as it does from the command line:
Lightning starts the other ranks by re-running this same command, and only rank 0 talks to the
study, then broadcasts the pruning decision, so every rank stops after the same validation.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from lmexp.errors import CheckpointError, find_user_error
from lmexp.models import count_parameters
from lmexp.runs import build
from lmexp.tracking import MLflowTracker, tracker_of
from sweeps.samplers import constraint_watch, infeasible_before_training
from sweeps.spec import MEASURES, Objective, SweepSpec


class ReportToStudy(pl.Callback):
    """Reports the monitored metric after every validation and stops the run when Optuna prunes it.

    Optuna's Lightning integration callback asks the study on every rank under DDP (optuna#1417,
    #6043); here only rank 0 does, and the others follow its broadcast decision.

    Args:
        job: The trial's job, as the worker wrote it.
        clock: Seconds from an arbitrary origin; the times it measures (``train_seconds``,
            ``seconds_to_target``) are differences of its readings. A clock that ticks with the
            training steps makes them exact, whatever the machine's speed.
    """

    def __init__(self, job: dict[str, Any], clock: Callable[[], float] = time.perf_counter) -> None:
        self.job = job
        self.clock = clock
        self.spec = SweepSpec.from_dict(job["spec"])
        self.objectives = self.spec.objectives
        self.monitor = self.objectives[0].metric
        self.watched = list(self.objectives)  # metrics read after each validation
        if self.spec.target is not None:
            target = self.spec.target
            self.watched.append(Objective(target.metric, target.direction))
            if self.monitor in MEASURES:  # seconds_to_target: report the target's metric as the run goes
                self.monitor = target.metric
        self.watched += constraint_watch(self.spec)  # logged metrics only a constraint bounds
        # Optuna keeps intermediate values of single-objective studies only; reported with or
        # without a pruner, they draw the learning curves of the report.
        self.reporting = not self.spec.multi_objective
        self.best: dict[str, float] = {}
        self.last: dict[str, float] = {}
        self.state = "complete"
        self.reason = ""
        self.pruned_at: int | None = None
        self.train_seconds = 0.0
        self.validation_seconds = 0.0
        self.seconds_to_target: float | None = None
        self._train_start: float | None = None
        self._trained_before = 0.0  # training seconds of this trial before the checkpoint it resumed from
        self._validation_start = 0.0
        self._trial: Any = None
        self.n_parameters: int | None = None
        self.started_at_step = 0

    # ------------------------------------------------------------------- study access (rank 0)
    def _optuna_trial(self) -> Any:
        if self._trial is None:
            import optuna

            from sweeps.study import make_pruner, open_storage

            storage = open_storage(self.job["storage"], heartbeat_seconds=None)
            study = optuna.load_study(study_name=self.job["study"], storage=storage, pruner=make_pruner(self.spec))
            self._trial = optuna.trial.Trial(study, self.job["trial_id"])
        return self._trial

    # ---------------------------------------------------------------------------- hooks
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._train_start = self.clock()
        self.started_at_step = trainer.global_step  # above 0 for a resumed trial
        self.n_parameters = count_parameters(getattr(pl_module, "model", None) or pl_module)
        # A model over a parameter budget is infeasible as it is: stopped before its first step.
        infeasible = trainer.strategy.broadcast(infeasible_before_training(self.spec, self.n_parameters), src=0)
        if infeasible:
            self.state, self.reason = "infeasible", infeasible
            self._stop_without_model(trainer)
        if trainer.is_global_zero:
            tracker = tracker_of(trainer)
            write_result(self.job, {"state": "running", "run_id": tracker.wait_for_run() if tracker else None,
                                    "n_parameters": self.n_parameters})

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._train_start is not None:
            self.train_seconds = self._trained_seconds()

    def _trained_seconds(self) -> float:
        """Training time of the whole trial: before the checkpoint it resumed from, and since."""
        since = self.clock() - self._train_start if self._train_start is not None else 0.0
        return self._trained_before + since

    # A resumed trial measures the whole trial, not the part after its checkpoint: what it measured
    # travels in the checkpoint (Lightning saves and restores a callback's state).
    def state_dict(self) -> dict[str, Any]:
        return {"best": dict(self.best), "last": dict(self.last), "trained_seconds": self._trained_seconds(),
                "validation_seconds": self.validation_seconds}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best.update(state_dict.get("best", {}))
        self.last.update(state_dict.get("last", {}))
        self._trained_before = float(state_dict.get("trained_seconds", 0.0))
        self.validation_seconds = float(state_dict.get("validation_seconds", 0.0))

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._validation_start = self.clock()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.validation_seconds += self.clock() - self._validation_start
        self._collect(trainer)
        reached = self._reached_target(trainer)
        prune = False
        diverged = False
        if trainer.is_global_zero and self.monitor in self.last:
            value = self.last[self.monitor]
            if not math.isfinite(value):
                diverged = True
            elif self.reporting:
                trial = self._optuna_trial()
                trial.report(value, step=trainer.global_step)
                # At the last step the trial is trained: pruning it would save nothing and lose it.
                last_step = 0 < trainer.max_steps <= trainer.global_step
                prune = self.spec.pruning and not (last_step or reached) and trial.should_prune()
        prune, diverged = trainer.strategy.broadcast((prune, diverged), src=0)
        if diverged:
            self.state, self.reason = "failed", f"{self.monitor} is not finite at step {trainer.global_step}"
            self._stop_without_model(trainer)
        elif prune:
            self.state, self.pruned_at = "pruned", trainer.global_step
            self.reason = f"pruned at step {trainer.global_step}"
            self._stop_without_model(trainer)

    def _stop_without_model(self, trainer: pl.Trainer) -> None:
        """Stop the run; a trial that did not complete logs no MLflow model (its checkpoints go too)."""
        trainer.should_stop = True
        tracker = tracker_of(trainer)
        if tracker is not None:
            tracker.skip_model(self.reason)

    def _reached_target(self, trainer: pl.Trainer) -> bool:
        """Stop the run at the first validation that reaches the spec's target (rank 0 decides)."""
        target = self.spec.target
        if target is None or self._train_start is None:
            return False
        value = self.last.get(target.metric)
        reached = trainer.is_global_zero and value is not None and math.isfinite(value) and target.reached(value)
        if not trainer.strategy.broadcast(reached, src=0):
            return False
        self.seconds_to_target = self._trained_seconds() - self.validation_seconds
        trainer.should_stop = True
        return True

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._collect(trainer, validation=False)

    def _collect(self, trainer: pl.Trainer, validation: bool = True) -> None:
        for objective in self.watched:
            name = objective.metric
            value = trainer.callback_metrics.get(name)
            if value is None:
                continue
            value = float(value)
            self.last[name] = value
            if not validation or not math.isfinite(value):
                continue
            better = min if objective.direction == "minimize" else max
            self.best[name] = better(self.best.get(name, value), value)

    def measured(self) -> dict[str, Any]:
        measured = {
            "state": self.state, "reason": self.reason, "best": self.best, "last": self.last,
            "n_parameters": self.n_parameters, "train_seconds": self.train_seconds, "pruned_at": self.pruned_at,
            "started_at_step": self.started_at_step,
        }
        if self.spec.target is not None:
            measured["reached_target"] = self.seconds_to_target is not None
            # A run that never reached the target would have needed more than all of its training
            # time: it counts as twice that, behind any run that reached it in as long.
            measured["seconds_to_target"] = (
                self.seconds_to_target if self.seconds_to_target is not None
                else 2 * max(self.train_seconds - self.validation_seconds, 0.0)
            )
        return measured


def write_result(job: dict[str, Any], values: dict[str, Any]) -> None:
    """Update the job's result file atomically (the worker may read it at any moment)."""
    path = Path(job["result"])
    current = json.loads(path.read_text()) if path.is_file() else {}
    current.update(values)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(current))
    temporary.replace(path)


def run_trial(job: dict[str, Any]) -> int:
    """Train the job's trial; return the process exit status (0 also for pruned or diverged trials)."""
    reporter = ReportToStudy(job)
    rank_zero = True
    try:
        run = _build(job, reporter)
        rank_zero = run.trainer.is_global_zero
        if rank_zero:  # the folder it trains in, also when it fails
            write_result(job, {"run_dir": str(run.run_dir)})
        run.execute()
    except Exception as err:
        user_error = find_user_error(err)
        message = str(user_error) if user_error is not None else f"{type(err).__name__}: {err}"
        if rank_zero:
            write_result(job, {**reporter.measured(), "state": "failed", "reason": message.splitlines()[0]})
        raise
    if rank_zero:
        write_result(job, {**reporter.measured(), "run_dir": str(run.run_dir)})
    return 0


def _build(job: dict[str, Any], reporter: ReportToStudy) -> Any:
    """The trial's run; a resumed trial continues its run folder from its newest checkpoint, or,
    when none can be resumed, trains again from its first step in a new folder (and says so)."""

    def build_run(run_name: str, ckpt_path: str | None) -> Any:
        logger: Any = False
        if job.get("tracking_uri"):
            logger = MLflowTracker(tracking_uri=job["tracking_uri"], tags=job.get("tags") or {})
        return build("fit", job["configs"], job["overrides"], callbacks=[reporter], logger=logger,
                     experiment=job["study"], run_name=run_name, ckpt_path=ckpt_path)

    if not job.get("resume"):
        return build_run(job["run_name"], None)
    try:
        return build_run(job["run_name"], "last")
    except CheckpointError as err:
        reason = f"its checkpoint could not be resumed ({str(err).splitlines()[0]})"
        print(f"trial: {reason}; training again from the first step", flush=True)
        write_result(job, {"restarted": reason})
        return build_run(f"{job['run_name']}-restarted", None)


def stop_when_orphaned(worker_pid: int, interval: float = 2.0) -> None:
    """SIGTERM this trial (it checkpoints and stops) once its worker is gone, so a killed worker
    leaves no trial training on; the study resumes that trial from its checkpoint.

    The worker is watched itself: a forked trial's parent is the worker's trial server, which
    outlives the worker while the trial runs."""
    from lmexp.atomic import process_alive

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent and process_alive(worker_pid):
            time.sleep(interval)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, daemon=True, name="worker-watch").start()


def run_job_file(job_path: str | Path) -> int:
    job = json.loads(Path(job_path).read_text())
    if job.get("worker_pid") and os.environ.get("LOCAL_RANK", "0") == "0":  # DDP's other ranks follow rank 0
        stop_when_orphaned(job["worker_pid"])
    return run_trial(job)


def run_forked(job_path: str, log_path: str, threads: int) -> None:
    """A trial forked from the worker's trial server (lmexp, torch and Lightning already imported):
    its own session, like a trial process, with its output in the trial's log."""
    os.setsid()  # the worker stops the trial's whole process group, and Ctrl-C reaches only the worker
    log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)
    import atexit

    import torch

    torch.set_num_threads(threads)
    try:
        code = run_job_file(job_path)
    finally:
        # A forked process ends with os._exit, which skips exit handlers: run them as a process
        # of its own would (the tracker's last flush and finalize among them).
        atexit._run_exitfuncs()
    raise SystemExit(code)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m sweeps.trial JOB.json (started by a sweep worker)")
    raise SystemExit(run_job_file(args[0]))


if __name__ == "__main__":
    main()
