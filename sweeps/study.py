"""Optuna studies over lmexp fit configs: storage, sampler, pruner, search-space checks.

Storage follows Optuna's own advice: a SQLite file by default (one worker, or a few on one
host), a journal file (``journal:PATH``) for many workers on one host, and a database server
(``postgresql://...``, any SQLAlchemy URL) for workers on several machines. Every running trial
has a heartbeat and names its worker, so a trial whose worker died (or was stopped) is resumed
from its own last checkpoint by the next worker, under its own number.
"""

from __future__ import annotations

import os
import re
import socket
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from lmexp.atomic import process_alive
from lmexp.errors import ConfigError
from lmexp.runs import check
# GridSampler, exhausted, make_sampler and param_name stay importable from here (sweeps.samplers, sweeps.spec).
from sweeps.samplers import GridSampler, construct, exhausted, make_sampler  # noqa: F401
from sweeps.spec import SweepSpec, param_name

SPEC_ATTR = "sweep.spec"
SIGNATURE_ATTR = "sweep.signature"
PARENT_RUN_ATTR = "mlflow.parent_run_id"
ROOT_ATTR = "sweep.root"  # the folder of the trials' run folders, logs and report
FAIL_REASON_ATTR = "fail_reason"
INTERRUPTED = "interrupted"  # a trial stopped by Ctrl-C or SIGTERM: run again, not counted
HEARTBEAT_SECONDS = 30
HEARTBEAT_ATTR = "heartbeat"  # when the trial's worker last showed life (Unix time)
RETRY_OF_ATTR = "retry_of"  # studies of the earlier kind: the dead trial a queued trial ran again
INTERRUPTED_ATTR = "interrupted"  # stopped by Ctrl-C or SIGTERM with a checkpoint: resumed by the next worker
CLAIM_ATTR = "sweep.claim"  # the worker that last claimed an orphaned trial
RESUMES_ATTR = "resumes"  # how many times a trial was resumed after its worker died or was stopped
RESTARTED_ATTR = "restarted"  # why a resumed trial had to train again from its first step
RUN_NAME_ATTR = "run_name"  # the trial's run folder under the study's root
BEST_CHECKPOINT_ATTR = "best_checkpoint"  # a complete trial's best checkpoint
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
    infeasible: str = ""  # why a complete trial breaks a constraint


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


# ------------------------------------------------------------------------------------ pruners
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
    return construct("pruner", name, pruners[name], options)


# ------------------------------------------------------------------------------- the search space
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
        if not spec.sampler_named:  # the default sampler has changed across versions: the study keeps its own
            spec.sampler = stored_spec(study).sampler
            study.sampler = make_sampler(spec, worker_index)
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
    """Note that a trial's worker is alive, as a user attribute of the trial (the same for every
    storage; Optuna keeps heartbeats for database storages only, and fails a stale trial where
    a sweep resumes it)."""
    storage.set_trial_user_attr(trial_id, HEARTBEAT_ATTR, time.time())


@dataclass
class Owner:
    """The worker running a trial, and the process it runs it in, as the trial's attributes say."""

    host: str
    worker_pid: int
    trial_pid: int | None = None

    ATTR = "sweep.owner"

    @classmethod
    def of(cls, trial: FrozenTrial) -> Owner | None:
        data = trial.user_attrs.get(cls.ATTR)
        return cls(data["host"], int(data["worker_pid"]), data.get("trial_pid")) if isinstance(data, dict) else None

    def to_attr(self) -> dict[str, Any]:
        return {"host": self.host, "worker_pid": self.worker_pid, "trial_pid": self.trial_pid}

    def gone(self) -> bool:
        """True when this host ran the trial and neither its worker nor its trial process is alive."""
        if self.host != socket.gethostname():
            return False
        return not any(process_alive(pid) for pid in (self.worker_pid, self.trial_pid) if pid)

    def here(self) -> bool:
        return self.host == socket.gethostname()


def orphaned_trials(study: optuna.Study, heartbeat_seconds: int | None) -> list[tuple[FrozenTrial, str]]:
    """Running trials that nobody runs any more, each with why: interrupted by Ctrl-C or SIGTERM
    (its worker marked it so), its worker and trial process gone from this host, or its heartbeat
    older than ``STALE_AFTER_BEATS`` beats. A worker resumes them (``claim_trial``).

    Trials of the earlier kind of study (no heartbeat attribute in a database storage) are left to
    ``fail_legacy_stale_trials``.
    """
    now = time.time()
    found = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        beat = trial.user_attrs.get(HEARTBEAT_ATTR)
        owner = Owner.of(trial)
        here = owner is not None and owner.here()
        if trial.user_attrs.get(INTERRUPTED_ATTR):  # its worker marked it once its process had ended
            if not (here and owner.trial_pid and process_alive(owner.trial_pid)):
                found.append((trial, "it was interrupted"))
        elif here:  # this host sees its processes: never taken from a live one, whatever its beats say
            if owner.gone():
                found.append((trial, f"its worker (pid {owner.worker_pid}) is gone"))
        elif beat is not None and heartbeat_seconds and now - beat >= STALE_AFTER_BEATS * heartbeat_seconds:
            found.append((trial, f"its worker stopped beating {now - beat:.0f} s ago"))
    return found


def claim_trial(study: optuna.Study, storage: optuna.storages.BaseStorage, trial: FrozenTrial, owner: Owner,
                settle_seconds: float = 0.5) -> bool:
    """Take over an orphaned trial for this worker; False when another worker took it first.

    Workers of one host claim under their shared lock; across hosts each writes its claim, waits
    ``settle_seconds`` and keeps the trial only if its claim is the one stored and nobody has
    taken the trial over meanwhile (the owner is still the one found gone).
    """
    study_id = storage.get_study_id_from_name(study.study_name)
    trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
    claim = f"{owner.host}:{owner.worker_pid}:{time.time_ns()}"
    try:
        storage.set_trial_user_attr(trial_id, CLAIM_ATTR, claim)
        time.sleep(settle_seconds)
        current = storage.get_trial(trial_id)
        if (current.state != TrialState.RUNNING or current.user_attrs.get(CLAIM_ATTR) != claim
                or current.user_attrs.get(Owner.ATTR) != trial.user_attrs.get(Owner.ATTR)):
            return False
        storage.set_trial_user_attr(trial_id, HEARTBEAT_ATTR, time.time())
        storage.set_trial_user_attr(trial_id, Owner.ATTR, owner.to_attr())
        storage.set_trial_user_attr(trial_id, INTERRUPTED_ATTR, False)
        storage.set_trial_user_attr(trial_id, RESUMES_ATTR, int(current.user_attrs.get(RESUMES_ATTR, 0)) + 1)
    except (optuna.exceptions.UpdateFinishedTrialError, RuntimeError):
        return False  # finished meanwhile
    return True


def fail_legacy_stale_trials(study: optuna.Study, storage: optuna.storages.BaseStorage) -> list[int]:
    """Fail the stale trials of workers of the earlier kind (Optuna's heartbeat in a database storage,
    no heartbeat attribute), each queued again with its parameters; return their numbers."""
    if not isinstance(storage, RDBStorage) or storage.get_heartbeat_interval() is None:
        return []
    running = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
               if HEARTBEAT_ATTR not in t.user_attrs}
    if not running:
        return []
    optuna.storages.fail_stale_trials(study)
    return [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)) if t.number in running]


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
