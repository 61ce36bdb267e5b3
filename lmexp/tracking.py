"""MLflow tracking that does not stop training and, once training runs, does not slow it.

``MLflowTracker`` is a Lightning logger. Everything it records (metrics, params, tags,
artifacts, the run's end) goes through a queue to one background thread, which talks to the
tracking store. Training waits for it once, before its first step, until MLflow's start-up
records are sent (at most 30 s; see ``settle``), and then never: not for a slow server, not for
a dead one, while the thread sends at the lowest CPU priority. When the store cannot be reached, the
records are kept in order in a journal file beside the run (``tracking-journal.jsonl``), one
warning says so, and the thread keeps trying; whatever is still unsent at the end stays in the
journal, which ``lmexp runs sync FILE`` sends later.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers.logger import Logger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn

from lmexp.atomic import write_text
from lmexp.errors import ConfigError
from lmexp.mlflow_store import (
    JOURNAL_NAME,
    DamagedStoreError,
    TrackingStore,
    append_journal,
    check_experiment_name,
    check_tracking_uri,
    default_tracking_uri,
    flatten,
    is_unreachable,
    read_journal,
    write_journal,
    write_loss_curve,
)
from lmexp.system_metrics import DEFAULT_INTERVAL, SystemSampler

__all__ = [
    "MLflowTracker",
    "tracker_of",
]

_END_STATUS = {"success": "FINISHED", "failed": "FAILED", "killed": "KILLED"}

log = logging.getLogger(__name__)


_STOP = object()


def tracker_of(trainer: Any) -> MLflowTracker | None:
    """The trainer's MLflow tracker, if it has one among its loggers."""
    return next((logger for logger in trainer.loggers if isinstance(logger, MLflowTracker)), None)


