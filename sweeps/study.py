"""Optuna studies over lmexp fit configs: storage, sampler, pruner, search-space checks.

Storage follows Optuna's own advice: a SQLite file by default (one worker, or a few on one
host), a journal file (``journal:PATH``) for many workers on one host, and a database server
(``postgresql://...``, any SQLAlchemy URL) for workers on several machines. Database storages
keep a heartbeat per running trial, so a dead worker's trial is failed and run again.
"""

from __future__ import annotations

import os
import re
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from lmexp.errors import ConfigError
from lmexp.runs import check
from sweeps.spec import SweepSpec

SPEC_ATTR = "sweep.spec"
SIGNATURE_ATTR = "sweep.signature"
PARENT_RUN_ATTR = "mlflow.parent_run_id"
ROOT_ATTR = "sweep.root"  # the folder of the trials' run folders, logs and report
FAIL_REASON_ATTR = "fail_reason"
INTERRUPTED = "interrupted"  # a trial stopped by Ctrl-C or SIGTERM: run again, not counted
HEARTBEAT_SECONDS = 30
HEARTBEAT_ATTR = "heartbeat"  # journal storages: when the trial's worker last showed life (Unix time)
RETRY_OF_ATTR = "retry_of"  # journal storages: the dead trial a queued trial runs again
STALE_AFTER_BEATS = 4

warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
# A worker records its trials' heartbeats itself (sweeps.worker), outside Study.optimize.
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")


@dataclass
class TrialOutcome:
    """How one trial ended, as a worker saw it: what it reports and what the study's run records."""

    number: int
    state: TrialState
    values: list[float] | None
    reason: str
    seconds: float
    result: dict[str, Any]
    end_status: str = "FAILED"  # how a failed trial's MLflow run ends: FAILED, or KILLED by a signal or Ctrl-C


def default_storage() -> str:
    """``sqlite:///<cwd>/optuna.db``: one file beside ``mlflow.db`` for every study started here."""
    return f"sqlite:///{Path.cwd() / 'optuna.db'}"


def shown_url(url: str) -> str:
    """A storage URL without its password, for messages and tags."""
    return re.sub(r"(//[^:/@]+:)[^@]+@", r"\1***@", url)


def open_storage(url: str | None = None, heartbeat_seconds: int | None = HEARTBEAT_SECONDS) -> optuna.storages.BaseStorage:
    """The storage a URL names: ``sqlite:///file``, ``postgresql://...``, or ``journal:PATH``.

    Raises:
        ConfigError: the URL cannot be parsed or its server cannot be reached.
    """
    url = url or default_storage()
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

        path = Path(os.path.expanduser(url[len("journal:"):]))
        if not path.parent.is_dir():
            raise ConfigError(f"journal storage {url!r}: folder {str(path.parent)!r} does not exist")
        # The open-lock works on any file system; the default symlink lock fails on some (NFS, Windows shares).
        return optuna.storages.JournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path))))
    if url.startswith(("postgresql://", "postgres://")):
        url = "postgresql+psycopg://" + url.split("://", 1)[1]  # psycopg 3, a dependency (SQLAlchemy's default is psycopg2)
    if "://" not in url:
        raise ConfigError(f"storage {url!r} is not a URL: use sqlite:///optuna.db, journal:sweep.log or "
                          "postgresql://user:password@host/db")
    heartbeat = {} if not heartbeat_seconds else {
        "heartbeat_interval": heartbeat_seconds, "grace_period": STALE_AFTER_BEATS * heartbeat_seconds,
        "heartbeat_stale_trial_callback": RetryHeartbeatStaleTrialCallback(max_retry=2),
    }
    engine = {"pool_pre_ping": True}
    if url.startswith("postgresql"):
        engine["connect_args"] = {"connect_timeout": 10}
    try:
        return RDBStorage(url, engine_kwargs=engine, **heartbeat)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"storage {shown_url(url)} cannot be reached: {first}") from None


