"""MLflow stores without Lightning: URI checks, config flattening, applying records to a run,
the loss-curve plot, listing runs, and sending a journal kept while a store was unreachable."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import re
import socket
import sqlite3
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lmexp.atomic import (
    fsync_folder,
    process_alive,
    remove_stale_temporaries,
    storage_error,
    temporary_sibling,
    write_text,
)
from lmexp.errors import ConfigError, LmexpError, StorageError
from lmexp.faults import fault_point

__all__ = [
    "EXPORT_DIR_TAG",
    "JOURNAL_NAME",
    "MAX_EXPERIMENT_NAME",
    "MAX_KEY_LENGTH",
    "MAX_PARAM_LENGTH",
    "MODEL_SKIPPED_TAG",
    "MODEL_TAG",
    "PROBE_SECONDS",
    "PROCESS_TAGS",
    "DamagedStoreError",
    "TrackingStore",
    "append_journal",
    "check_experiment_name",
    "check_store",
    "check_tracking_uri",
    "default_tracking_uri",
    "end_dead_runs",
    "ensure_store",
    "flatten",
    "http_store",
    "is_unreachable",
    "list_runs",
    "log_best_model",
    "probe_server",
    "process_gone",
    "read_journal",
    "sqlite_path",
    "store_error",
    "sync_journal",
    "write_journal",
    "write_loss_curve",
]

JOURNAL_NAME = "tracking-journal.jsonl"
PROCESS_TAGS = ("lmexp.pid", "lmexp.host")  # which process writes a run: a RUNNING run whose process is gone was killed
MAX_KEY_LENGTH, MAX_PARAM_LENGTH, MAX_EXPERIMENT_NAME = 250, 6000, 500  # MLflow's limits
_STORE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks", "file")

log = logging.getLogger(__name__)


def default_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI``, else an SQLite file ``mlflow.db`` in the working directory
    (MLflow 3's own default, spelled out: Lightning's MLFlowLogger still picks ``./mlruns``,
    a file store MLflow 3 refuses)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def check_tracking_uri(uri: str) -> str:
    """Refuse a tracking URI that cannot work, before training starts: an unknown scheme, a
    server address without a host, an SQLite file in a folder that cannot be written."""
    parsed = urlparse(uri)
    scheme = parsed.scheme.split("+")[0]  # postgresql+psycopg2://...
    example = "sqlite:////abs/path/mlflow.db or http://127.0.0.1:5000"
    if scheme not in _STORE_SCHEMES:
        raise ConfigError(f"tracking URI {uri!r} is not a store MLflow knows: use {example}")
    if scheme in ("http", "https") and not parsed.hostname:
        raise ConfigError(f"tracking URI {uri!r} names no host: use http://HOST:PORT, e.g. http://127.0.0.1:5000")
    if scheme == "sqlite":
        path = sqlite_path(uri)
        if path is None:
            raise ConfigError(f"tracking URI {uri!r} names no database file: use sqlite:////abs/path/mlflow.db")
        folder = next((p for p in (path.parent, *path.parents) if p.exists()), None)
        usable = path.is_file() if path.exists() else folder is not None and folder.is_dir()
        if not usable or not os.access(path if path.exists() else folder, os.W_OK):
            raise ConfigError(
                f"tracking store {str(path)!r} cannot be written: choose a writable place "
                "(MLFLOW_TRACKING_URI=sqlite:////abs/path/mlflow.db) or turn tracking off with --trainer.logger false"
            )
    return uri


def sqlite_path(uri: str) -> Path | None:
    """The database file of an ``sqlite:///`` URI (None for other stores or an in-memory one)."""
    if not uri.startswith("sqlite:"):
        return None
    path = uri[len("sqlite:"):].lstrip("/")
    if not path or path == ":memory:":
        return None
    # sqlite:///relative/file and sqlite:////absolute/file, as SQLAlchemy reads them.
    return Path("/" + path) if uri.startswith("sqlite:////") else Path(path).resolve()


