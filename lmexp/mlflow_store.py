"""MLflow stores without Lightning: URI checks, config flattening, applying records to a run,
the loss-curve plot, listing runs, and sending a journal kept while a store was unreachable."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lmexp.errors import ConfigError

JOURNAL_NAME = "tracking-journal.jsonl"
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
    (schema migration, duplicate experiment names); an advisory file lock beside the
    database makes them take turns. Other stores handle concurrency themselves.
    """
    path = sqlite_path(uri)
    if path is None:
        yield
        return
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _quiet_mlflow() -> None:
    """MLflow announces database creation and migrations at INFO: noise in a training log."""
    for name in ("mlflow.store.db.utils", "alembic", "alembic.runtime.migration", "mlflow.tracking.fluent"):
        logging.getLogger(name).setLevel(logging.WARNING)


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
        if http_store(self.tracking_uri):
            # MLflow retries a failed request for minutes by default; here a failure only means
            # "keep the records and try again later", so fail fast.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
            # One warning of ours says the store is unreachable, not one of urllib3's per retry.
            logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
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
    try:
        import requests

        if isinstance(err, requests.exceptions.RequestException):
            return True
    except ImportError:
        pass
    text = str(err)
    return any(words in text for words in ("Max retries exceeded", "timed out", "database is locked"))


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
    """A journal's header (the run it belongs to) and its records, in order."""
    try:
        lines = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except json.JSONDecodeError as err:
        raise ConfigError(f"journal {str(path)!r} is not a tracking journal ({err})") from None
    if not lines or lines[0].get("kind") != "run":
        raise ConfigError(f"journal {str(path)!r} is not a tracking journal: its first line names no run")
    return lines[0], lines[1:]


def write_journal(path: Path, header: dict[str, Any], records: list[dict[str, Any]]) -> None:
    """Replace a journal atomically: a process killed while writing leaves the old one whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    temporary.write_text("".join(json.dumps(record) + "\n" for record in [header, *records]), encoding="utf-8")
    os.replace(temporary, path)


def append_journal(path: Path, records: list[dict[str, Any]]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.writelines(json.dumps(record) + "\n" for record in records)


def sync_journal(path: str | Path) -> str:
    """Send a journal left by a run whose tracking store was unreachable; returns the run id.

    The run it names is continued when the store has it, else created (once: the journal then
    names it). Records the store refuses are skipped with a warning. If the store fails part of
    the way, the journal keeps exactly what is still unsent, so running sync again neither loses
    nor repeats a record. The journal is removed once every record is sent.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"journal {str(path)!r} does not exist: pass the file named in the run's warning")
    header, records = read_journal(path)
    store = TrackingStore(header["tracking_uri"], header["experiment"], header["run_name"], header["run_id"],
                          header.get("tags"), header.get("start_time"))
    try:
        store.connect()
    except Exception as err:
        raise ConfigError(f"tracking store {store.tracking_uri} still unreachable ({_first_line(err)}): "
                          f"nothing sent; try again later") from None
    header = {**header, "run_id": store.run_id}
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
    """The newest runs of a store, newest first: name, status, times, key metrics, checkpoint."""
    import datetime

    uri = check_tracking_uri(tracking_uri or default_tracking_uri())
    path = sqlite_path(uri)
    if path is not None and not path.is_file():
        raise ConfigError(f"no tracking store at {str(path)!r} yet: train a run first (lmexp fit --config CONFIG), "
                          "or pass --tracking_uri / set MLFLOW_TRACKING_URI")
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
        rows.append({
            "run": info.run_name, "run_id": info.run_id, "experiment": names.get(info.experiment_id),
            "status": info.status,
            "started": datetime.datetime.fromtimestamp(info.start_time / 1000).strftime("%Y-%m-%d %H:%M"),
            "minutes": round((ended - info.start_time) / 60000, 1) if ended else None,
            "steps": data.tags.get("global_step"),
            **{key: data.metrics.get(key) for key in ("train/loss", "val/loss", "test/loss")},
            "checkpoint": data.tags.get("checkpoint.best") or data.tags.get("checkpoint_loaded"),
        })
    return rows