# ---------------------------------------------------------------------------- samplers and pruners
def make_sampler(spec: SweepSpec, worker_index: int = 0) -> optuna.samplers.BaseSampler:
    """The spec's sampler. Each worker gets its own seed (seed + worker index), so workers that
    start together do not propose the same trials."""
    options = dict(spec.sampler)
    name = options.pop("name")
    seed = options.pop("seed", None)
    if seed is not None:
        seed = int(seed) + worker_index
    samplers = {
        "tpe": optuna.samplers.TPESampler,
        "random": optuna.samplers.RandomSampler,
        "gp": optuna.samplers.GPSampler,
        "cmaes": optuna.samplers.CmaEsSampler,
        "nsga2": optuna.samplers.NSGAIISampler,
    }
    if name == "grid":
        grid = {param_name(p.name): p.grid() for p in spec.params}
        grid.update({g.name: list(g.choices) for g in spec.groups})
        return _construct("sampler", name, GridSampler, {"search_space": grid, "seed": seed, **options})
    if name == "cmaes":
        try:
            import cmaes  # noqa: F401
        except ImportError:
            raise ConfigError("sampler cmaes needs the cmaes package: pip install cmaes") from None
    return _construct("sampler", name, samplers[name], {"seed": seed, **options})


class GridSampler(optuna.samplers.GridSampler):
    """Optuna's grid sampler, for workers that ask and tell. After a trial Optuna's only calls
    ``Study.stop`` when the grid is done, which works only inside ``Study.optimize``; a worker
    asks ``exhausted`` before each trial instead."""

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
        pass


def exhausted(study: optuna.Study) -> bool:
    """True when the study's sampler has nothing left to propose (a finished grid)."""
    return isinstance(study.sampler, optuna.samplers.GridSampler) and study.sampler.is_exhausted(study)


def make_pruner(spec: SweepSpec) -> optuna.pruners.BasePruner:
    """The spec's pruner; its steps are training steps (each validation reports one value)."""
    options = dict(spec.pruner)
    name = options.pop("name")
    pruners = {
        "none": optuna.pruners.NopPruner,
        "median": optuna.pruners.MedianPruner,
        "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
        "hyperband": optuna.pruners.HyperbandPruner,
        "threshold": optuna.pruners.ThresholdPruner,  # stop a trial whose metric leaves [lower, upper]
    }
    return _construct("pruner", name, pruners[name], options)


def _construct(kind: str, name: str, factory: Any, options: dict[str, Any]) -> Any:
    try:
        return factory(**options)
    except TypeError as err:
        raise ConfigError(f"{kind} {name}: {err} (the options are those of {factory.__module__}.{factory.__name__})") from None
    except ValueError as err:
        raise ConfigError(f"{kind} {name}: {err}") from None


# ------------------------------------------------------------------------------- the search space
def param_name(key: str) -> str:
    """How Optuna names a fit option: ``model.init_args.network_overrides.n_layer`` -> ``model.n_layer``,
    short enough for a plot's axis, and unique since a class's options have unique names."""
    return key.replace(".init_args.network_overrides.", ".").replace(".init_args.", ".")


def suggest(trial: optuna.Trial, spec: SweepSpec) -> dict[str, Any]:
    """The trial's fit overrides: the spec's fixed ones plus one value of every searched option."""
    overrides = dict(spec.overrides)
    for param in spec.params:
        name = param_name(param.name)
        if param.kind == "categorical":
            labels = [_label(c) for c in param.choices]
            overrides[param.name] = param.choices[labels.index(trial.suggest_categorical(name, labels))]
        elif param.kind == "int":
            overrides[param.name] = trial.suggest_int(name, int(param.low), int(param.high),
                                                      step=int(param.step or 1), log=param.log)
        else:
            overrides[param.name] = trial.suggest_float(name, float(param.low), float(param.high),
                                                        step=param.step, log=param.log)
    for group in spec.groups:
        overrides.update(group.choices[trial.suggest_categorical(group.name, list(group.choices))])
    return overrides


def _label(choice: Any) -> Any:
    """Optuna stores None, bools, numbers and strings; a list or mapping choice is named by its YAML."""
    if choice is None or isinstance(choice, (bool, int, float, str)):
        return choice
    import json

    return json.dumps(choice)