def check_experiment_name(name: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"experiment name {name!r} is empty: pass --experiment NAME")
    if len(name) > MAX_EXPERIMENT_NAME:
        raise ConfigError(
            f"experiment name {name[:40]!r}... has {len(name)} characters, more than MLflow's {MAX_EXPERIMENT_NAME}: "
            "pass a shorter --experiment"
        )
    return name


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> ``{"model.lr": "0.001", ...}`` as MLflow params.

    LightningCLI's ``init_args`` level is left out of the keys (``model.lr``, as the short flags
    spell it); lists are indexed; values longer than MLflow's limit are cut with a marker.
    """
    flat: dict[str, str] = {}
    items = values.items() if isinstance(values, Mapping) else enumerate(values)
    for key, value in items:
        name = prefix if key == "init_args" else f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) or (isinstance(value, (list, tuple)) and value and
                                          any(isinstance(v, (Mapping, list, tuple)) for v in value)):
            flat.update(flatten(value, name))
        else:
            text = json.dumps(value) if isinstance(value, (list, tuple, bool)) or value is None else str(value)
            if len(text) > MAX_PARAM_LENGTH:
                text = text[: MAX_PARAM_LENGTH - 14] + "...[truncated]"
            if len(name) <= MAX_KEY_LENGTH:
                flat[name] = text
    return flat


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """Serialize the creation of an SQLite store and its experiments across processes.

    Several processes creating the same SQLite store or experiment at once race in MLflow
    (schema migration, duplicate experiment names); a file lock beside the database makes them
    take turns (waiting as long as it takes). Other stores handle concurrency themselves.
    """
    path = sqlite_path(uri)
    if path is None:
        yield
        return
    from filelock import FileLock

    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(path.with_name(path.name + ".lock")):
        yield


class DamagedStoreError(StorageError):
    """An SQLite tracking store MLflow cannot open: an interrupted migration, not a database."""


def _damaged(path: Path, why: str) -> DamagedStoreError:
    return DamagedStoreError(
        f"tracking store {path} is damaged ({why}): move it aside (mv {path} {path}.broken) and rerun, "
        "or set MLFLOW_TRACKING_URI to another store"
    )


def _tables(path: Path) -> set[str] | None:
    """The tables of an SQLite file (None when there is no file); a file that is no database is damaged."""
    if not path.exists():
        return None
    try:
        with contextlib.closing(sqlite3.connect(path, timeout=30)) as db:  # a SELECT: the file stays as it is
            return {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.OperationalError as err:
        if "locked" in str(err):
            raise  # busy, not broken: the caller retries later
        raise _damaged(path, _first_line(err)) from None
    except sqlite3.DatabaseError as err:
        raise _damaged(path, _first_line(err)) from None


def check_store(path: Path) -> None:
    """Refuse, in one line, a store a killed migration left half made (MLflow's own error there is
    "table _alembic_tmp_runs already exists", then the same on every run, forever)."""
    tables = _tables(path) or set()
    if any(name.startswith("_alembic_tmp_") for name in tables):
        raise _damaged(path, "a migration of its tables was interrupted")
    if tables and "alembic_version" not in tables:
        raise _damaged(path, "it holds tables but no MLflow schema version: not an MLflow store")


def ensure_store(uri: str) -> None:
    """Make sure an SQLite store exists whole: created complete or not at all, never half.

    MLflow migrates a new database in place, in many steps: a kill in between leaves a file every
    later client fails on, and two processes migrating one file at once collide. Here a new store
    is made and migrated in a temporary file beside it, under the store's lock, and renamed into
    place; a store found damaged is refused in one line. Other stores are left to their server.
    """
    path = sqlite_path(uri)
    if path is None:
        return
    with _store_lock(uri):
        if not _tables(path):  # no file, or an empty one (nothing in it to lose)
            _create_store(path)
    check_store(path)


def _create_store(path: Path) -> None:
    _quiet_mlflow()
    from mlflow.store.tracking import DEFAULT_LOCAL_FILE_AND_ARTIFACT_PATH
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    remove_stale_temporaries(path.parent)  # what a creation killed earlier left
    temporary = temporary_sibling(path)

    def remove_temporary() -> None:
        for leftover in path.parent.glob(temporary.name + "*"):  # the file and SQLite's journal
            leftover.unlink(missing_ok=True)

    remove_temporary()
    try:
        store = SqlAlchemyStore(f"sqlite:///{temporary}", DEFAULT_LOCAL_FILE_AND_ARTIFACT_PATH)
        fault_point("store.create", path=path)
        store.engine.dispose()
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
        fsync_folder(path.parent)
    except OSError as err:
        remove_temporary()
        raise storage_error(err, path) from None
    except BaseException:
        remove_temporary()
        raise


def store_error(uri: str, err: BaseException) -> BaseException:
    """What to raise for an MLflow failure on ``uri``: an outage or an lmexp error as it is, a
    failing SQLite store as a one-line error naming the file and the fix."""
    path = sqlite_path(uri)
    if isinstance(err, LmexpError) or is_unreachable(err) or path is None:
        return err
    try:
        check_store(path)
    except DamagedStoreError as damaged:
        return damaged
    except sqlite3.Error:
        return err
    return DamagedStoreError(
        f"tracking store {path} cannot be used ({_first_line(err)}): move it aside (mv {path} {path}.broken) "
        "and rerun, or set MLFLOW_TRACKING_URI to another store"
    )


def _quiet_mlflow() -> None:
    """MLflow announces database creation and migrations at INFO: noise in a training log. Its
    database layer also logs every failed query with a traceback at ERROR, though the error is
    raised to the caller as well, which here keeps the records and says so in one line."""
    for name in ("alembic", "alembic.runtime.migration", "mlflow.tracking.fluent"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)


class TrackingStore:
    """Applies journal records to one MLflow run; used by the tracker's thread and by ``sync``."""

    def __init__(self, tracking_uri: str, experiment_name: str, run_name: str | None, run_id: str | None = None,
                 tags: Mapping[str, str] | None = None, start_time: int | None = None) -> None:
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.run_name = run_name
        self.run_id = run_id
        self.tags = dict(tags or {})
        self.client: Any = None
        self.logged_params: dict[str, str] = {}
        self.resumed = False
        self.start_time = start_time or int(time.time() * 1000)  # when the run began, not when the store answered

    def connect(self) -> None:
        """Create the experiment and the run, or reopen the run this one continues."""
        try:
            self._connect()
        except Exception as err:
            raise store_error(self.tracking_uri, err) from None

    def _connect(self) -> None:
        if http_store(self.tracking_uri):
            # MLflow retries a failed request for minutes by default; here a failure only means
            # "keep the records and try again later", so fail fast.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
            # One warning of ours says the store is unreachable, not one of urllib3's per retry.
            logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
            probe_server(self.tracking_uri)
        ensure_store(self.tracking_uri)
        _quiet_mlflow()
        from mlflow import MlflowClient

        client = MlflowClient(self.tracking_uri)
        if self.run_id is not None:
            try:
                run = client.get_run(self.run_id)
            except Exception as err:
                if is_unreachable(err):
                    raise
                log.warning(f"MLflow run {self.run_id} is not in {self.tracking_uri}: starting a new run")
                self.run_id = None
            else:
                client.update_run(self.run_id, status="RUNNING")
                for key in PROCESS_TAGS:  # the process that now writes the run
                    if key in self.tags:
                        client.set_tag(self.run_id, key, self.tags[key])
                self.logged_params = dict(run.data.params)
                self.resumed = True
        if self.run_id is None:
            with _store_lock(self.tracking_uri):
                experiment = client.get_experiment_by_name(self.experiment_name)
                if experiment is None:
                    path = sqlite_path(self.tracking_uri)
                    # Artifacts beside the database, wherever the process was started.
                    location = str(path.parent / "mlartifacts" / self.experiment_name) if path else None
                    # The UI then opens it on its training-runs views rather than the GenAI ones.
                    experiment_id = client.create_experiment(
                        self.experiment_name, artifact_location=location,
                        tags={"mlflow.experimentKind": "custom_model_development"},
                    )
                elif experiment.lifecycle_stage == "deleted":
                    client.restore_experiment(experiment.experiment_id)
                    experiment_id = experiment.experiment_id
                else:
                    experiment_id = experiment.experiment_id
            run = client.create_run(experiment_id, start_time=self.start_time, run_name=self.run_name, tags=self.tags)
            self.run_id = run.info.run_id
        self.client = client

    def apply(self, record: dict[str, Any]) -> None:
        from mlflow.entities import Metric, Param, RunTag

        kind = record["kind"]
        if kind == "metrics":
            metrics = [Metric(k, float(v), record["time"], record["step"]) for k, v in record["values"].items()]
            for start in range(0, len(metrics), 1000):
                self.client.log_batch(self.run_id, metrics=metrics[start:start + 1000], synchronous=True)
        elif kind == "params":
            new = {k: v for k, v in record["values"].items() if k not in self.logged_params}
            # A resumed run may change a setting (max_steps, say): params are write-once in
            # MLflow, so the new value becomes a tag.
            changed = {f"resumed_with.{k}": v for k, v in record["values"].items()
                       if k in self.logged_params and self.logged_params[k] != v}
            params = [Param(k, v) for k, v in new.items()]
            for start in range(0, len(params), 100):
                self.client.log_batch(self.run_id, params=params[start:start + 100], synchronous=True)
            self.logged_params.update(new)
            if changed:
                self.apply({"kind": "tags", "values": changed})
        elif kind == "tags":
            tags = [RunTag(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in record["values"].items()]
            for start in range(0, len(tags), 100):
                self.client.log_batch(self.run_id, tags=tags[start:start + 100], synchronous=True)
        elif kind == "artifact":
            path = Path(record["path"])
            if path.is_dir():
                self.client.log_artifacts(self.run_id, str(path), record.get("artifact_path"))
            elif path.is_file():
                self.client.log_artifact(self.run_id, str(path), record.get("artifact_path"))
        elif kind == "loss_curve":
            history = {key: self._history(key, record["local"].get(key, [])) for key in record["local"]}
            out = Path(record["path"])
            if write_loss_curve(history, out, title=f"{self.experiment_name} / {self.run_name}"):
                self.client.log_artifact(self.run_id, str(out))
        elif kind == "model":
            log_best_model(self.client, self.run_id, record.get("export"), record.get("step"), record.get("monitor"),
                           record.get("score"), float(record.get("max_mb", 100.0)), record.get("checkpoint"))
        elif kind == "end":
            self.client.set_terminated(self.run_id, status=record["status"], end_time=record["time"])
        else:
            raise ValueError(f"unknown tracking record {kind!r}")

    def _history(self, key: str, local: list[list[float]]) -> list[tuple[int, float]]:
        """A metric's whole history from the store (both halves of a resumed run), else the local one."""
        try:
            return [(m.step, m.value) for m in self.client.get_metric_history(self.run_id, key)]
        except Exception:
            return [(int(step), value) for step, value in local]


# ------------------------------------------------------------------ a run's best model
MODEL_TAG = "lmexp.model_id"  # on a run: the LoggedModel of its best checkpoint
MODEL_SKIPPED_TAG = "lmexp.model_skipped"  # on a run: why it logged no model (a pruned trial)
EXPORT_DIR_TAG = "lmexp.export_dir"  # on a model: the export folder on the machine that trained it
_STEP_TAG = "lmexp.step"
_BAD_NAME = re.compile(r"[/:.%\"']")  # characters MLflow refuses in a LoggedModel's name


def _export_megabytes(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file()) / 1e6


def _run_metrics_at(client: Any, run: Any, step: int | None, monitor: str | None, score: float | None) -> list[Any]:
    """The validation metrics of the best checkpoint, as the run logged them (same step and time,
    so linking them to the model adds no point to the run's history): the validation whose
    ``monitor`` value is the checkpoint's score, else the last one logged at or before its step."""
    keys = [key for key in run.data.metrics if key.startswith("val/")]
    histories = {key: client.get_metric_history(run.info.run_id, key) for key in keys}
    chosen: int | None = None
    if monitor in histories and score is not None:
        matches = [m.step for m in histories[monitor] if math.isclose(m.value, score, rel_tol=1e-6, abs_tol=1e-9)]
        chosen = max(matches) if matches else None
    if chosen is None:
        steps = [m.step for points in histories.values() for m in points if step is None or m.step <= step]
        chosen = max(steps) if steps else None
    if chosen is None:
        return []
    picked = []
    for points in histories.values():
        at = [m for m in points if m.step == chosen]
        if at:
            picked.append(max(at, key=lambda m: m.timestamp))
    return picked


def _existing_model(client: Any, run: Any, step: int | None) -> Any | None:
    """The model an earlier try logged for this checkpoint (a journal sent twice logs it once)."""
    found = client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'")
    for model in found:
        if model.tags.get(_STEP_TAG) == str(step):
            return model
    return None


def log_best_model(client: Any, run_id: str, export: str | Path | None, step: int | None = None,
                   monitor: str | None = None, score: float | None = None, max_mb: float = 100.0,
                   checkpoint: str | None = None) -> str:
    """Log a run's best checkpoint as a LoggedModel; returns its id.

    Its artifacts are the export folder's files when the folder exists and is at most ``max_mb``
    MB (else the model records where the export lies, and loads from there on that machine); its
    metrics are the run's validation metrics at the checkpoint; its params the network and size.
    """
    from mlflow.entities import LoggedModelOutput, Metric

    run = client.get_run(run_id)
    folder = Path(export) if export else None
    model = _existing_model(client, run, step)
    if model is not None and str(model.status) in ("READY", "LoggedModelStatus.READY"):
        return model.model_id
    if model is None:
        params = {k: v for k, v in run.data.params.items() if k.startswith("network.") or k == "n_parameters"}
        tags = {_STEP_TAG: str(step), "lmexp.run_dir": run.data.tags.get("run_dir", "")}
        if checkpoint:
            tags["lmexp.checkpoint"] = str(checkpoint)
        if folder is not None:
            tags[EXPORT_DIR_TAG] = str(folder.resolve())
        name = _BAD_NAME.sub("-", run.info.run_name or "model") or "model"
        model = client.create_logged_model(run.info.experiment_id, name=name, source_run_id=run_id, tags=tags,
                                           params=params, model_type=run.data.tags.get("objective") or None)
    model_id = model.model_id
    if folder is not None and folder.is_dir() and 0 < _export_megabytes(folder) <= max_mb:
        client.log_model_artifacts(model_id, str(folder))
    metrics = _run_metrics_at(client, run, step, monitor, score)
    if metrics:
        linked = [Metric(m.key, m.value, m.timestamp, m.step, model_id=model_id) for m in metrics]
        client.log_batch(run_id, metrics=linked, synchronous=True)
    client.log_outputs(run_id, [LoggedModelOutput(model_id, step if step is not None else 0)])
    client.finalize_logged_model(model_id, "READY")
    client.set_tag(run_id, MODEL_TAG, model_id)
    return model_id


PROBE_SECONDS = 3.0  # a tracking server that takes longer to accept a connection counts as down


def probe_server(uri: str, timeout: float = PROBE_SECONDS) -> None:
    """Raise ConnectionError unless the server of an http(s) URI accepts a TCP connection within
    ``timeout`` seconds: a host that drops packets is found out at once, not after MLflow's
    requests have waited out their timeouts and retries (training waits for the first answer)."""
    import socket

    parsed = urlparse(uri)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=timeout).close()
    except OSError as err:
        raise ConnectionError(f"{uri} accepts no connection ({err or type(err).__name__})") from None


