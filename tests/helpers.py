"""Callbacks the tests attach to runs in other processes (importable as ``tests.helpers``)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import lightning.pytorch as pl
import torch


class RankRecorder(pl.Callback):
    """Write, per rank, the initial weights, a digest of every training batch, and the final weights."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.batches: list[str] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        torch.save(pl_module.model.state_dict(), self.out_dir / f"initial-{trainer.global_rank}.pt")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append(hashlib.sha1(batch["input_ids"].numpy().tobytes()).hexdigest())

    def on_train_end(self, trainer, pl_module) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        rank = trainer.global_rank
        torch.save(pl_module.model.state_dict(), self.out_dir / f"weights-{rank}.pt")
        (self.out_dir / f"batches-{rank}.json").write_text(
            json.dumps({"batches": self.batches, "world_size": trainer.world_size})
        )


class FailAtStep(pl.Callback):
    """Raise in the middle of training, as a crash would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"simulated crash at step {self.step}")


class FailAtBatch(pl.Callback):
    """Raise while training batch ``batch_index`` (0-based): as it starts (fetched, not run),
    after its forward pass (dropout has drawn random numbers, no backward yet), or after the
    whole batch (and its optimizer step, if it ends an accumulation window)."""

    def __init__(self, batch_index: int, where: str = "after_batch") -> None:
        self.batch_index = batch_index
        self.where = where
        self.current = -1

    def _fail(self) -> None:
        raise RuntimeError(f"simulated crash at batch {self.batch_index} ({self.where})")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.current = batch_idx
        # Before the module's own batch-start hook: the batch is fetched, nothing has run.
        if self.where == "batch_start" and batch_idx == self.batch_index:
            self._fail()

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        if self.where == "before_backward" and self.current == self.batch_index:
            self._fail()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.where == "after_batch" and batch_idx == self.batch_index:
            self._fail()


class FailAtEpochStart(pl.Callback):
    """Raise as epoch ``epoch`` starts, before any of its batches."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            raise RuntimeError(f"simulated crash at the start of epoch {self.epoch}")


class SignalAtStep(pl.Callback):
    """Send this process a signal once ``step`` optimizer steps are done, as a scheduler or a
    user's Ctrl-C would (on rank 0 only: under DDP the handler passes SIGTERM on to the others).
    ``during="backward"`` sends it in the middle of the next step instead, just before its
    backward pass, where the other ranks are about to all-reduce gradients."""

    def __init__(self, step: int, signal_name: str = "SIGTERM", during: str = "batch_end") -> None:
        self.step = step
        self.signal_name = signal_name
        self.during = during

    def _send(self, trainer) -> None:
        if trainer.global_step == self.step and trainer.is_global_zero:
            import os
            import signal

            self.step = -1  # once
            os.kill(os.getpid(), getattr(signal, self.signal_name))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.during == "batch_end":
            self._send(trainer)

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        if self.during == "backward":
            self._send(trainer)


class StopProcessAtStep(pl.Callback):
    """Stop a server process group once ``step`` optimizer steps are done, and wait until
    ``port`` refuses connections: an outage in the middle of a run."""

    def __init__(self, step: int, pid: int, port: int) -> None:
        self.step = step
        self.pid = pid
        self.port = port

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and trainer.is_global_zero:
            import os
            import signal
            import socket
            import time

            os.killpg(self.pid, signal.SIGKILL)  # the server and its workers, as a crash would
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                except OSError:
                    return
                time.sleep(0.1)
            raise RuntimeError(f"the server on port {self.port} did not stop")


def one_line_error(capsys, argv: list[str]) -> str:
    """The single ``error: ...`` line ``lmexp ARGV`` prints before it exits with status 2 (no traceback)."""
    import pytest

    from lmexp.cli import main

    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]
