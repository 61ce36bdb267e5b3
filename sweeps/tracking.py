"""The study's MLflow run: every trial's run is nested under it, and it holds the best so far.

It names the objective for the MLflow UI as far as MLflow lets a run do so: the tags
``sweep.objective`` and ``sweep.direction``, and the best value so far as a metric named after the
objective (``val/loss``), logged before any other metric of the run. MLflow 3.17's compare view
opens its parallel-coordinates plot on the first metric the compared runs share, in the order
each was first logged (the store keeps that order); its charts' settings live in the browser, and
no tag or experiment setting chooses them.

Tracking never stops a study: a store that fails is reported once and the trials go on (each
trial's own tracker keeps its records through outages).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmexp.mlflow_store import (
    MODEL_SKIPPED_TAG,
    MODEL_TAG,
    TrackingStore,
    check_tracking_uri,
    default_tracking_uri,
    ensure_store,
    flatten,
)

if TYPE_CHECKING:
    import optuna

    from sweeps.spec import SweepSpec
    from sweeps.study import TrialOutcome

log = logging.getLogger(__name__)


class StudyRun:
    """The parent MLflow run of a study (in the experiment named after the study)."""

    def __init__(self, tracking_uri: str | None, experiment: str, run_id: str | None,
                 objective: str | None = None) -> None:
        self.tracking_uri = tracking_uri
        self.objective = objective  # the metric the best value is logged as (single-objective studies)
        self.experiment = experiment
        self.run_id = run_id
        self._client: Any = None
        self._warned = False

    @classmethod
    def start(cls, spec: SweepSpec, storage_url: str, run_id: str | None = None) -> StudyRun:
        """Create the study's run (or reopen it, when a study is resumed). ``tracking_uri: false`` in
        the sweep file turns tracking off."""
        if spec.tracking_uri is False:
            return cls(None, spec.study, None)
        uri = _uri(spec)
        tags = {"optuna.study": spec.study, "optuna.storage": storage_url, "sweep.kind": "study", **objective_tags(spec)}
        store = TrackingStore(uri, spec.study, f"study {spec.study}", run_id=run_id, tags=tags)
        store.connect()
        if not store.resumed:
            settings = {"sampler": spec.sampler, "pruner": spec.pruner, "n_trials": spec.n_trials,
                        "timeout": spec.timeout, "objectives": [o.metric for o in spec.objectives],
                        "directions": spec.directions, "configs": spec.configs, "overrides": spec.overrides}
            settings.update({f"space.{p.name}": _describe(p) for p in spec.params})
            settings.update({f"space.{g.name}": sorted(g.choices) for g in spec.groups})
            store.apply({"kind": "params", "values": flatten({"sweep": settings})})
            if spec.source and Path(spec.source).is_file():
                store.client.log_artifact(store.run_id, spec.source)
        run = cls(uri, spec.study, store.run_id, spec.objectives[0].metric if not spec.multi_objective else None)
        run._client = store.client
        return run

    @classmethod
    def attach(cls, spec: SweepSpec, run_id: str | None) -> StudyRun:
        """The run a study made, for a worker that joins it (nothing is created)."""
        if spec.tracking_uri is False:
            return cls(None, spec.study, None)
        return cls(_uri(spec), spec.study, run_id, spec.objectives[0].metric if not spec.multi_objective else None)

    @property
    def client(self) -> Any:
        if self._client is None and self.tracking_uri:
            from mlflow import MlflowClient

            try:
                ensure_store(self.tracking_uri)  # a new SQLite store is created whole, never half
            except Exception as err:  # a damaged store: said once; the study goes on untracked
                log.warning(f"MLflow: {str(err).splitlines()[0]}; the study goes on without tracking")
                self.tracking_uri = None
                return None
            self._client = MlflowClient(self.tracking_uri)
        return self._client

    def _safely(self, action: str, *calls: tuple[Any, ...]) -> None:
        if self.client is None:
            return
        try:
            for method, *args in calls:
                method(*args)
        except Exception as err:  # tracking is a record, not a reason to stop the study
            if not self._warned:
                self._warned = True
                log.warning(f"MLflow: could not {action} in {self.tracking_uri}: {str(err).splitlines()[0]}")

    def trial_finished(self, study: optuna.Study, outcome: TrialOutcome) -> None:
        """Tag the trial's run with its state and value (a failed trial's run ends FAILED or KILLED);
        put the study's best so far on the parent."""
        from optuna.trial import TrialState

        if self.client is None:  # tracking off
            return
        if outcome.state == TrialState.FAIL:
            self.end_trial_run(study.study_name, outcome.number, outcome.reason, outcome.end_status,
                               outcome.result.get("run_id"))
        elif outcome.result.get("run_id"):
            run_id = outcome.result["run_id"]
            tags = {"optuna.state": outcome.state.name}
            if outcome.values:
                tags["optuna.values"] = ", ".join(f"{v:.6g}" for v in outcome.values)
            if outcome.infeasible:
                tags["optuna.infeasible"] = outcome.infeasible[:500]
            self._safely("tag the trial's run", *[(self.client.set_tag, run_id, k, v) for k, v in tags.items()])
            if outcome.infeasible:  # kept out of the models to rank, as pruned trials are
                self._safely("drop the infeasible trial's model", (self._drop_model, run_id, outcome.infeasible))
        if self.run_id is None:  # the study's own run was never made
            return
        trials = study.get_trials(deepcopy=False)
        counts = {state: sum(1 for t in trials if t.state == state)
                  for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
        step = sum(counts.values())
        now = int(time.time() * 1000)
        calls: list[tuple[Any, ...]] = []
        if len(study.directions) == 1:
            try:
                best = study.best_trial
            except ValueError:
                best = None
            if best is not None:
                # First: the compare view opens on the first metric a run logged.
                if self.objective:
                    calls.append((self.client.log_metric, self.run_id, self.objective, best.value, now, step))
                calls.append((self.client.log_metric, self.run_id, "best_value", best.value, now, step))
                calls.append((self.client.set_tag, self.run_id, "best_trial", str(best.number)))
                calls += [(self.client.set_tag, self.run_id, f"best.{k}", str(v)) for k, v in best.params.items()]
        else:
            front = ", ".join(str(t.number) for t in study.best_trials)
            calls.append((self.client.set_tag, self.run_id, "pareto_front_trials", front))
        calls += [(self.client.log_metric, self.run_id, f"trials_{state.name.lower()}", count, now, step)
                  for state, count in counts.items()]
        self._safely("update the study's run", *calls)

    def _drop_model(self, run_id: str, reason: str) -> None:
        model_id = self.client.get_run(run_id).data.tags.get(MODEL_TAG)
        if model_id:
            self.client.delete_logged_model(model_id)
            self.client.set_tag(run_id, MODEL_SKIPPED_TAG, f"infeasible: {reason}"[:500])

    def end_trial_run(self, study_name: str, number: int, reason: str, status: str = "FAILED",
                      run_id: str | None = None) -> None:
        """Mark a failed trial's run FAILED or KILLED. A trial process killed by a signal, or a dead
        worker's trial, cannot end its own run, which would otherwise stay RUNNING forever. Without
        the ``run_id`` the trial reported, its run is found by its ``optuna.*`` tags."""
        if self.client is None:  # tracking off
            return

        def end() -> None:
            runs = [self.client.get_run(run_id)] if run_id else self._trial_runs(study_name, number)
            for run in runs:
                self.client.set_tag(run.info.run_id, "optuna.state", "FAIL")
                if reason:
                    self.client.set_tag(run.info.run_id, "optuna.reason", reason[:500])
                if run.info.status not in ("FAILED", "KILLED"):  # a finished run whose metric is missing too
                    self.client.set_terminated(run.info.run_id, status)

        self._safely("end the failed trial's run", (end,))

    def _trial_runs(self, study_name: str, number: int) -> list[Any]:
        experiment = self.client.get_experiment_by_name(study_name)
        if experiment is None:
            return []
        # Whatever its status: an orphaned trial may have finished its run after its worker died,
        # but a trial the study failed did not count, and its run must say so.
        found = [f"tags.`optuna.trial` = '{number}'", f"tags.`optuna.study` = '{study_name}'"]
        if self.run_id:  # only this study's runs, should an older study of the same name have tracked here
            found.append(f"tags.`mlflow.parentRunId` = '{self.run_id}'")
        return self.client.search_runs([experiment.experiment_id], filter_string=" and ".join(found))

    def log_artifacts(self, folder: Path, artifact_path: str = "report") -> None:
        """Upload the report's images, tables and text. Its HTML plots stay on disk: they load plotly's
        script from beside the study folders, which an artifact store does not have."""
        if self.client is not None and self.run_id:
            files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in (".png", ".csv", ".txt"))
            self._safely("upload the report", *[(self.client.log_artifact, self.run_id, str(p), artifact_path)
                                                for p in files])

    def end(self, status: str = "FINISHED") -> None:
        if self.client is not None and self.run_id:
            self._safely("end the study's run", (self.client.set_terminated, self.run_id, status))


def objective_tags(spec: SweepSpec) -> dict[str, str]:
    """``sweep.objective`` (the metric, or metrics in order) and ``sweep.direction``: what the study
    optimizes, for the UI's filters and for a trial's run (``tags.`sweep.objective` = 'val/loss'``)."""
    return {"sweep.objective": ", ".join(o.metric for o in spec.objectives),
            "sweep.direction": ", ".join(o.direction for o in spec.objectives)}


def _uri(spec: SweepSpec) -> str:
    return check_tracking_uri(spec.tracking_uri or default_tracking_uri())


def _describe(param: Any) -> str:
    if param.kind == "categorical":
        return str(list(param.choices))
    scale = ", log" if param.log else (f", step {param.step}" if param.step else "")
    return f"{param.kind} [{param.low}, {param.high}{scale}]"