def http_store(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


# MLflow error codes that mean "not now" rather than "never": a store down, locked or rate
# limited, or credentials to renew. Records are kept and sent later.
_RETRY_LATER_CODES = ("TEMPORARILY_UNAVAILABLE", "RESOURCE_EXHAUSTED", "PERMISSION_DENIED", "UNAUTHENTICATED")


def is_unreachable(err: BaseException) -> bool:
    """A store that could not be reached (retry later), as opposed to one that refused a record."""
    if getattr(err, "error_code", None) in _RETRY_LATER_CODES:
        return True
    if isinstance(err, (ConnectionError, TimeoutError)):
        return True
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):  # room may be made
        return True
    try:
        import requests

        if isinstance(err, requests.exceptions.RequestException):
            return True
    except ImportError:
        pass
    text = str(err)
    # "database or disk is full": SQLite on a full disk; kept and retried once there is room.
    return any(words in text for words in ("Max retries exceeded", "timed out", "database is locked",
                                           "database or disk is full"))


def write_loss_curve(history: Mapping[str, list[tuple[int, float]]], path: Path, title: str = "") -> bool:
    """Loss (and other ``*/loss`` metrics) against optimizer step, as a PNG; False if nothing to draw."""
    series = {k: sorted(dict(v).items()) for k, v in history.items() if v}
    if not series:
        return False
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.2), dpi=110)
    for key, points in sorted(series.items()):
        steps, values = zip(*points)
        axes.plot(steps, values, label=key, marker="o" if len(points) < 40 else None, markersize=3)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss (nats per token)")
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return True