def check_space(spec: SweepSpec) -> dict[str, Any]:
    """Check every searched key and value against the fit config's schema, before any trial runs.

    Each searched option is tried at both ends of its range and at each of its choices, and
    every group at each of its choices (so a model size whose heads do not divide its width is
    caught here, not in trial 7). Returns the resolved fit config of the first probe.
    """
    for path in spec.configs:
        if not Path(path).is_file():
            raise ConfigError(f"sweep {spec.study}: fit config {path!r} does not exist (paths are relative to "
                              f"the folder the sweep is started from, here {os.getcwd()})")
    probes: list[list[Any]] = [p.probe_values() for p in spec.params] + [list(g.choices) for g in spec.groups]
    rounds = max([len(p) for p in probes] + [1])
    resolved: dict[str, Any] | None = None
    for index in range(rounds):
        overrides = dict(spec.overrides)
        described = []
        for param, values in zip(spec.params, probes):
            overrides[param.name] = values[index % len(values)]
            described.append(f"{param.name}={overrides[param.name]!r}")
        for group, labels in zip(spec.groups, probes[len(spec.params):]):
            label = labels[index % len(labels)]
            overrides.update(group.choices[label])
            described.append(f"{group.name}={label}")
        try:
            config = check("fit", spec.configs, overrides)
        except ConfigError as err:
            raise ConfigError(f"sweep {spec.study}: {err} (with {', '.join(described)})") from None
        resolved = resolved or config
    return resolved or {}


# ------------------------------------------------------------------------------ studies
def create_or_resume(spec: SweepSpec, storage: optuna.storages.BaseStorage, storage_url: str, resume: bool,
                     worker_index: int = 0) -> optuna.Study:
    """Create the spec's study, or with ``resume`` reopen it; a name taken by another search space is refused."""
    names = optuna.get_all_study_names(storage)
    signature = spec.space_signature()
    if spec.study in names:
        study = load(spec.study, storage, spec, worker_index)
        if study.user_attrs.get(SIGNATURE_ATTR) != signature:
            raise ConfigError(
                f"study {spec.study!r} exists in {shown_url(storage_url)} with another search space: resume it with "
                "the sweep file it was made from (--resume), or give this one another name (--study NAME)")
        if not resume:
            raise ConfigError(
                f"study {spec.study!r} exists in {shown_url(storage_url)} with {len(study.trials)} trials: "
                "continue it with --resume, or start a new one with --study NAME")
        study.set_user_attr(SPEC_ATTR, spec.to_dict())  # n_trials, timeout or workers may have changed
        return study
    if resume:
        raise ConfigError(f"--resume: there is no study {spec.study!r} in {shown_url(storage_url)}; "
                          "start it without --resume")
    study = optuna.create_study(
        study_name=spec.study, storage=storage, directions=spec.directions,
        sampler=make_sampler(spec, worker_index), pruner=make_pruner(spec), load_if_exists=False,
    )
    study.set_user_attr(SPEC_ATTR, spec.to_dict())
    study.set_user_attr(SIGNATURE_ATTR, signature)
    study.set_metric_names([o.metric for o in spec.objectives])
    return study


def load(name: str, storage: optuna.storages.BaseStorage, spec: SweepSpec | None = None,
         worker_index: int = 0) -> optuna.Study:
    """Open an existing study with its sweep's sampler and pruner (Optuna stores neither)."""
    names = optuna.get_all_study_names(storage)
    if name not in names:
        known = ", ".join(names) or "none"
        raise ConfigError(f"no study {name!r} in this storage (studies: {known}): start it with "
                          "python -m sweeps run --config FILE")
    study = optuna.load_study(study_name=name, storage=storage)
    spec = spec or stored_spec(study)
    study.sampler = make_sampler(spec, worker_index)
    study.pruner = make_pruner(spec)
    return study


def stored_spec(study: optuna.Study) -> SweepSpec:
    data = study.user_attrs.get(SPEC_ATTR)
    if data is None:
        raise ConfigError(f"study {study.study_name!r} was not made by python -m sweeps: it has no sweep settings")
    return SweepSpec.from_dict(data)


