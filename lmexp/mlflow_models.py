"""A run's best checkpoint as an MLflow 3 model: logged, registered, and loaded back by URI.

At the end of a fit the tracker logs the best checkpoint's safetensors export (``checkpoints/best/``:
weights, config, tokenizer; never the ``.ckpt`` with its optimizer state) as a ``LoggedModel`` of
the run, with the validation metrics of that checkpoint linked to it, so that
``mlflow.search_logged_models(order_by=[{"field_name": "metrics.val/loss", "ascending": True}])``
ranks runs by their best models. ``lmexp runs register RUN NAME`` puts one in the model registry,
and ``models:/NAME/VERSION``, ``models:/NAME@ALIAS`` and ``models:/m-<id>`` load wherever a
checkpoint is taken (``lmexp.checkpoints.load_checkpoint``), downloaded once into a cache folder.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any

from lmexp.errors import CheckpointError, ConfigError
from lmexp.mlflow_store import EXPORT_DIR_TAG, MODEL_SKIPPED_TAG, MODEL_TAG, log_best_model

__all__ = [
    "MODEL_SKIPPED_TAG",
    "MODEL_TAG",
    "MODEL_URI_PREFIX",
    "find_run",
    "is_model_uri",
    "log_best_model",
    "model_cache_root",
    "register_run",
    "resolve_model_uri",
]

MODEL_URI_PREFIX = "models:/"

log = logging.getLogger(__name__)


def is_model_uri(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(MODEL_URI_PREFIX)


# ------------------------------------------------------------------------------ runs and registry
def _client(tracking_uri: str | None) -> tuple[Any, str]:
    from lmexp.mlflow_store import _quiet_mlflow, check_tracking_uri, default_tracking_uri, ensure_store, sqlite_path

    uri = check_tracking_uri(tracking_uri or default_tracking_uri())
    path = sqlite_path(uri)
    if path is not None and not path.is_file():
        raise ConfigError(f"no tracking store at {str(path)!r}: train a tracked run first, or pass --tracking_uri "
                          "/ set MLFLOW_TRACKING_URI (a run trained with --trainer.logger false has no model to register)")
    ensure_store(uri)
    _quiet_mlflow()
    from mlflow import MlflowClient

    return MlflowClient(uri, registry_uri=uri), uri


def find_run(client: Any, run: str) -> Any:
    """The MLflow run ``run`` names: a run folder, a run id, or a run name as ``lmexp runs`` shows it."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    folder = Path(run).expanduser()
    if folder.is_dir():
        found = client.search_runs(experiments, f"tags.run_dir = '{folder.resolve()}'", max_results=10,
                                   order_by=["attributes.start_time DESC"]) if experiments else []
        fits = [r for r in found if r.data.tags.get("verb", "fit") == "fit"]
        if fits:
            return fits[0]
        raise ConfigError(f"run folder {run!r} has no tracked run in {client.tracking_uri}: was it trained with "
                          "--trainer.logger false, or tracked in another store (--tracking_uri)?")
    if re.fullmatch(r"[0-9a-f]{32}", run):
        with contextlib.suppress(Exception):
            return client.get_run(run)
    name = Path(run).name  # runs/<experiment>/<run> as lmexp runs shows a run whose folder is gone
    found = client.search_runs(experiments, f"attributes.run_name = '{name}'", max_results=10,
                               order_by=["attributes.start_time DESC"]) if experiments else []
    if not found:
        raise ConfigError(f"no run {run!r} in {client.tracking_uri}: pass a run folder, a run id or a run name "
                          "as lmexp runs lists them")
    return found[0]


def _best_export(run: Any) -> tuple[Path | None, str | None, int | None]:
    """A run's best checkpoint, its export folder and its step, from its tags or its folder."""
    from lmexp.formats.native import exported_step

    tags = run.data.tags
    candidates = [tags.get("checkpoint.best")]
    if tags.get("run_dir"):
        candidates.append(str(Path(tags["run_dir"]) / "checkpoints" / "best.ckpt"))
    for checkpoint in filter(None, candidates):
        folder = Path(checkpoint).with_suffix("")
        if folder.is_dir():
            return folder, checkpoint, exported_step(folder)
    return None, None, None


def register_run(run: str, name: str, tracking_uri: str | None = None) -> str:
    """Register ``run``'s best model as a new version of ``name``; returns ``models:/NAME/VERSION``.

    A run that logged no model (trained before models were logged, or its upload failed) gets one
    first, from its best checkpoint's export.
    """
    if not name or not name.strip() or "/" in name or "@" in name:
        raise ConfigError(f"model name {name!r} is not usable: use letters, digits, '-', '_' or '.', e.g. quickstart-gpt")
    client, uri = _client(tracking_uri)
    from lmexp.mlflow_store import _one_line_errors

    with _one_line_errors(uri):
        return _register(client, run, name)


