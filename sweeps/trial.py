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

from lmexp.errors import find_user_error
from lmexp.models import count_parameters
from lmexp.runs import build
from lmexp.tracking import MLflowTracker, tracker_of
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
        self._validation_start = 0.0
        self._trial: Any = None
        self.n_parameters: int | None = None

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
        self.n_parameters = count_parameters(getattr(pl_module, "model", None) or pl_module)
        if trainer.is_global_zero:
            tracker = tracker_of(trainer)
            write_result(self.job, {"state": "running", "run_id": tracker.wait_for_run() if tracker else None,
                                    "n_parameters": self.n_parameters})

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._train_start is not None:
            self.train_seconds = self.clock() - self._train_start

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
            trainer.should_stop = True
        elif prune:
            self.state, self.pruned_at = "pruned", trainer.global_step
            self.reason = f"pruned at step {trainer.global_step}"
            trainer.should_stop = True

    def _reached_target(self, trainer: pl.Trainer) -> bool:
        """Stop the run at the first validation that reaches the spec's target (rank 0 decides)."""
        target = self.spec.target
        if target is None or self._train_start is None:
            return False
        value = self.last.get(target.metric)
        reached = trainer.is_global_zero and value is not None and math.isfinite(value) and target.reached(value)
        if not trainer.strategy.broadcast(reached, src=0):
            return False
        self.seconds_to_target = self.clock() - self._train_start - self.validation_seconds
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
    logger: Any = False
    if job.get("tracking_uri"):
        logger = MLflowTracker(tracking_uri=job["tracking_uri"], tags=job.get("tags") or {})
    rank_zero = True
    try:
        run = build("fit", job["configs"], job["overrides"], callbacks=[reporter], logger=logger,
                    experiment=job["study"], run_name=job["run_name"])
        rank_zero = run.trainer.is_global_zero
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


def stop_when_orphaned(worker_pid: int, interval: float = 2.0) -> None:
    """SIGTERM this trial (it checkpoints and stops) once its worker is gone, so a killed worker
    leaves no trial training on; the study runs that trial again from its heartbeat."""

    def watch() -> None:
        while os.getppid() == worker_pid:
            time.sleep(interval)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, daemon=True, name="worker-watch").start()


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m sweeps.trial JOB.json (started by a sweep worker)")
    job = json.loads(Path(args[0]).read_text())
    if job.get("worker_pid") and os.environ.get("LOCAL_RANK", "0") == "0":  # DDP's other ranks follow rank 0
        stop_when_orphaned(job["worker_pid"])
    raise SystemExit(run_trial(job))


if __name__ == "__main__":
    main()