def record_heartbeat(storage: optuna.storages.BaseStorage, trial_id: int) -> None:
    """Note that a trial's worker is alive: in the heartbeat table of a database storage, in a
    user attribute elsewhere (Optuna 5's journal storage keeps no heartbeats of its own)."""
    if isinstance(storage, RDBStorage):
        storage.record_heartbeat(trial_id)
    else:
        storage.set_trial_user_attr(trial_id, HEARTBEAT_ATTR, time.time())


def fail_stale_trials(study: optuna.Study, storage: optuna.storages.BaseStorage,
                      heartbeat_seconds: int | None) -> list[int]:
    """Fail the running trials whose worker stopped beating and queue each to run again; return
    the numbers of the trials failed (the caller ends their MLflow runs, which no one else will).

    Database storages do it with Optuna's own heartbeat and ``RetryHeartbeatStaleTrialCallback``;
    for a journal storage a trial is stale when its heartbeat attribute is older than
    ``STALE_AFTER_BEATS`` beats, and its parameters are queued again with ``enqueue_trial``.
    """
    if isinstance(storage, RDBStorage):
        running = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
        if not running:
            return []
        optuna.storages.fail_stale_trials(study)
        return [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)) if t.number in running]
    if not heartbeat_seconds:
        return []
    study_id = storage.get_study_id_from_name(study.study_name)
    now = time.time()
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        beat = trial.user_attrs.get(HEARTBEAT_ATTR)
        if beat is None or now - beat < STALE_AFTER_BEATS * heartbeat_seconds:
            continue
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        try:
            storage.set_trial_user_attr(trial_id, FAIL_REASON_ATTR, f"its worker stopped beating ({now - beat:.0f} s)")
            if not storage.set_trial_state_values(trial_id, TrialState.FAIL):
                continue
        except (optuna.exceptions.UpdateFinishedTrialError, RuntimeError):
            continue  # another worker failed it first
        study.enqueue_trial(trial.params, user_attrs={RETRY_OF_ATTR: trial.number}, skip_if_exists=False)
        failed.append(trial.number)
    return failed


def heartbeat_age(trial: FrozenTrial) -> float | None:
    """Seconds since a journal study's running trial last beat (None where Optuna keeps the beats)."""
    beat = trial.user_attrs.get(HEARTBEAT_ATTR)
    return None if beat is None else max(0.0, time.time() - beat)


def retried_trial_number(trial: FrozenTrial) -> int | None:
    """The dead trial ``trial`` runs again, if it is a retry (of either kind of storage)."""
    number = RetryHeartbeatStaleTrialCallback.retried_trial_number(trial)
    return number if number is not None else trial.user_attrs.get(RETRY_OF_ATTR)


def counted_trials(trials: Sequence[FrozenTrial]) -> int:
    """Trials that count towards ``n_trials``: started ones, less the runs that will be repeated
    (a dead worker's trial, retried by heartbeat; one interrupted by Ctrl-C)."""
    retries = sum(1 for t in trials if retried_trial_number(t) is not None)
    interrupted = sum(1 for t in trials if t.state == TrialState.FAIL and t.user_attrs.get(FAIL_REASON_ATTR) == INTERRUPTED)
    started = sum(1 for t in trials if t.state != TrialState.WAITING)
    return started - retries - interrupted



def finished_trials(trials: Sequence[FrozenTrial]) -> int:
    """Trials that are done for good: complete, pruned, or failed for a reason of their own
    (not interrupted by Ctrl-C, not a dead worker's trial that a retry runs again)."""
    retried = {retried_trial_number(t) for t in trials} - {None}

    def done(trial: FrozenTrial) -> bool:
        if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
            return True
        return (trial.state == TrialState.FAIL and trial.number not in retried
                and trial.user_attrs.get(FAIL_REASON_ATTR) != INTERRUPTED)

    return sum(1 for t in trials if done(t))


def missing_trials(study: optuna.Study, spec: SweepSpec) -> int:
    """How many trials the study still lacks to reach ``n_trials`` (0 once a grid is done)."""
    if spec.n_trials is None or exhausted(study):
        return 0
    return max(0, spec.n_trials - finished_trials(study.get_trials(deepcopy=False)))