def read_journal(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A journal's header (the run it belongs to) and its records, in order.

    A last line cut short (the process was killed while appending it) is left out: every line
    before it is whole. A bad line anywhere else means the file is not a journal."""
    texts = [(number, line) for number, line in
             enumerate(Path(path).read_text(encoding="utf-8", errors="replace").splitlines(), 1) if line.strip()]
    lines = []
    for index, (number, text) in enumerate(texts):
        try:
            lines.append(json.loads(text))
        except json.JSONDecodeError as err:
            if index == len(texts) - 1 and index > 0:
                log.warning(f"journal {path}: its last line (line {number}) was cut short; the lines before it are read")
                break
            raise ConfigError(f"journal {str(path)!r} is not a tracking journal: line {number} is not a record "
                              f"({err}); pass the tracking-journal.jsonl a run's warning named") from None
    if not lines or not isinstance(lines[0], dict) or lines[0].get("kind") != "run":
        raise ConfigError(f"journal {str(path)!r} is not a tracking journal: its first line names no run")
    return lines[0], lines[1:]


def write_journal(path: Path, header: dict[str, Any], records: list[dict[str, Any]]) -> None:
    """Replace a journal atomically: a process killed while writing leaves the old one whole."""
    write_text(path, "".join(json.dumps(record) + "\n" for record in [header, *records]), fault="journal.write")


def append_journal(path: Path, records: list[dict[str, Any]]) -> None:
    """Add records and fsync: a kill cuts at most the last line, which ``read_journal`` leaves out."""
    text = "".join(json.dumps(record) + "\n" for record in records)
    with open(path, "a", encoding="utf-8") as f:
        f.write(text[: len(text) // 2])
        f.flush()
        fault_point("journal.write", path=path)
        f.write(text[len(text) // 2:])
        f.flush()
        os.fsync(f.fileno())


def process_gone(tags: Mapping[str, str]) -> bool:
    """True when the process that wrote a run (its ``lmexp.pid`` on ``lmexp.host``) no longer runs
    on this host; False when it runs, is elsewhere, or is not known."""
    pid, host = tags.get("lmexp.pid", ""), tags.get("lmexp.host")
    if not pid.isdigit() or host != socket.gethostname():
        return False
    return not process_alive(int(pid))


def sync_journal(path: str | Path, tracking_uri: str | None = None) -> str:
    """Send a journal left by a run whose tracking store was unreachable; returns the run id.

    The run it names is continued when the store has it, else created (once: the journal then
    names it). ``tracking_uri`` sends it to another store than the one it names (a new run there).
    Records the store refuses are skipped with a warning. If the store fails part of the way, the
    journal keeps exactly what is still unsent, so running sync again neither loses nor repeats a
    record. The journal is removed once every record is sent. A run whose journal holds no end and
    whose process is gone was killed: it is ended KILLED rather than left RUNNING.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"journal {str(path)!r} does not exist: pass the file named in the run's warning")
    header, records = read_journal(path)
    uri = check_tracking_uri(tracking_uri) if tracking_uri else header["tracking_uri"]
    run_id = header["run_id"] if uri == header["tracking_uri"] else None  # an id of the named store only
    store = TrackingStore(uri, header["experiment"], header["run_name"], run_id, header.get("tags"),
                          header.get("start_time"))
    try:
        store.connect()
    except LmexpError:
        raise
    except Exception as err:
        raise ConfigError(f"tracking store {store.tracking_uri} still unreachable ({_first_line(err)}): "
                          f"nothing sent; try again later") from None
    header = {**header, "tracking_uri": uri, "run_id": store.run_id}
    if not any(record["kind"] == "end" for record in records) and process_gone(header.get("tags") or {}):
        last = max((record.get("time", 0) for record in records), default=0)
        records = [*records, {"kind": "end", "status": "KILLED", "time": last or int(time.time() * 1000)}]
    for sent, record in enumerate(records):
        try:
            store.apply(record)
        except Exception as err:
            if not is_unreachable(err):
                log.warning(f"MLflow refused a {record['kind']} record of run {store.run_name!r}: {_first_line(err)}")
                continue
            write_journal(path, header, records[sent:])
            raise ConfigError(f"tracking store {store.tracking_uri} unreachable after {sent} of {len(records)} "
                              f"records ({_first_line(err)}): the rest stay in {path}; run sync again later") from None
    path.unlink()
    return store.run_id


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


