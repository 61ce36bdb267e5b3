"""``lmexp runs`` speaks each run's task (accuracy and F1 for classifiers, loss and perplexity for
language models), names the checkpoint to use (``interrupted.ckpt`` included), and prints rows
that fit 100 columns under a pipe, with paths relative to the working directory."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from lmexp.cli import main
from lmexp.verbs.runs import format_runs


def _store(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(uri)


def tracked_run(uri: str, experiment: str, name: str, run_dir: Path, metrics: dict[str, float],
                status: str = "FINISHED", files: tuple[str, ...] = (), tags: dict[str, str] | None = None) -> None:
    """A run in the store as lmexp records one: its folder tag, metrics, checkpoint files, status."""
    mlflow = _store(uri)
    found = mlflow.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else mlflow.create_experiment(experiment)
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    for file in files:
        (run_dir / "checkpoints" / file).write_bytes(b"x")
    run = mlflow.create_run(experiment_id, run_name=name, tags={"run_dir": str(run_dir), "global_step": "120",
                                                                 **(tags or {})})
    for key, value in metrics.items():
        mlflow.log_metric(run.info.run_id, key, value, step=120)
    mlflow.set_terminated(run.info.run_id, status)
    time.sleep(0.01)  # distinct start times: the table is newest first


@pytest.fixture(scope="module")
def recorded(tracking_store: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A classifier run, a language-model run, and a run stopped before its first validation."""
    folder = tmp_path_factory.mktemp("listed")
    runs = folder / "runs"
    tracked_run(tracking_store, "table-cls", "20261207-101500", runs / "table-cls" / "20261207-101500",
                {"train/loss": 0.31, "val/loss": 0.41, "val/acc": 0.8343, "val/f1": 0.8301, "test/acc": 0.829,
                 "test/f1": 0.825}, files=("best.ckpt", "last.ckpt"),
                tags={"checkpoint.best": str(runs / "table-cls" / "20261207-101500" / "checkpoints" / "best.ckpt")})
    tracked_run(tracking_store, "table-lm", "lm-run", runs / "table-lm" / "lm-run",
                {"train/loss": 3.1, "val/loss": 3.2141, "val/ppl": 24.88}, files=("best.ckpt",))
    # Stopped by Ctrl-C before any validation: no best checkpoint, only interrupted.ckpt.
    tracked_run(tracking_store, "table-lm", "stopped-early", runs / "table-lm" / "stopped-early",
                {"train/loss": 5.0}, status="KILLED", files=("interrupted.ckpt",))
    return folder


@pytest.fixture
def listed(recorded: Path, monkeypatch) -> Path:
    monkeypatch.chdir(recorded)  # the table's paths are relative to the working directory
    return recorded


def printed_table(capsys, *args: str) -> list[str]:
    capsys.readouterr()
    main(["runs", *args])  # stdout is captured: not a terminal, as in a pipe
    return capsys.readouterr().out.splitlines()


def test_a_classifiers_runs_show_accuracy_and_f1(listed: Path, capsys):
    lines = printed_table(capsys, "--experiment", "table-cls")
    assert lines[0].split() == ["val", "test"]
    assert lines[1].split() == ["run", "status", "steps", "acc", "f1", "acc", "f1", "checkpoint"]
    # The run's folder relative to the working directory, its checkpoint's name in checkpoints/.
    assert lines[2].split() == ["runs/table-cls/20261207-101500", "FINISHED", "120", "0.834", "0.830", "0.829",
                                "0.825", "best.ckpt"]


def test_language_model_runs_show_loss_and_perplexity_and_an_interrupted_checkpoint(listed: Path, capsys):
    lines = printed_table(capsys, "--experiment", "table-lm")
    assert lines[0].split() == ["val"]  # no run was tested: no test columns
    assert lines[1].split() == ["run", "status", "steps", "loss", "ppl", "checkpoint"]
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    assert rows["runs/table-lm/lm-run"][3:] == ["3.214", "24.9", "best.ckpt"]
    # Stopped before its first validation: interrupted.ckpt is its only checkpoint.
    assert rows["runs/table-lm/stopped-early"][1:3] == ["KILLED", "120"]
    assert rows["runs/table-lm/stopped-early"][-1] == "interrupted.ckpt"


def test_every_row_fits_100_columns_under_a_pipe(listed: Path, capsys):
    lines = printed_table(capsys, "--limit", "50")
    assert all(len(line) <= 100 for line in lines), [len(line) for line in lines]
    assert lines[1].split()[:3] == ["run", "status", "steps"]  # both kinds listed: each split's headline
    assert any("acc 0.834" in line for line in lines) and any("ppl 24.9" in line for line in lines)


def test_a_checkpoint_path_too_long_for_the_line_keeps_its_end():
    far = "/" + "/".join(["a-very-long-folder-name"] * 6) + "/run/checkpoints/best.ckpt"
    rows = [{"run": "r-test", "run_dir": "/elsewhere/r-test", "status": "FINISHED", "steps": "1", "test/loss": 2.0,
             "test/ppl": 7.39, "checkpoint": far}]
    line = format_runs(rows, width=80).splitlines()[-1]
    assert len(line) == 80 and line.endswith("/run/checkpoints/best.ckpt") and "…" in line
