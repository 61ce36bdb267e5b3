"""Best checkpoints as MLflow models: logged at the end of a fit with their metrics, ranked by
``mlflow.search_logged_models``, skipped on request, registered by ``lmexp runs register`` and
loaded back by ``models:/`` URIs wherever a checkpoint is taken."""

from __future__ import annotations

import os
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lmexp.checkpoints import load_checkpoint
from lmexp.cli import main
from lmexp.mlflow_models import MODEL_SKIPPED_TAG, MODEL_TAG
from lmexp.runs import build
from lmexp.tracking import tracker_of
from tests.helpers import one_line_error
from tests.test_cli import ROOT, quickstart_args

QUICKSTART = ROOT / "configs" / "quickstart.yaml"


@pytest.fixture(autouse=True)
def tracker_thread_at_normal_priority(monkeypatch):
    """The tracker's threads keep their priority here (behind busy processes the lowest one can
    wait minutes for a core)."""
    monkeypatch.setattr(os, "setpriority", lambda *args: None)


def client():
    from mlflow import MlflowClient

    return MlflowClient(os.environ["MLFLOW_TRACKING_URI"])


def fit(root: Path, *extra: str, steps: int = 10) -> Path:
    """A tracked quickstart fit of ``steps`` steps (one validation); returns its run folder."""
    main([*quickstart_args(root, steps), "--trainer.enable_progress_bar=false", "--trainer.limit_val_batches=1",
          "--trainer.logger=lmexp.MLflowTracker", *extra])
    return (root / "latest").resolve()


def tracked_run(folder: Path):
    mlflow = client()
    ids = [e.experiment_id for e in mlflow.search_experiments()]
    (run,) = mlflow.search_runs(ids, f"tags.run_dir = '{folder}'")
    return run


def test_a_fit_logs_its_best_model_which_registers_and_loads_by_uri(tmp_path: Path, capsys):
    folder = fit(tmp_path / "a", "--trainer.logger.system_metrics_interval=0.2")
    run = tracked_run(folder)
    model = client().get_logged_model(run.data.tags[MODEL_TAG])
    assert str(model.status).endswith("READY") and model.source_run_id == run.info.run_id
    # The best checkpoint's validation metrics, linked as the run logged them (no extra history point).
    assert {m.key for m in model.metrics} >= {"val/loss", "val/ppl"}
    assert [m.value for m in model.metrics if m.key == "val/loss"] == [run.data.metrics["val/loss"]]
    assert len(client().get_metric_history(run.info.run_id, "val/loss")) == 1
    assert model.params["network.n_layer"] == "4" and "export" not in {a.path for a in client().list_artifacts(run.info.run_id)}
    # System metrics, under MLflow's names (the UI's System metrics tab).
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes",
            "system/disk_usage_percentage"} <= set(run.data.metrics)

    capsys.readouterr()
    main(["runs", "register", str(folder), "tiny-gpt"])
    assert capsys.readouterr().out.strip().endswith("models:/tiny-gpt/1")
    loaded, local = load_checkpoint("models:/tiny-gpt/1"), load_checkpoint(folder / "checkpoints" / "best")
    for (name, a), (_, b) in zip(loaded.model.state_dict().items(), local.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert load_checkpoint(f"models:/{model.model_id}").config == local.config
    # An evaluation takes the registered model, with the data of the run it came from.
    main(["validate", "--ckpt_path", "models:/tiny-gpt/1", "--trainer.limit_val_batches=1",
          "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path / 'eval'}"])
    (evaluation,) = [r for r in client().search_runs([run.info.experiment_id]) if r.data.tags.get("verb") == "validate"
                     and r.data.tags.get("run_dir", "").startswith(str(tmp_path / "eval"))]  # the store is the session's
    assert evaluation.data.metrics["val/loss"] == pytest.approx(run.data.metrics["val/loss"], rel=1e-5)


def test_search_logged_models_ranks_two_runs_by_their_best_metric(tmp_path: Path):
    import mlflow

    good = fit(tmp_path, "--experiment=ranked", "--run_name=good", "--trainer.logger.system_metrics=false")
    bad = fit(tmp_path, "--experiment=ranked", "--run_name=bad", "--model.lr=1e-6", "--trainer.logger.system_metrics=false")
    losses = {name: tracked_run(folder).data.metrics["val/loss"] for name, folder in (("good", good), ("bad", bad))}
    assert not any(k.startswith("system/") for k in tracked_run(good).data.metrics)  # the flag turned them off
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    experiment = client().get_experiment_by_name("ranked").experiment_id
    models = mlflow.search_logged_models(experiment_ids=[experiment], output_format="list",
                                         order_by=[{"field_name": "metrics.val/loss", "ascending": True}])
    assert [m.name for m in models] == sorted(losses, key=losses.get)


class SkipModel(pl.Callback):
    """What a sweep trial does with a pruned run."""

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            tracker_of(trainer).skip_model(f"pruned at step {trainer.global_step}")


def test_a_run_told_to_skip_its_model_logs_none(tmp_path: Path):
    run = build("fit", [QUICKSTART], args=[*quickstart_args(tmp_path, 10)[3:], "--trainer.enable_progress_bar=false",
                                            "--trainer.limit_val_batches=1"], callbacks=[SkipModel()])
    run.execute()
    tracked = tracked_run(run.run_dir.resolve())
    assert MODEL_TAG not in tracked.data.tags and tracked.data.tags[MODEL_SKIPPED_TAG] == "pruned at step 10"
    assert not client().search_logged_models([tracked.info.experiment_id],
                                             filter_string=f"source_run_id = '{tracked.info.run_id}'")


def test_bad_registry_input_is_one_line(tmp_path: Path, capsys, monkeypatch):
    from lmexp.mlflow_store import ensure_store

    ensure_store(os.environ["MLFLOW_TRACKING_URI"])
    assert "no run 'nope'" in one_line_error(capsys, ["runs", "register", "nope", "m"])
    assert "is not usable" in one_line_error(capsys, ["runs", "register", "nope", "a/b"])
    assert "not in the registry" in one_line_error(capsys, ["generate", "--ckpt", "models:/missing/1", "--prompt", "a"])
    assert "cannot resume" in one_line_error(capsys, ["fit", "--config", str(QUICKSTART), "--ckpt_path", "models:/x/1",
                                                      f"--trainer.default_root_dir={tmp_path}"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'none.db'}")
    assert "no tracking store" in one_line_error(capsys, ["runs", "register", "nope", "m"])


def test_a_sweeps_parent_run_names_its_objective_and_logs_it_first(tmp_path: Path):
    import optuna

    from sweeps.spec import parse_spec
    from sweeps.study import TrialOutcome
    from sweeps.tracking import StudyRun

    spec = parse_spec({"study": "objective-first", "fit": {"config": [str(QUICKSTART)]},
                       "space": {"model.lr": {"low": 1e-4, "high": 1e-2, "log": True}}, "n_trials": 1,
                       "tracking_uri": os.environ["MLFLOW_TRACKING_URI"]}, default_study="objective-first")
    parent = StudyRun.start(spec, "sqlite:///:memory:")
    study = optuna.create_study()
    study.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=1.5))
    parent.trial_finished(study, TrialOutcome(0, optuna.trial.TrialState.COMPLETE, [1.5], "", 1.0, {}))
    run = client().get_run(parent.run_id)
    assert (run.data.tags["sweep.objective"], run.data.tags["sweep.direction"]) == ("val/loss", "minimize")
    # The compare view opens on the first metric the runs logged: the objective's.
    assert next(iter(run.data.metrics)) == "val/loss" and run.data.metrics["val/loss"] == 1.5
