"""Callbacks that show a test what each process of a multi-process run did: every rank writes
its own ``rank{N}.json`` into ``out_dir`` (importable as ``tests.distributed_probe``, so a run
in another process can name them in ``--trainer.callbacks`` or a config)."""

from __future__ import annotations

import atexit
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from tests.helpers import SignalAtStep

# Audit events (see the Python "audit events table") that create, change or remove a path.
WRITE_EVENTS = frozenset({"open", "os.mkdir", "os.rename", "os.remove", "os.rmdir", "os.truncate", "shutil.rmtree",
                          "shutil.move", "shutil.copyfile"})


def _record(out_dir: Path, trainer: pl.Trainer, **fields: Any) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {"rank": trainer.global_rank, "world_size": trainer.world_size, "pid": os.getpid(), **fields}
    (out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


class LastBatch(pl.Callback):
    """Record the last training batch each rank started and its step count when training
    ended, normally or by an exception (SIGTERM's ``SIGTERMException``, a crash): the fields
    ``batch_idx``, ``global_step`` and ``stopped_by`` (the exception's name, or null)."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.batch_idx = -1

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        # Recorded as the batch starts: a stop raised in a later callback's batch-end hook
        # skips this callback's own batch-end hook.
        self.batch_idx = batch_idx

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _record(self.out_dir, trainer, batch_idx=self.batch_idx, global_step=trainer.global_step, stopped_by=None)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        _record(self.out_dir, trainer, batch_idx=self.batch_idx, global_step=trainer.global_step,
                stopped_by=type(exception).__name__)


class WriteWatch(pl.Callback):
    """Record every attempt of this process to create, change or remove a path in ``watch``
    (folders) or a temporary sibling of one (``.lmexp-tmp-<pid>-<name>``, where atomic writes
    stage their files), from the moment training is set up until the process exits, through
    Python's audit hooks: whatever code writes, by whatever call. Written at exit with the
    run's ``world_size`` and ``global_step``, as ``rank{N}.json`` with a ``writes`` list of
    ``[event, path]``."""

    def __init__(self, out_dir: str, watch: list[str]) -> None:
        self.out_dir = Path(out_dir)
        self.watch = [Path(folder).resolve() for folder in watch]
        self.writes: list[list[str]] = []
        self.trainer: pl.Trainer | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.trainer is not None:
            return
        self.trainer = trainer  # its rank is known here, in each launched process
        sys.addaudithook(self._audit)
        atexit.register(self._save)

    def _audit(self, event: str, args: tuple[Any, ...]) -> None:
        if event not in WRITE_EVENTS:
            return
        if event == "open" and len(args) >= 3:
            path, mode, flags = args[:3]
            if mode is not None and not any(c in str(mode) for c in "wax+"):
                return
            if mode is None and isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) == 0:
                return
            args = (path,)
        for value in args:
            if isinstance(value, (str, bytes, os.PathLike)) and self._watched(value):
                self.writes.append([event, os.fsdecode(value)])

    def _watched(self, value: str | bytes | os.PathLike) -> bool:
        path = Path(os.path.abspath(os.fsdecode(value)))
        for folder in self.watch:
            if path == folder or folder in path.parents:
                return True
            if path.parent == folder.parent or folder.parent in path.parents:
                top = path.relative_to(folder.parent).parts[0]
                if top.startswith(".lmexp-tmp-") and top.endswith(f"-{folder.name}"):
                    return True
        return False

    def _save(self) -> None:
        trainer = self.trainer
        if trainer is not None:
            _record(self.out_dir, trainer, global_step=trainer.global_step, writes=self.writes)


class SignalOnRank(SignalAtStep):
    """``SignalAtStep`` on rank ``rank`` only: a signal that reaches one process of the job and
    not the others (a rank other than 0 passes it on to nobody), so the other ranks can learn of
    it only from the ranks' shared stop decision."""

    def __init__(self, step: int, rank: int, signal_name: str = "SIGTERM", during: str = "batch_end") -> None:
        super().__init__(step, signal_name, during)
        self.rank = rank

    def _send(self, trainer: pl.Trainer) -> None:
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            self.step = -1  # once
            os.kill(os.getpid(), getattr(signal, self.signal_name))
