"""Callbacks the sweep tests put in a trial's fit config (the trial is a process of its own):
a clock that ticks with training, and waits on states other processes signal through files."""

from __future__ import annotations

import os
import time
from pathlib import Path

import lightning.pytorch as pl

WAIT_SECONDS = 300.0  # what a wait below may take before it is an error: far above any wait here, even 10x slower


class StepClock(pl.Callback):
    """Gives the trial's ``ReportToStudy`` a clock that advances ``step_seconds`` per training
    batch and ``validation_seconds`` per validation (sanity check excluded), from ``start``:
    the trial's measured times then follow from its step counts, exactly."""

    def __init__(self, step_seconds: float = 1.0, validation_seconds: float = 6.0, start: float = 1000.0) -> None:
        self.step_seconds = step_seconds
        self.validation_seconds = validation_seconds
        self.now = start

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # By name: the trial runs sweeps/trial.py as __main__, a module other than sweeps.trial.
        reporters = [c for c in trainer.callbacks if type(c).__name__ == "ReportToStudy"]
        if not reporters:
            raise RuntimeError("StepClock: no ReportToStudy among the trainer's callbacks (not a sweep trial?)")
        for reporter in reporters:
            reporter.clock = self.read

    def read(self) -> float:
        return self.now

    def on_train_batch_end(self, trainer: pl.Trainer, *args) -> None:
        self.now += self.step_seconds

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.now += self.validation_seconds


class Rendezvous(pl.Callback):
    """Holds each trial at the start of training until ``parties`` trials have started: two trials
    training at once run on two workers (a worker runs one trial at a time)."""

    def __init__(self, folder: str, parties: int = 2) -> None:
        self.folder = Path(folder)
        self.parties = parties

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"started-{os.getpid()}").touch()
        deadline = time.monotonic() + WAIT_SECONDS
        while len(list(self.folder.glob("started-*"))) < self.parties:
            if time.monotonic() > deadline:
                raise RuntimeError(f"Rendezvous: fewer than {self.parties} trials started within {WAIT_SECONDS:g} s")
            time.sleep(0.1)


class HoldUntilSigterm(pl.Callback):
    """After training step ``step``, writes ``marker`` (holding this process's pid) and holds
    training until the process gets SIGTERM: the trial is caught running, and it can only end by
    the stop it is sent. Once only: a later trial that finds the marker trains on."""

    def __init__(self, marker: str, step: int = 2) -> None:
        self.marker = Path(marker)
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, *args) -> None:
        if trainer.global_step != self.step or self.marker.exists():
            return
        written = self.marker.with_suffix(".tmp")
        written.write_text(str(os.getpid()))
        written.replace(self.marker)  # whole or absent: the test reads the pid from it
        # Longer than a test waits for this process to end: a missing SIGTERM fails the test,
        # not this hold.
        deadline = time.monotonic() + 2 * WAIT_SECONDS
        while not trainer.received_sigterm:  # Lightning's SIGTERM handler sets it; training then stops
            if time.monotonic() > deadline:
                raise RuntimeError(f"HoldUntilSigterm: no SIGTERM within {2 * WAIT_SECONDS:g} s")
            time.sleep(0.05)