class MLflowTracker(Logger):
    """Log a run to MLflow from a background thread, keeping records through outages.

    Args:
        tracking_uri: Where runs are stored: ``sqlite:///...``, ``http://host:port``, any MLflow
            store. Default: ``$MLFLOW_TRACKING_URI``, else ``mlflow.db`` in the working directory.
        experiment_name: MLflow experiment; default: the config file's name.
        run_name: Name of the run; default: its run folder's name.
        run_id: Continue this MLflow run instead of starting one (set from a checkpoint on resume).
        tags: Extra tags for the run.
        save_dir: The run folder (the journal goes there); the run builder sets it.
        export_max_mb: Upload the best checkpoint's safetensors export (as the artifacts of the
            run's logged model) when it is at most this many MB (0: never; the model then records
            where the export lies on this machine).
        retry_seconds: While the store is unreachable, how often to try again.
        system_metrics: Record CPU, memory, disk and GPU use as ``system/*`` metrics (the MLflow
            UI's System metrics tab); ``false`` turns it off.
        system_metrics_interval: Seconds between two system-metrics samples.
        log_model: At the end of a fit, log the best checkpoint's export as an MLflow model
            (LoggedModel) with its validation metrics, unless ``skip_model`` was called.
    """

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment_name: str | None = None,
        run_name: str | None = None,
        run_id: str | None = None,
        tags: dict[str, str] | None = None,
        save_dir: str | None = None,
        export_max_mb: float = 100.0,
        retry_seconds: float = 30.0,
        system_metrics: bool = True,
        system_metrics_interval: float = DEFAULT_INTERVAL,
        log_model: bool = True,
    ) -> None:
        super().__init__()
        self.tracking_uri = check_tracking_uri(tracking_uri or default_tracking_uri())
        if experiment_name is not None:
            check_experiment_name(experiment_name)
        self.experiment_name = experiment_name
        self.run_name = run_name
        self.resume_run_id = run_id
        self.tags = dict(tags or {})
        self._save_dir = save_dir
        self.export_max_mb = export_max_mb
        self.retry_seconds = retry_seconds
        if system_metrics_interval <= 0:
            raise ConfigError(f"system_metrics_interval={system_metrics_interval} must be positive: "
                              f"use seconds between samples, e.g. {DEFAULT_INTERVAL:g}")
        self.system_metrics = system_metrics
        self.system_metrics_interval = system_metrics_interval
        self.log_model = log_model
        self.model_skipped: str | None = None  # why this run logs no model (skip_model)
        self._sampler: SystemSampler | None = None
        self._last_step = 0  # the step system metrics are logged at: the training step they belong to
        self.stop_reason: str | None = None  # "killed" after Ctrl-C or SIGTERM
        self.history: dict[str, list[list[float]]] = collections.defaultdict(list)  # key -> [[step, value]]
        self._store: TrackingStore | None = None
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._connected = threading.Event()
        self._pending: collections.deque[dict[str, Any]] = collections.deque()
        self._offline_since: float | None = None
        self._problem = "unreachable"  # or "damaged": what the warnings call the store while offline
        self._next_retry = 0.0
        self._warned = False
        self._ended = True
        self._exit_hook = False
        self._abandoned = False
        self._journal_failed = False  # the journal could not be written (said once)

    def use_defaults(self, experiment_name: str, run_name: str, save_dir: str, run_id: str | None = None) -> None:
        """Fill in what the run builder knows and this tracker was not told."""
        self.experiment_name = self.experiment_name or check_experiment_name(experiment_name)
        self.run_name = self.run_name or run_name
        self._save_dir = self._save_dir or save_dir
        self.resume_run_id = self.resume_run_id or run_id

    # ------------------------------------------------------------ Lightning's Logger API
    @property
    def name(self) -> str | None:
        return self.experiment_name

    @property
    def version(self) -> str | None:
        return self.run_id

    @property
    def save_dir(self) -> str | None:
        return self._save_dir

    @property
    def log_dir(self) -> str | None:
        return self._save_dir

    @property
    def client(self) -> Any:
        """The run's ``MlflowClient`` (waits for the background start; None if the store is
        unreachable, and on every rank but 0, which never tracks)."""
        if rank_zero_only.rank != 0:
            return None
        if self._thread is None:
            self._start()
        self._connected.wait(timeout=60)
        return self._store.client if self._store is not None else None

    @property
    def run_id(self) -> str | None:
        """The MLflow run's id, None until the background start has created or reopened it.

        Never waits: Lightning reads it (as ``version``) on the first step, which must not stall.
        """
        if self._store is not None and self._store.run_id is not None:
            return self._store.run_id
        return self.resume_run_id

    def wait_for_run(self, timeout: float = 10.0) -> str | None:
        """The run id, waiting up to ``timeout`` seconds for the start (checkpoints need it)."""
        if self._thread is not None:
            self._connected.wait(timeout)
        return self.run_id

    @property
    def journal_path(self) -> Path:
        return Path(self._save_dir or os.getcwd()) / JOURNAL_NAME

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        values = {k: float(v) for k, v in metrics.items()}
        step = int(step or 0)
        self._last_step = step
        for key, value in values.items():
            if "loss" in key:
                self.history[key].append([step, value])
        self._send({"kind": "metrics", "values": values, "step": step, "time": int(time.time() * 1000)})

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        if not isinstance(params, Mapping):
            params = vars(params)
        self._send({"kind": "params", "values": flatten(params)})

    @rank_zero_only
    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._send({"kind": "tags", "values": {k: str(v) for k, v in tags.items()}})

    @rank_zero_only
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file or folder (sent when the run's queue reaches it: keep it in place)."""
        self._send({"kind": "artifact", "path": str(Path(path).resolve()), "artifact_path": artifact_path})

    @rank_zero_only
    def log_text(self, text: str, name: str) -> None:
        """Write ``text`` to ``name`` in the run folder and upload it."""
        path = Path(self._save_dir or ".") / name
        try:
            write_text(path, text)
        except OSError as err:  # a full disk: a record is lost, never the run
            self._cannot_keep(err)
            return
        self.log_artifact(path)

    def skip_model(self, reason: str) -> None:
        """Log no model for this run at the end of its fit (a pruned or failed sweep trial); the
        run is tagged ``lmexp.model_skipped`` with ``reason``. Safe to call on every rank, any
        number of times, at any point before the fit ends."""
        self.model_skipped = reason or "skipped"

    @rank_zero_only
    def log_best_model(self, export: str | Path | None, step: int | None, checkpoint: str | None = None,
                       monitor: str | None = None, score: float | None = None) -> None:
        """Log the best checkpoint's export as the run's MLflow model (sent like any record, so
        an outage keeps it in the journal); nothing when ``log_model`` is off or the model was
        skipped (then the run is tagged with the reason)."""
        if not self.log_model:
            return
        if self.model_skipped is not None:
            self.set_tags({"lmexp.model_skipped": self.model_skipped})
            return
        self._send({"kind": "model", "export": str(Path(export).resolve()) if export else None, "step": step,
                    "checkpoint": checkpoint, "monitor": monitor, "score": score, "max_mb": self.export_max_mb})

    @rank_zero_only
    def start_system_metrics(self) -> None:
        """Start sampling system metrics (when ``system_metrics`` is on) until the run ends: the
        run builder's recorder calls it as the run begins, on rank 0 only (one sampler per job;
        it reads the whole machine, GPUs included)."""
        if not self.system_metrics or self._sampler is not None:
            return
        self._start()
        self._sampler = SystemSampler(self._sample_system, self.system_metrics_interval, disk=self._save_dir or os.sep)
        self._sampler.start()

    def _sample_system(self, values: dict[str, float]) -> None:
        """The sampler's records join the queue (never restart a finished run's thread)."""
        if not self._ended:
            self._queue.put({"kind": "metrics", "values": values, "step": self._last_step,
                             "time": int(time.time() * 1000)})

    @rank_zero_only
    def log_loss_curve(self) -> None:
        """Plot every ``*loss`` metric against the step into ``loss_curve.png`` and upload it."""
        path = Path(self._save_dir or ".") / "loss_curve.png"
        self._send({"kind": "loss_curve", "path": str(path.resolve()), "local": dict(self.history)})

    @rank_zero_only
    def finalize(self, status: str) -> None:
        """End the run (FINISHED, FAILED, or KILLED after a stop) and wait for the queue to empty.

        Lightning's ``"finished"`` (SLURM requeue) flushes without ending: the run continues.
        """
        if self._thread is None or self._ended:
            return
        if status == "finished":
            self.flush()
            return
        if self._sampler is not None:  # its last sample goes before the end
            self._sampler.stop()
            self._sampler = None
        end = {"kind": "end", "status": _END_STATUS.get(self.stop_reason or status, "FAILED"),
               "time": int(time.time() * 1000)}
        self._ended = True
        if self._abandoned:  # an earlier flush gave up on the store: the end joins the journal
            self._pending.append(end)
            self._write_journal()
            return
        self._send(end)
        self.flush()
        self._queue.put(_STOP)  # the thread ends; logging again (a test after a fit) reopens the run
        self._thread.join(timeout=10)

    @property
    def offline(self) -> bool:
        """True while the store cannot be reached or used: records go to the journal."""
        return self._offline_since is not None

    def settle(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the records so far to be sent (or journaled),
        without giving up on the store; True if they were. Training waits here so that MLflow's
        start (its import, the store's set-up, the run's params and files) does not run beside
        the first steps, where it takes a core from the training threads. A store found
        unreachable ends the wait at once: its records wait in the journal, training need not."""
        if self._thread is None or not self._thread.is_alive():
            return True
        done = threading.Event()
        self._queue.put(("flush", done))
        deadline = time.monotonic() + timeout
        try:
            while not done.wait(min(0.05, max(deadline - time.monotonic(), 0))):
                if self.offline or time.monotonic() >= deadline:
                    return False
            return True
        finally:
            self._yield_to_training()

    def _yield_to_training(self) -> None:
        """Give the sending thread the lowest CPU priority (Linux sets it per thread), once
        training is about to start: its work then runs in the gaps the training threads leave,
        not in their place. Until then it runs at the process's priority, so that the start-up
        training waits for is not starved by other work on a busy machine."""
        native_id = getattr(self._thread, "native_id", None)
        if native_id is not None:
            with contextlib.suppress(AttributeError, OSError):
                os.setpriority(os.PRIO_PROCESS, native_id, 19)

    def flush(self, timeout: float = 120.0) -> None:
        """Wait until every record so far is sent or kept in the journal.

        A store too slow to take them all within ``timeout`` seconds is treated as unreachable:
        what is left goes to the journal, so a process that ends now loses nothing.
        """
        if self._thread is None or not self._thread.is_alive():
            return
        done = threading.Event()
        self._queue.put(("flush", done))
        if not done.wait(timeout):
            self._abandoned = True  # the thread stops sending; the journal takes the rest
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if isinstance(item, dict):
                    self._pending.append(item)
            self._write_journal()
        unsent = sum(1 for record in self._pending if record["kind"] != "connect")
        if unsent:
            message = (f"MLflow tracking store {self.tracking_uri} {self._problem}: {unsent} records of run "
                       f"{self.run_name!r} are kept in {self.journal_path}; send them with: "
                       f"lmexp runs sync {self.journal_path}")
            # One warning per outage: the first one already named the journal.
            (rank_zero_info if self._warned else rank_zero_warn)(message)
            self._warned = True

    def __getstate__(self) -> dict[str, Any]:
        # ddp_spawn pickles the trainer's loggers: the thread, queue and event stay behind.
        state = self.__dict__.copy()
        for name in ("_thread", "_queue", "_connected", "_pending", "_store", "_sampler"):
            state.pop(name)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._thread, self._store, self._sampler = None, None, None
        self._queue, self._connected, self._pending = queue.Queue(), threading.Event(), collections.deque()

    # --------------------------------------------------------------------- the worker
    def _start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        if self._store is None:
            # The process and host: ``lmexp runs`` tells a RUNNING run whose process is gone (killed).
            tags = {**self.tags, "lmexp.pid": str(os.getpid()), "lmexp.host": socket.gethostname()}
            self._store = TrackingStore(
                self.tracking_uri, self.experiment_name or "Default", self.run_name, self.resume_run_id,
                {**tags, "mlflow.runName": self.run_name} if self.run_name else tags,
            )
            self._adopt_journal()
        self._ended = False
        self._abandoned = False
        self._pending.appendleft({"kind": "connect"})  # (re)open the run before anything else
        self._thread = threading.Thread(target=self._work, name="lmexp-mlflow", daemon=True)
        self._thread.start()
        if not self._exit_hook:
            atexit.register(self._at_exit)
            self._exit_hook = True

    def _adopt_journal(self) -> None:
        """Records an earlier process of this run folder could not send (a resumed fit after an
        outage) go first, into the run they belong to; its journal is rewritten, never lost."""
        try:
            header, records = read_journal(self.journal_path)
        except (OSError, ConfigError):
            return
        if header.get("run_id") and not self._store.run_id:
            self._store.run_id = header["run_id"]
        self._store.start_time = header.get("start_time") or self._store.start_time
        self._pending.extend(records)

    def _send(self, record: dict[str, Any]) -> None:
        self._start()
        self._queue.put(record)

    def _at_exit(self) -> None:
        # A process that ends without Lightning's finalize (killed in the builder, an error
        # outside the trainer) must not leave its run "RUNNING".
        if not self._ended:
            self.finalize("failed")

    def _work(self) -> None:
        while not self._abandoned:
            wait = max(self._next_retry - time.monotonic(), 0.05) if self._offline_since else None
            try:
                item = self._queue.get(timeout=wait)
            except queue.Empty:
                item = None
            if item is _STOP:
                return
            if isinstance(item, tuple):  # ("flush", event): one last try, then report back
                try:
                    self._drain(force=True)
                finally:
                    item[1].set()  # whoever waits is never left waiting out its timeout
                continue
            if item is not None:
                self._pending.append(item)
                if self._offline_since:
                    try:
                        append_journal(self.journal_path, [item])
                    except OSError as err:
                        self._cannot_keep(err)
                    self._draw_offline([item])
            self._drain()

    def _drain(self, force: bool = False) -> None:
        if self._offline_since and not force and time.monotonic() < self._next_retry:
            return
        sent = 0
        while self._pending and not self._abandoned:
            record = self._pending[0]
            try:
                if record["kind"] == "connect":
                    self._store.connect()
                else:
                    self._store.apply(record)
            except Exception as err:
                if record["kind"] == "connect":
                    self._connected.set()  # nobody waits for a run that cannot start now
                elif not is_unreachable(err):
                    # The store refused this record (a value it rejects): drop it, say so.
                    log.warning(f"MLflow refused a {record['kind']} record of run {self.run_name!r}: {err}")
                    self._pending.popleft()
                    continue
                self._go_offline(err, rewrite=sent > 0 or not self._offline_since)
                return
            if record["kind"] == "connect":
                self._connected.set()
            self._pending.popleft()
            sent += 1
        if self._abandoned:  # flush gave up on this store: the journal it wrote stays
            return
        if self._offline_since or self.journal_path.exists():
            self.journal_path.unlink(missing_ok=True)
            if self._offline_since:
                took = time.monotonic() - self._offline_since
                self._offline_since, self._problem = None, "unreachable"
                log.warning(f"MLflow tracking store reachable again after {took:.0f}s: {sent} kept records sent")

    def _go_offline(self, err: BaseException, rewrite: bool) -> None:
        self._next_retry = time.monotonic() + self.retry_seconds
        self._offline_since = self._offline_since or time.monotonic()
        damaged = isinstance(err, DamagedStoreError)
        if rewrite:  # what is still unsent, in order (a retry may have sent a part)
            self._write_journal()
        if self._problem == "damaged" or (self._warned and not damaged):
            return  # one warning per outage; a damaged store is named once
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        self._warned = True
        if damaged:
            self._problem = "damaged"
            rank_zero_warn(
                f"{first}; training goes on and its records are kept in {self.journal_path} "
                f"(send them once the store is fixed: lmexp runs sync {self.journal_path}, "
                f"or elsewhere with --tracking_uri URI)"
            )
        else:
            rank_zero_warn(
                f"MLflow tracking store {self.tracking_uri} unreachable ({first}); training goes on and its "
                f"records are kept in {self.journal_path}, sent when the store is back "
                f"(or later with: lmexp runs sync {self.journal_path})"
            )

    def _draw_offline(self, records: list[dict[str, Any]]) -> None:
        """The loss curve the store's thread would draw, drawn here from the local history:
        the run folder gets its ``loss_curve.png`` even while the store is away."""
        for record in records:
            if record["kind"] == "loss_curve":
                history = {key: [(int(step), value) for step, value in points] for key, points in record["local"].items()}
                with contextlib.suppress(Exception):  # a plot must never stop training
                    write_loss_curve(history, Path(record["path"]),
                                     title=f"{self.experiment_name} / {self.run_name}")

    def _write_journal(self) -> None:
        store = self._store
        header = {"kind": "run", "tracking_uri": store.tracking_uri, "experiment": store.experiment_name,
                  "run_name": store.run_name, "run_id": store.run_id, "tags": store.tags,
                  "start_time": store.start_time}
        records = [r for r in list(self._pending) if r["kind"] != "connect"]
        try:
            write_journal(self.journal_path, header, records)
        except OSError as err:  # a full disk: the records stay in memory, sent if the store comes back
            self._cannot_keep(err)
            return
        self._draw_offline(records)

    def _cannot_keep(self, err: OSError) -> None:
        """Say once that the journal cannot be written; never raise (in the tracker's thread that
        would end it, at the end of a run it would hide the error that stopped the run)."""
        if not self._journal_failed:
            self._journal_failed = True
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            rank_zero_warn(f"tracking records of run {self.run_name!r} cannot be kept on disk ({first}); "
                           "they are held in memory and sent if the store answers before the process ends")