def _register(client: Any, run: str, name: str) -> str:
    from mlflow.exceptions import MlflowException

    found = find_run(client, run)
    run_id = found.info.run_id
    model_id = found.data.tags.get(MODEL_TAG)
    if model_id:
        try:
            ready = "READY" in str(client.get_logged_model(model_id).status)
        except MlflowException:
            ready = False
        model_id = model_id if ready else None
    if not model_id:
        folder, checkpoint, step = _best_export(found)
        if folder is None:
            raise ConfigError(f"run {found.info.run_name!r} has no best checkpoint export (checkpoints/best/) on this "
                              "machine: register a run that finished a validation, or export it again")
        model_id = log_best_model(client, run_id, folder, step, checkpoint=checkpoint, max_mb=math.inf)
    try:
        client.create_registered_model(name)
    except MlflowException as err:
        if getattr(err, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
            raise ConfigError(f"model name {name!r} refused by the registry: {str(err).splitlines()[0]}") from None
    import mlflow

    # The SQL registry looks the logged model up in the global tracking store: point it at this one.
    previous = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(client.tracking_uri)
    try:
        version = client.create_model_version(name, source=f"models:/{model_id}", run_id=run_id, model_id=model_id,
                                              tags={MODEL_TAG: model_id})
    finally:
        mlflow.set_tracking_uri(previous)
    return f"models:/{name}/{version.version}"


def model_cache_root() -> Path:
    """Where registered models are downloaded: ``$LMEXP_CACHE_DIR/models`` or ``~/.cache/lmexp/models``."""
    return Path(os.environ.get("LMEXP_CACHE_DIR") or Path.home() / ".cache" / "lmexp") / "models"


def _model_id_of(client: Any, uri: str) -> str:
    """The LoggedModel a ``models:/`` URI names (a registered version, an alias, ``latest``, or an id)."""
    from mlflow.exceptions import MlflowException

    rest = uri[len(MODEL_URI_PREFIX):].strip("/")
    example = "models:/NAME/VERSION, models:/NAME@ALIAS or models:/m-<id>"
    try:
        if rest.startswith("m-") and "/" not in rest:
            return client.get_logged_model(rest).model_id
        if "@" in rest:
            name, alias = rest.split("@", 1)
            version = client.get_model_version_by_alias(name, alias)
        elif rest.count("/") == 1:
            name, number = rest.split("/")
            if number == "latest":
                versions = client.search_model_versions(f"name = '{name}'")
                if not versions:
                    raise ConfigError(f"{uri!r}: the registry has no version of {name!r}")
                version = max(versions, key=lambda v: int(v.version))
            else:
                version = client.get_model_version(name, number)
        else:
            raise ConfigError(f"{uri!r} is not a model URI lmexp reads: use {example}")
    except MlflowException as err:
        raise CheckpointError(f"{uri!r} is not in the registry of {client.tracking_uri} "
                              f"({str(err).splitlines()[0]}): list versions in the MLflow UI, or register one "
                              "with lmexp runs register RUN NAME") from None
    source = version.source or ""
    model_id = version.model_id or version.tags.get(MODEL_TAG) or (
        source[len(MODEL_URI_PREFIX):] if source.startswith(MODEL_URI_PREFIX + "m-") else None)
    if not model_id:
        raise CheckpointError(f"{uri!r} was not registered by lmexp (it names no logged model): register a run "
                              "with lmexp runs register RUN NAME")
    return model_id


def resolve_model_uri(uri: str, tracking_uri: str | None = None) -> Path:
    """The local export folder of a registered or logged model, downloaded once into the cache
    (``model_cache_root()/<model id>``, written whole or not at all)."""
    client, store = _client(tracking_uri)
    model_id = _model_id_of(client, uri)
    target = model_cache_root() / model_id
    if (target / "config.json").is_file():
        return target
    try:
        model = client.get_logged_model(model_id)
    except Exception as err:  # noqa: BLE001  (a deleted model: one line, with the fix)
        raise CheckpointError(f"{uri!r}: model {model_id} cannot be read from the store "
                              f"({str(err).splitlines()[0] if str(err) else type(err).__name__}): "
                              "register the run again with lmexp runs register RUN NAME") from None
    import mlflow.artifacts

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{model_id}-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    # MLflow's progress bar would draw carriage returns into log files and pipes.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        downloaded = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{model_id}",
                                                              dst_path=str(staging), tracking_uri=store))
    except Exception as err:  # noqa: BLE001  (said below in one line, with the fix)
        shutil.rmtree(staging, ignore_errors=True)
        downloaded = None
        failure = str(err).splitlines()[0] if str(err) else type(err).__name__
    if downloaded is None or not (downloaded / "config.json").is_file():
        shutil.rmtree(staging, ignore_errors=True)
        local = Path(model.tags.get(EXPORT_DIR_TAG, ""))
        if model.tags.get(EXPORT_DIR_TAG) and (local / "config.json").is_file():
            return local  # kept on this machine only (larger than the tracker's export_max_mb)
        why = failure if downloaded is None else "its artifacts hold no export"
        raise CheckpointError(f"{uri!r} (model {model_id}) cannot be loaded ({why}): register a run whose "
                              "export was uploaded, or load its checkpoints/best folder directly")
    try:
        os.replace(downloaded, target)
    except OSError:  # another process put the same model there first
        if not (target / "config.json").is_file():
            raise
    shutil.rmtree(staging, ignore_errors=True)
    return target



def model_checkpoint(uri: str, tracking_uri: str | None = None) -> Path | None:
    """The best checkpoint of the run a model came from, when that run's folder is on this machine
    (its ``config.yaml`` gives an evaluation the data it was trained with); None otherwise."""
    try:
        client, _ = _client(tracking_uri)
        model = client.get_logged_model(_model_id_of(client, uri))
    except Exception:  # noqa: BLE001  (the one-line error comes where the model is loaded)
        return None
    run_dir = model.tags.get("lmexp.run_dir")
    return Path(run_dir) / "checkpoints" / "best.ckpt" if run_dir and Path(run_dir).is_dir() else None