def list_runs(tracking_uri: str | None = None, experiment: str | None = None, limit: int = 20) -> list[dict[str, Any]]:
    """The newest runs of a store, newest first: name, status, times, key metrics, checkpoint.

    A RUNNING run whose process is gone from this host shows as ``KILLED?`` (the store is not
    changed: a resumed fit continues that run); a run that did not finish shows its
    ``interrupted.ckpt`` when its run folder has one."""
    uri = check_tracking_uri(tracking_uri or default_tracking_uri())
    path = sqlite_path(uri)
    if path is not None and not path.is_file():
        raise ConfigError(f"no tracking store at {str(path)!r} yet: train a run first (lmexp fit --config CONFIG), "
                          "or pass --tracking_uri / set MLFLOW_TRACKING_URI")
    with _one_line_errors(uri):
        return _list_runs(uri, experiment, limit)


@contextlib.contextmanager
def _one_line_errors(uri: str) -> Iterator[None]:
    """Whatever MLflow raises while a command reads or changes a store becomes one line."""
    try:
        yield
    except LmexpError:
        raise
    except Exception as err:
        failure = store_error(uri, err)
        if isinstance(failure, LmexpError):
            raise failure from None
        state = "unreachable" if is_unreachable(err) else "failed"
        raise ConfigError(f"tracking store {uri} {state} ({_first_line(err)}): check it, or pass --tracking_uri") from None


def end_dead_runs(tracking_uri: str | None = None, dry_run: bool = False) -> list[str]:
    """End as KILLED the RUNNING runs of a store whose process is gone from this host (killed with
    SIGKILL, they could not end themselves); returns their names. A fit resumed later reopens its
    run as RUNNING. Nothing is done to a store that does not exist yet."""
    uri = check_tracking_uri(tracking_uri or default_tracking_uri())
    path = sqlite_path(uri)
    if path is not None and not path.is_file():
        return []
    with _one_line_errors(uri):
        ensure_store(uri)
        _quiet_mlflow()
        from mlflow import MlflowClient

        client = MlflowClient(uri)
        ids = [e.experiment_id for e in client.search_experiments()]
        running = client.search_runs(ids, filter_string="attributes.status = 'RUNNING'", max_results=10000) if ids else []
        dead = [run for run in running if process_gone(run.data.tags)]
        if not dry_run:
            for run in dead:
                client.set_terminated(run.info.run_id, "KILLED")
    return [run.info.run_name for run in dead]


def _list_runs(uri: str, experiment: str | None, limit: int) -> list[dict[str, Any]]:
    import datetime

    ensure_store(uri)
    _quiet_mlflow()
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    if experiment is not None:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise ConfigError(f"experiment {experiment!r} is not in {uri}: run lmexp runs without --experiment to see all")
        experiments = [found]
    else:
        experiments = client.search_experiments()
    names = {e.experiment_id: e.name for e in experiments}
    runs = client.search_runs(list(names), order_by=["attributes.start_time DESC"], max_results=limit) if names else []
    rows = []
    for run in runs:
        info, data = run.info, run.data
        ended = info.end_time or (None if info.status == "RUNNING" else info.start_time)
        folder = Path(data.tags["run_dir"]) if "run_dir" in data.tags else None
        rows.append({
            "run": info.run_name, "run_id": info.run_id, "experiment": names.get(info.experiment_id),
            "status": "KILLED?" if info.status == "RUNNING" and process_gone(data.tags) else info.status,
            "started": datetime.datetime.fromtimestamp(info.start_time / 1000).strftime("%Y-%m-%d %H:%M"),
            "minutes": round((ended - info.start_time) / 60000, 1) if ended else None,
            "steps": data.tags.get("global_step"),
            **{key: data.metrics.get(key) for key in LISTED_METRICS},
            "run_dir": str(folder) if folder is not None else None,
            "checkpoint": _run_checkpoint(folder, info.status, data.tags),
        })
    return rows


LISTED_METRICS = ("train/loss", "val/loss", "val/ppl", "val/acc", "val/f1",
                  "test/loss", "test/ppl", "test/acc", "test/f1")  # what lmexp runs can show


def _run_checkpoint(folder: Path | None, status: str, tags: Mapping[str, str]) -> str | None:
    """The checkpoint a run's row names: an unfinished run's ``interrupted.ckpt`` (where it resumes),
    else its best (tagged, or ``best.ckpt`` in its folder), else ``interrupted.ckpt`` or
    ``last.ckpt`` (a run stopped before its first validation has only those); an evaluation's,
    the checkpoint it evaluated."""
    saved = folder / "checkpoints" if folder is not None else None
    interrupted = saved / "interrupted.ckpt" if saved is not None else None
    if interrupted is not None and status != "FINISHED" and interrupted.is_file():
        return str(interrupted)
    tagged = tags.get("checkpoint.best")
    if tagged and Path(tagged).is_file():
        return tagged
    for name in ("best.ckpt", "interrupted.ckpt", "last.ckpt"):
        if saved is not None and (saved / name).is_file():
            return str(saved / name)
    return tagged or tags.get("checkpoint_loaded")
