"""MLflow tracking of every run: what a run records, one run per job (resume, DDP), run folders,
stop statuses, outages of a tracking server, and one-line errors for bad tracking settings."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from lmexp.cli import main
from lmexp.mlflow_store import JOURNAL_NAME, flatten
from lmexp.run_folders import run_folders
from tests.test_cli import ROOT, quickstart_args

SETPRIORITY = os.setpriority  # the real one: the autouse fixture below replaces it
WAIT_SECONDS = 120.0  # the longest a test waits for another thread or process: never reached unless it is broken


@pytest.fixture(autouse=True)
def tracker_thread_at_normal_priority(monkeypatch):
    """Once training starts, the tracker's thread takes the lowest CPU priority, so that MLflow's
    work yields to training. Only one test here is about that, and behind other busy processes such
    a thread can wait minutes for a core (the last records past the end's flush): here it keeps the
    priority it started with."""
    monkeypatch.setattr(os, "setpriority", lambda *args: None)


def client(uri: str | None = None):
    from mlflow import MlflowClient

    return MlflowClient(uri or os.environ["MLFLOW_TRACKING_URI"])


def runs_in(folder: Path, uri: str | None = None) -> list:
    """The MLflow runs whose run folder lies under ``folder``."""
    mlflow = client(uri)
    found = mlflow.search_runs([e.experiment_id for e in mlflow.search_experiments()], max_results=1000)
    return [r for r in found if r.data.tags.get("run_dir", "").startswith(str(folder.resolve()))]


def history(run, key: str, uri: str | None = None) -> list[int]:
    return sorted(m.step for m in client(uri).get_metric_history(run.info.run_id, key))


def artifacts(run, path: str = "", uri: str | None = None) -> set[str]:
    return {a.path for a in client(uri).list_artifacts(run.info.run_id, path or None)}


def tracked_args(root: Path, steps: int = 20) -> list[str]:
    return quickstart_args(root, steps) + ["--trainer.log_every_n_steps=5", "--trainer.enable_progress_bar=false"]


def test_a_fit_records_config_metrics_artifacts_and_tags_and_a_second_run_keeps_the_first(tmp_path: Path):
    main(tracked_args(tmp_path))
    (run,) = runs_in(tmp_path)
    assert run.info.status == "FINISHED" and run.info.run_name == Path(run.data.tags["run_dir"]).name
    params = run.data.params
    # The resolved config, flattened as the short flags spell it, and the resolved network.
    assert params["trainer.max_steps"] == "20" and params["model.lr"] == "0.002" and params["data.source"] == "python-docs"
    assert params["model.network"] == "gpt-nano" and params["network.n_layer"] == "4" and params["network.block_size"] == "128"
    assert "lr" not in params and "batch_size" not in params  # not repeated under Lightning's short names
    assert int(params["n_parameters"]) > 100_000 and int(params["network.vocab_size"]) > 50
    assert params["system.torch"] == torch.__version__ and params["system.precision"] == "32-true"
    assert int(params["data_stats.train_tokens"]) > 0 and int(params["data_stats.cleaning.documents_in"]) > 0
    tags = run.data.tags
    assert (tags["objective"], tags["preset"], tags["dataset"], tags["tokenizer"]) == ("CausalLM", "gpt-nano", "python-docs", "char")
    assert tags["checkpoint.best"].endswith("checkpoints/best.ckpt") and Path(tags["checkpoint.best"]).is_file()
    # Metrics at the logged steps only (every 5th step; Lightning counts from 0), and per validation.
    assert history(run, "train/loss") == [4, 9, 14, 19]
    assert history(run, "val/loss") == [9, 19]
    assert {"train/tokens_per_sec", "val/ppl", "val/bpb", "lr-AdamW/pg1"} <= set(run.data.metrics)
    assert {"config.yaml", "tokenizer.json", "samples.txt", "loss_curve.png"} <= artifacts(run)
    assert {a.path for a in client().list_logged_model_artifacts(run.data.tags["lmexp.model_id"])} == {
        "model.safetensors", "config.json", "tokenizer.json"}  # the best export is the run's model, not a run artifact
    png = Path(tags["run_dir"]) / "loss_curve.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The same config again: a second run folder and MLflow run; the first run's files stay.
    first_best = Path(tags["checkpoint.best"])
    first_bytes = first_best.read_bytes()
    main(tracked_args(tmp_path, steps=10))
    second = [r for r in runs_in(tmp_path) if r.info.run_id != run.info.run_id]
    assert len(second) == 1 and second[0].data.tags["run_dir"] != tags["run_dir"]
    assert first_best.read_bytes() == first_bytes
    assert (tmp_path / "latest").resolve() == Path(second[0].data.tags["run_dir"])  # the newest training run


def test_a_resumed_fit_continues_its_run_folder_and_mlflow_run(tmp_path: Path):
    main(tracked_args(tmp_path, steps=10))
    main(tracked_args(tmp_path, steps=20) + ["--ckpt_path", "last"])
    (run,) = runs_in(tmp_path)  # one run, not two
    assert history(run, "train/loss") == [4, 9, 14, 19]  # both halves in one curve
    assert run.info.status == "FINISHED" and run.data.tags["resumed_with.trainer.max_steps"] == "20"
    assert len(run_folders(tmp_path)) == 1  # one run folder


def test_evaluation_runs_are_tracked_and_point_to_the_trained_run(tmp_path: Path):
    main(tracked_args(tmp_path, steps=10))
    (trained,) = runs_in(tmp_path)
    main(["test", "--config", str(ROOT / "configs" / "quickstart.yaml"), f"--trainer.default_root_dir={tmp_path}",
          "--trainer.limit_test_batches=2", "--ckpt_path", "best"])
    (tested,) = [r for r in runs_in(tmp_path) if r.info.run_id != trained.info.run_id]
    assert tested.info.run_name.endswith("-test") and tested.info.status == "FINISHED"
    assert tested.data.tags["evaluated_run_id"] == trained.info.run_id and "test/loss" in tested.data.metrics


def test_a_crash_marks_the_run_failed(tmp_path: Path):
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(tracked_args(tmp_path) + ["--trainer.callbacks+=tests.helpers.FailAtStep", "--trainer.callbacks.step=7"])
    (run,) = runs_in(tmp_path)
    assert run.info.status == "FAILED" and history(run, "train/loss") == [4]


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_a_stopped_run_is_marked_killed(tmp_path: Path, restore_signal_handlers, signal_name: str):
    with pytest.raises(SystemExit):
        main(tracked_args(tmp_path) + ["--trainer.callbacks+=tests.helpers.SignalAtStep", "--trainer.callbacks.step=6",
                                       f"--trainer.callbacks.signal_name={signal_name}"])
    (run,) = runs_in(tmp_path)
    assert run.info.status == "KILLED"


def test_the_readme_build_example_runs_as_written(tmp_path: Path, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    example = next(block.split("```", 1)[0] for block in readme.split("```python\n")[1:] if "build(" in block)
    short = example.replace('"trainer.max_steps": 200', '"trainer.max_steps": 4, "model.warmup_steps": 1, '
                            '"trainer.val_check_interval": 4, "trainer.limit_val_batches": 2')
    assert short != example
    monkeypatch.chdir(tmp_path)
    exec(compile(short.replace("configs/quickstart.yaml", str(ROOT / "configs" / "quickstart.yaml")), "README.md", "exec"), {})
    (run,) = runs_in(tmp_path / "runs" / "quickstart")
    assert run.info.run_name == "lr-3e-3" and run.data.params["model.lr"] == "0.003"


def test_tracking_off_writes_the_run_folder_and_no_mlflow_run(tmp_path: Path):
    main(tracked_args(tmp_path, steps=6) + ["--trainer.logger=false"])
    assert runs_in(tmp_path) == []
    assert (tmp_path / "latest" / "config.yaml").is_file() and (tmp_path / "latest" / "checkpoints" / "last.ckpt").is_file()


def test_a_saved_config_reruns_as_a_new_run_and_a_best_checkpoint_branches(tmp_path: Path):
    main(tracked_args(tmp_path, steps=10) + ["--run_name", "A"])
    (a,) = runs_in(tmp_path)
    saved = tmp_path / "A" / "config.yaml"
    a_files = {p.name: p.read_bytes() for p in (tmp_path / "A" / "checkpoints").glob("*.ckpt")}

    # The run's own config.yaml, fed back: a new run of the same experiment beside A.
    main(["fit", "--config", str(saved), f"--trainer.default_root_dir={tmp_path}", "--run_name", "again"])
    again = (tmp_path / "again").resolve()
    assert (again / "checkpoints" / "last.ckpt").is_file() and not (tmp_path / "A" / "again").exists()
    assert {r.data.tags["run_dir"] for r in runs_in(tmp_path)} == {str((tmp_path / "A").resolve()), str(again)}

    # Training on from A's best checkpoint is a new run that names A; A keeps its files and record.
    main(tracked_args(tmp_path, steps=14) + ["--ckpt_path", str(tmp_path / "A" / "checkpoints" / "best.ckpt")])
    branch = max(runs_in(tmp_path), key=lambda r: r.info.start_time)
    assert branch.info.run_id != a.info.run_id and branch.data.tags["started_from_run_id"] == a.info.run_id
    assert {p.name: p.read_bytes() for p in (tmp_path / "A" / "checkpoints").glob("*.ckpt")} == a_files
    assert history(a, "train/loss") == [4, 9]  # A's curve is untouched


def test_evaluating_a_named_runs_best_checkpoint_gets_its_own_folder(tmp_path: Path):
    main(tracked_args(tmp_path, steps=10) + ["--run_name", "A"])
    (a,) = runs_in(tmp_path)
    main(["validate", "--config", str(ROOT / "configs" / "quickstart.yaml"), f"--trainer.default_root_dir={tmp_path}",
          "--trainer.limit_val_batches=2", "--ckpt_path", "best", "--run_name", "A"])
    (evaluation,) = [r for r in runs_in(tmp_path) if r.info.run_id != a.info.run_id]
    assert evaluation.info.run_name == "A-validate" and evaluation.data.tags["evaluated_run_id"] == a.info.run_id


def test_a_run_that_fails_on_its_data_leaves_no_folder_and_no_mlflow_run(tmp_path: Path, capsys):
    main(tracked_args(tmp_path, steps=4) + ["--run_name", "good"])
    assert "does not exist" in one_line_error(capsys, tracked_args(tmp_path, steps=4) + ["--data.source=/nonexistent"])
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "lmexp-cache") == ["good", "latest"]
    assert (tmp_path / "latest").resolve().name == "good" and len(runs_in(tmp_path)) == 1


def test_runs_built_together_train_as_if_built_alone(tmp_path: Path):
    from lmexp.runs import build

    args = tracked_args(tmp_path, steps=10)[3:] + ["--trainer.logger=false"]
    config = [ROOT / "configs" / "quickstart.yaml"]
    first, second = build("fit", configs=config, args=args), build("fit", configs=config, args=args)
    first.execute()
    second.execute()
    assert first.trainer.callback_metrics["val/loss"] == second.trainer.callback_metrics["val/loss"]


def test_the_runs_verb_lists_runs_with_metrics_and_checkpoints(tmp_path: Path, capsys):
    main(tracked_args(tmp_path, steps=10) + ["--experiment", "listing-test", "--run_name", "first"])
    capsys.readouterr()
    main(["runs", "--experiment", "listing-test"])
    out = capsys.readouterr().out
    # tmp_path is outside the working directory: the folder is absolute, and left-trimmed with "…" when long
    line = next(line for line in out.splitlines() if line.split() and line.split()[0].endswith("/first"))
    assert "FINISHED" in line and line.split()[-1] == "best.ckpt" and len(line) <= 100
    assert str(tmp_path / "first").endswith(line.split()[0].lstrip("…"))


def test_flatten_keeps_mlflow_limits_and_drops_init_args():
    flat = flatten({"model": {"class_path": "x.Y", "init_args": {"lr": 0.1, "betas": [0.9, 0.99], "huge": "a" * 7000}},
                    "trainer": {"callbacks": [{"class_path": "A", "init_args": {"k": None}}]}, "k" * 300: 1})
    assert flat["model.class_path"] == "x.Y" and flat["model.lr"] == "0.1" and flat["model.betas"] == "[0.9, 0.99]"
    assert flat["trainer.callbacks.0.class_path"] == "A" and flat["trainer.callbacks.0.k"] == "null"
    assert len(flat["model.huge"]) == 6000 and flat["model.huge"].endswith("[truncated]")
    assert not any(len(key) > 250 for key in flat)


def test_git_state_names_commit_and_dirty_flag(tmp_path: Path):
    from lmexp.recording import git_state

    assert git_state(tmp_path) == {}  # not a checkout
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path)]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "f.txt").write_text("a")
    subprocess.run([*git, "add", "f.txt"], check=True)
    subprocess.run([*git, "commit", "-qm", "c"], check=True)
    commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert git_state(tmp_path) == {"mlflow.source.git.commit": commit, "git.dirty": "false"}
    (tmp_path / "f.txt").write_text("b")
    assert git_state(tmp_path)["git.dirty"] == "true"


def one_line_error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(("uri", "expected"), [
    ("not a uri", "is not a store MLflow knows"),
    ("http://", "names no host"),
    ("sqlite://", "names no database file"),
    ("sqlite:///{file}/mlflow.db", "cannot be written"),
])
def test_bad_tracking_uris_are_one_line_errors(tmp_path: Path, capsys, monkeypatch, uri: str, expected: str):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    uri = uri.format(file=blocker)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert expected in one_line_error(capsys, tracked_args(tmp_path, steps=2))
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # the same URI given as a logger setting
    flags = ["--trainer.logger=lmexp.tracking.MLflowTracker", f"--trainer.logger.tracking_uri={uri}"]
    assert expected in one_line_error(capsys, tracked_args(tmp_path, steps=2) + flags)


@pytest.mark.parametrize(("name", "expected"), [("", "is empty"), ("x" * 501, "more than MLflow's 500")])
def test_experiment_names_mlflow_rejects_are_one_line_errors(tmp_path: Path, capsys, name: str, expected: str):
    assert expected in one_line_error(capsys, tracked_args(tmp_path, steps=2) + [f"--experiment={name}"])


def test_an_existing_run_name_is_refused_unless_resumed(tmp_path: Path, capsys):
    main(tracked_args(tmp_path, steps=4) + ["--run_name", "mine"])
    assert "run folder" in one_line_error(capsys, tracked_args(tmp_path, steps=4) + ["--run_name", "mine"])
    main(tracked_args(tmp_path, steps=6) + ["--run_name", "mine", "--ckpt_path", "last"])
    assert torch.load(tmp_path / "mine" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6


def test_records_kept_through_an_outage_are_sent_in_order_when_the_store_returns(tmp_path: Path, monkeypatch):
    """The tracker's thread journals what it cannot send and replays it, in order, once the store answers."""
    store = FakeStore(monkeypatch, down=True)
    tracker = _tracker(tmp_path)
    with pytest.warns(UserWarning, match="unreachable"):
        for step in range(5):
            tracker.log_metrics({"train/loss": float(step)}, step=step)
        tracker.flush(timeout=10)
    journal = tmp_path / JOURNAL_NAME
    assert journal.is_file() and len(journal.read_text().splitlines()) == 1 + 5  # header + records
    store.down = False
    tracker.log_metrics({"train/loss": 5.0}, step=5)
    deadline = time.monotonic() + 10
    while len(store.applied) < 6 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert store.steps() == [0, 1, 2, 3, 4, 5]
    tracker.finalize("success")
    last = store.applied[-1][1]
    assert last["kind"] == "end" and last["status"] == "FINISHED"
    assert not journal.exists()


def test_the_tracker_never_makes_training_wait_for_the_store(tmp_path: Path, monkeypatch):
    """Lightning reads the logger's version on the first step: it answers at once while the
    store is still starting (here: held until the test lets it go)."""
    import threading

    from lmexp import mlflow_store
    from lmexp.tracking import MLflowTracker

    release = threading.Event()

    def slow_connect(self):
        release.wait(30)
        self.client, self.run_id = object(), "the-run"

    monkeypatch.setattr(mlflow_store.TrackingStore, "connect", slow_connect)
    monkeypatch.setattr(mlflow_store.TrackingStore, "apply", lambda self, record: None)
    tracker = MLflowTracker(tracking_uri="http://127.0.0.1:9", experiment_name="e", run_name="r", save_dir=str(tmp_path))
    tracker.log_metrics({"train/loss": 1.0}, step=0)
    assert tracker.version is None and tracker.run_id is None  # not started yet, and nobody waited
    release.set()
    assert tracker.wait_for_run(timeout=30) == "the-run" == tracker.version
    tracker.finalize("success")


def test_training_waits_a_bounded_time_for_mlflows_start_and_never_gives_up_on_it(tmp_path: Path, monkeypatch):
    """Training starts once the start-up records are sent (they would otherwise run beside the
    first steps); a store slower than the wait is waited for no longer, and still gets them."""
    import threading

    from lmexp import mlflow_store
    from lmexp.tracking import MLflowTracker

    release, applied = threading.Event(), []

    def slow_connect(self):
        release.wait(30)
        self.client, self.run_id = object(), "the-run"

    monkeypatch.setattr(mlflow_store.TrackingStore, "connect", slow_connect)
    monkeypatch.setattr(mlflow_store.TrackingStore, "apply", lambda self, record: applied.append(record["kind"]))
    tracker = MLflowTracker(tracking_uri="http://127.0.0.1:9", experiment_name="e", run_name="r", save_dir=str(tmp_path))
    tracker.log_hyperparams({"lr": 0.1})
    assert tracker.settle(0.2) is False and applied == []  # still starting: the wait ends, the tracker goes on
    release.set()
    assert tracker.settle(30) is True and applied  # sent: nothing was dropped by the timed-out wait
    assert not tracker._abandoned
    tracker.finalize("success")


def test_the_sender_runs_at_the_process_priority_until_training_starts_then_yields(tmp_path: Path, monkeypatch):
    """MLflow's start-up, which training waits for, must not starve behind other busy processes;
    once the wait is over, the sender yields the CPU to the training threads."""
    from lmexp import mlflow_store
    from lmexp.tracking import MLflowTracker

    monkeypatch.setattr(os, "setpriority", SETPRIORITY)  # this test is about the priority
    started = threading.Event()

    def connect(self):
        started.set()
        self.client, self.run_id = object(), "the-run"

    monkeypatch.setattr(mlflow_store.TrackingStore, "connect", connect)
    monkeypatch.setattr(mlflow_store.TrackingStore, "apply", lambda self, record: None)
    tracker = MLflowTracker(tracking_uri="http://127.0.0.1:9", experiment_name="e", run_name="r", save_dir=str(tmp_path))
    tracker.log_hyperparams({"lr": 0.1})
    assert started.wait(WAIT_SECONDS)
    sender = tracker._thread.native_id
    assert os.getpriority(os.PRIO_PROCESS, sender) == os.getpriority(os.PRIO_PROCESS, 0)
    assert tracker.settle(WAIT_SECONDS) is True
    assert os.getpriority(os.PRIO_PROCESS, sender) == 19
    tracker.finalize("success")


def test_a_fit_starts_training_after_the_tracker_has_sent_its_start(tmp_path: Path, monkeypatch):
    """The run's params, tags and files are in the store when the first training step starts."""
    import lightning.pytorch as pl

    from lmexp import mlflow_store, recording, runs
    from lmexp.tracking import tracker_of

    # A store that answers only once training has begun, or after a second: unless training waits
    # for the start, the first step finds no run at all.
    training, connect = threading.Event(), mlflow_store.TrackingStore.connect

    def late_connect(store):
        training.wait(1.0)
        connect(store)

    monkeypatch.setattr(mlflow_store.TrackingStore, "connect", late_connect)
    monkeypatch.setattr(recording, "SETTLE_SECONDS", WAIT_SECONDS)  # a wait that ends only when the start is sent
    seen: dict = {}

    class FirstStep(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 0:
                run_id = tracker_of(trainer).run_id
                if run_id is not None:
                    run = client().get_run(run_id)
                    seen.update(params=run.data.params, tags=run.data.tags, files=artifacts(run))
                training.set()

    run = runs.build("fit", args=tracked_args(tmp_path, steps=3)[1:], callbacks=[FirstStep()])
    run.execute()
    assert seen, "the first step found no MLflow run"
    params, tags = seen["params"], seen["tags"]
    assert params["trainer.max_steps"] == "3" and params["model.lr"] == "0.002"  # the config
    assert params["system.torch"] == torch.__version__ and int(params["data_stats.train_tokens"]) > 0  # the run's
    assert int(params["n_parameters"]) > 100_000 and params["network.n_layer"] == "4"  # the model's, at fit start
    assert tags["run_dir"] == str(run.run_dir.resolve()) and tags["objective"] == "CausalLM"
    assert {"config.yaml", "tokenizer.json"} <= seen["files"]


def test_a_finished_runs_client_does_not_reopen_it(tmp_path: Path):
    from lmexp.runs import build

    run = build("fit", configs=[ROOT / "configs" / "quickstart.yaml"], args=tracked_args(tmp_path, steps=4)[3:])
    run.execute()
    tracker = run.tracker
    assert tracker.client.get_run(tracker.run_id).info.status == "FINISHED"
    tracker.finalize("failed")  # Lightning's or the exit hook's late call: the run stays as it ended
    assert client().get_run(tracker.run_id).info.status == "FINISHED"


class FakeStore:
    """Stands in for the tracking store: records what it is sent, fails while ``down``."""

    def __init__(self, monkeypatch, down: bool = False, hold_step: int | None = None,
                 fail_after: int | None = None) -> None:
        from lmexp import mlflow_store

        self.down, self.fail_after, self.applied = down, fail_after, []
        # A store that takes the metrics of ``hold_step`` and answers only once ``release`` is set.
        self.hold_step, self.holding, self.release = hold_step, threading.Event(), threading.Event()
        fake = self

        def connect(store):
            if fake.down:
                raise ConnectionError("Connection refused")
            store.client, store.run_id = object(), store.run_id or "new-run"

        def apply(store, record):
            if record["kind"] == "metrics" and record["step"] == fake.hold_step:
                fake.holding.set()
                fake.release.wait(WAIT_SECONDS)
            if fake.down or len(fake.applied) == fake.fail_after:
                raise ConnectionError("Connection refused")
            fake.applied.append((store.run_id, record))

        monkeypatch.setattr(mlflow_store.TrackingStore, "connect", connect)
        monkeypatch.setattr(mlflow_store.TrackingStore, "apply", apply)

    def steps(self) -> list[int]:
        return [record["step"] for _, record in self.applied if record["kind"] == "metrics"]


def _tracker(folder: Path, **kwargs):
    from lmexp.tracking import MLflowTracker

    return MLflowTracker(tracking_uri="http://127.0.0.1:9", experiment_name="e", run_name="r", save_dir=str(folder),
                         **{"retry_seconds": 0.2, **kwargs})


def test_a_resumed_fit_sends_the_journal_an_earlier_process_left_into_its_run(tmp_path: Path, monkeypatch):
    store = FakeStore(monkeypatch, down=True)
    first = _tracker(tmp_path)
    with pytest.warns(UserWarning, match="unreachable"):
        for step in range(3):
            first.log_metrics({"train/loss": 1.0}, step=step)
        first.finalize("failed")  # the process ends with the store still down
    assert (tmp_path / JOURNAL_NAME).is_file()
    store.down = False
    second = _tracker(tmp_path)  # the resumed fit, in the same run folder
    second.log_metrics({"train/loss": 1.0}, step=3)
    second.finalize("success")
    assert store.steps() == [0, 1, 2, 3] and {run for run, _ in store.applied} == {"new-run"}
    assert not (tmp_path / JOURNAL_NAME).exists()


def test_sync_that_fails_part_way_keeps_exactly_the_unsent_records(tmp_path: Path, monkeypatch):
    from lmexp.errors import ConfigError
    from lmexp.mlflow_store import read_journal, sync_journal, write_journal

    journal = tmp_path / JOURNAL_NAME
    records = [{"kind": "metrics", "values": {"train/loss": 1.0}, "step": i, "time": 0} for i in range(4)]
    write_journal(journal, {"kind": "run", "tracking_uri": "http://127.0.0.1:9", "experiment": "e", "run_name": "r",
                            "run_id": None, "tags": {}}, records)
    store = FakeStore(monkeypatch, fail_after=2)
    with pytest.raises(ConfigError, match="unreachable after 2 of 4 records"):
        sync_journal(journal)
    header, left = read_journal(journal)
    assert header["run_id"] == "new-run" and [r["step"] for r in left] == [2, 3]
    store.fail_after = None
    assert sync_journal(journal) == "new-run"  # the same run, not a second one
    assert store.steps() == [0, 1, 2, 3] and not journal.exists()


def test_a_store_too_slow_to_drain_in_time_leaves_the_rest_in_the_journal(tmp_path: Path, monkeypatch):
    from lmexp.mlflow_store import read_journal

    store = FakeStore(monkeypatch, hold_step=40)  # takes steps 0-39, then does not answer for step 40
    tracker = _tracker(tmp_path)
    for step in range(100):
        tracker.log_metrics({"train/loss": 1.0}, step=step)
    assert store.holding.wait(WAIT_SECONDS), "the tracker's thread never reached step 40"
    with pytest.warns(UserWarning, match="60 records .* are kept in"):
        tracker.flush(timeout=0.5)  # cannot end while the store holds step 40: gives up after its timeout
    _, kept = read_journal(tmp_path / JOURNAL_NAME)
    assert store.steps() == list(range(40))
    assert [r["step"] for r in kept] == list(range(40, 100))  # the one in hand too: it may never land
    store.release.set()  # it lands after all; the thread, having given up, sends nothing more
    tracker._thread.join(WAIT_SECONDS)
    assert not tracker._thread.is_alive() and store.steps() == list(range(41))
    tracker.finalize("success")  # after giving up, the end is journaled too, beside what is still unsent
    _, kept = read_journal(tmp_path / JOURNAL_NAME)
    assert [r["step"] for r in kept[:-1]] == list(range(41, 100)) and kept[-1]["kind"] == "end"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(folder: Path, port: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{folder / 'server.db'}", "--artifacts-destination", str(folder / "artifacts")]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    import urllib.request

    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as answer:
                if answer.status == 200:
                    return server
        except OSError:
            time.sleep(0.3)
    os.killpg(server.pid, 15)
    raise RuntimeError("mlflow server did not start within 120 s")


def _stop_server(server: subprocess.Popen) -> None:
    try:
        os.killpg(server.pid, 9)
    except ProcessLookupError:
        pass
    server.wait(timeout=60)


def test_a_tracking_server_run_and_an_outage_in_the_middle_of_one(tmp_path: Path, monkeypatch, capsys):
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    server = _start_server(tmp_path, port)
    try:
        main(tracked_args(tmp_path / "first"))  # read back over the REST API
        (run,) = runs_in(tmp_path / "first", uri)
        assert run.info.status == "FINISHED" and history(run, "train/loss", uri) == [4, 9, 14, 19]
        model = client(uri).get_logged_model(run.data.tags["lmexp.model_id"])
        assert {"config.yaml", "loss_curve.png"} <= artifacts(run, uri=uri) and str(model.status).endswith("READY")
        from lmexp.mlflow_models import resolve_model_uri
        assert (resolve_model_uri(f"models:/{model.model_id}", uri) / "model.safetensors").is_file()

        # The server goes away after step 8: training goes on, one warning names the journal.
        with pytest.warns(UserWarning) as warned:
            main(tracked_args(tmp_path / "second", steps=30) + [
                "--trainer.callbacks+=tests.helpers.StopProcessAtStep", "--trainer.callbacks.step=8",
                f"--trainer.callbacks.pid={server.pid}", f"--trainer.callbacks.port={port}"])
        server.wait(timeout=60)
        run_dir = (tmp_path / "second" / "latest").resolve()
        journal = run_dir / JOURNAL_NAME
        assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 30
        outage = [str(w.message) for w in warned if "unreachable" in str(w.message)]
        assert outage and all(str(journal) in message and "lmexp runs sync" in message for message in outage)
        assert journal.is_file()

        # The records kept while it was down are sent once it is back.
        server = _start_server(tmp_path, port)
        main(["runs", "sync", str(journal)])
        (second,) = runs_in(tmp_path / "second", uri)
        assert history(second, "train/loss", uri) == [4, 9, 14, 19, 24, 29]
        assert second.info.status == "FINISHED" and "loss_curve.png" in artifacts(second, uri=uri)
        assert not journal.exists()
    finally:
        _stop_server(server)


# ------------------------------------------------------------ damaged stores, journals, dead runs
def _store_copy(folder: Path, isolated_tracking: str) -> tuple[str, Path]:
    """A complete SQLite store of our own: a copy of the session's (its migrations already ran)."""
    import shutil

    client(isolated_tracking).search_experiments()  # the session store exists
    path = folder / "mlflow.db"
    shutil.copy(isolated_tracking[len("sqlite:///"):], path)
    return f"sqlite:///{path}", path


def _half_migrate(path: Path) -> None:
    """What a kill in the middle of MLflow's alembic migrations leaves: a batch table never renamed."""
    import sqlite3

    with contextlib.closing(sqlite3.connect(path)) as db:
        (head,) = db.execute("SELECT version_num FROM alembic_version").fetchone()
        db.execute("UPDATE alembic_version SET version_num = ?", (_previous_revision(head),))
        db.execute("CREATE TABLE _alembic_tmp_runs (run_uuid VARCHAR(32) NOT NULL, step BIGINT)")
        db.commit()


def _previous_revision(revision: str) -> str:
    import mlflow.store.db_migrations
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", os.path.dirname(mlflow.store.db_migrations.__file__))
    return ScriptDirectory.from_config(config).get_revision(revision).down_revision


@pytest.mark.parametrize("damage", ["half-migrated", "not-a-database"])
def test_a_damaged_store_is_one_line_from_runs_and_sync(tmp_path: Path, capsys, isolated_tracking: str, damage: str):
    uri, path = _store_copy(tmp_path, isolated_tracking)
    if damage == "half-migrated":
        _half_migrate(path)
    else:
        path.write_bytes(b"this is not an SQLite file" * 100)
    capsys.readouterr()  # MLflow's own log of the session store's creation
    err = one_line_error(capsys, ["runs", "--tracking_uri", uri])
    assert "damaged" in err and str(path) in err and "mv " in err
    journal = _journal(tmp_path, [_metric(0)], uri=uri)
    err = one_line_error(capsys, ["runs", "sync", str(journal)])
    assert "damaged" in err and journal.is_file()  # nothing lost


def test_a_damaged_store_during_training_is_named_once_and_the_records_are_kept(tmp_path: Path, isolated_tracking: str):
    from lmexp.mlflow_store import read_journal
    from lmexp.tracking import MLflowTracker

    uri, path = _store_copy(tmp_path, isolated_tracking)
    _half_migrate(path)
    tracker = MLflowTracker(tracking_uri=uri, experiment_name="e", run_name="r", save_dir=str(tmp_path / "run"),
                            retry_seconds=0.2)
    with pytest.warns(UserWarning) as warned:
        for step in range(3):
            tracker.log_metrics({"train/loss": 1.0}, step=step)
        tracker.flush(timeout=60)
        tracker.finalize("success")
    messages = [str(w.message) for w in warned]
    assert sum("damaged" in m for m in messages) == 1 and not any("sent when the store is back" in m for m in messages)
    _, records = read_journal(tmp_path / "run" / JOURNAL_NAME)
    assert [r["step"] for r in records if r["kind"] == "metrics"] == [0, 1, 2] and records[-1]["kind"] == "end"


def _metric(step: int) -> dict:
    return {"kind": "metrics", "values": {"train/loss": 1.0 + step}, "step": step, "time": 1_700_000_000_000 + step}


def _journal(folder: Path, records: list[dict], uri: str = "http://127.0.0.1:9", **header) -> Path:
    from lmexp.mlflow_store import write_journal

    journal = folder / JOURNAL_NAME
    write_journal(journal, {"kind": "run", "tracking_uri": uri, "experiment": "journal-tests", "run_name": "r",
                            "run_id": None, "tags": {}, **header}, records)
    return journal


def test_sync_reads_a_journal_up_to_a_torn_last_line_and_names_a_bad_line_in_the_middle(tmp_path: Path, monkeypatch):
    from lmexp.errors import ConfigError
    from lmexp.mlflow_store import sync_journal

    store = FakeStore(monkeypatch)
    journal = _journal(tmp_path, [_metric(0), _metric(1), {"kind": "end", "status": "FINISHED", "time": 0}])
    lines = journal.read_text().splitlines(keepends=True)
    journal.write_text("".join(lines[:3]) + lines[3][:10])  # killed while the end was written
    assert sync_journal(journal) == "new-run" and store.steps() == [0, 1]
    journal = _journal(tmp_path, [_metric(0), _metric(1)])
    lines = journal.read_text().splitlines(keepends=True)
    journal.write_text(lines[0] + lines[1][:10] + "\n" + lines[2])
    with pytest.raises(ConfigError, match="line 2"):
        sync_journal(journal)


def test_sync_sends_a_journal_to_the_store_given_with_tracking_uri(tmp_path: Path, capsys, isolated_tracking: str):
    journal = _journal(tmp_path, [_metric(0), _metric(1), {"kind": "end", "status": "FINISHED", "time": 1_700_000_000_002}])
    main(["runs", "sync", str(journal), "--tracking_uri", isolated_tracking])  # the journal names a dead server
    run_id = capsys.readouterr().out.split()[-1]
    run = client(isolated_tracking).get_run(run_id)
    assert run.info.status == "FINISHED" and history(run, "train/loss", isolated_tracking) == [0, 1]
    assert not journal.exists()


def _reaped_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_synced_run_whose_process_is_gone_ends_killed(tmp_path: Path, monkeypatch):
    from lmexp.mlflow_store import sync_journal

    store = FakeStore(monkeypatch)
    journal = _journal(tmp_path, [_metric(0)], tags={"lmexp.pid": str(_reaped_pid()), "lmexp.host": socket.gethostname()})
    sync_journal(journal)
    assert store.applied[-1][1]["kind"] == "end" and store.applied[-1][1]["status"] == "KILLED"
    # A journal of a process still running (a live fit's outage) is not ended by a sync.
    journal = _journal(tmp_path, [_metric(1)], tags={"lmexp.pid": str(os.getpid()), "lmexp.host": socket.gethostname()})
    sync_journal(journal)
    assert store.applied[-1][1]["kind"] == "metrics"


def test_an_unreachable_server_lets_training_start_as_soon_as_the_connect_failed(tmp_path: Path, monkeypatch):
    """A connect that failed means "offline": settle returns then, not after its whole timeout,
    even while a retry of the connect is still hanging."""
    from lmexp import mlflow_store, tracking

    hanging, calls = threading.Event(), []

    def connect(store):
        calls.append(1)
        if len(calls) > 1:
            hanging.wait(WAIT_SECONDS)  # a second try that hangs (a server that stopped answering)
        raise ConnectionError("Connection refused")

    # The warning comes from the tracker's thread, after settle may have returned: wait for it.
    warned, warnings_seen = threading.Event(), []

    def warn(message, *args, **kwargs):
        warnings_seen.append(message)
        warned.set()

    monkeypatch.setattr(tracking, "rank_zero_warn", warn)
    monkeypatch.setattr(mlflow_store.TrackingStore, "connect", connect)
    tracker = _tracker(tmp_path, retry_seconds=60)
    tracker.log_hyperparams({"lr": 0.1})
    settled: list[bool] = []
    waiter = threading.Thread(target=lambda: settled.append(tracker.settle(100 * WAIT_SECONDS)))
    waiter.start()
    waiter.join(WAIT_SECONDS)  # far shorter than settle's timeout: a settle that waited it out is still waiting
    assert warned.wait(WAIT_SECONDS) and "unreachable" in warnings_seen[0]
    assert settled == [False]
    hanging.set()
    tracker._abandoned = True  # let the thread end with the test
    tracker._thread.join(WAIT_SECONDS)


def test_the_loss_curve_is_drawn_while_the_store_is_unreachable(tmp_path: Path, monkeypatch):
    FakeStore(monkeypatch, down=True)
    tracker = _tracker(tmp_path)
    with pytest.warns(UserWarning, match="unreachable"):
        for step in range(5):
            tracker.log_metrics({"train/loss": 5.0 - step}, step=step)
        tracker.log_loss_curve()
        tracker.finalize("success")
    assert (tmp_path / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / JOURNAL_NAME).is_file()


def test_runs_shows_a_running_run_whose_process_is_gone_and_its_resumable_checkpoint(tmp_path: Path,
                                                                                    isolated_tracking: str):
    from lmexp.mlflow_store import list_runs

    mlflow = client(isolated_tracking)
    experiment = mlflow.get_experiment_by_name("dead-runs") or mlflow.get_experiment(mlflow.create_experiment("dead-runs"))
    run_dir = tmp_path / "killed"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "interrupted.ckpt").write_bytes(b"x")
    host = socket.gethostname()
    dead = mlflow.create_run(experiment.experiment_id, run_name="dead", tags={
        "lmexp.pid": str(_reaped_pid()), "lmexp.host": host, "run_dir": str(run_dir)})
    alive = mlflow.create_run(experiment.experiment_id, run_name="alive", tags={
        "lmexp.pid": str(os.getpid()), "lmexp.host": host})
    rows = {row["run_id"]: row for row in list_runs(isolated_tracking, "dead-runs")}
    assert rows[dead.info.run_id]["status"] == "KILLED?" and rows[alive.info.run_id]["status"] == "RUNNING"
    assert rows[dead.info.run_id]["checkpoint"] == str(run_dir / "checkpoints" / "interrupted.ckpt")


def test_a_tracker_tags_its_run_with_its_process_and_host(tmp_path: Path, monkeypatch):
    FakeStore(monkeypatch)
    tracker = _tracker(tmp_path)
    tracker.log_metrics({"train/loss": 1.0}, step=0)
    tracker.finalize("success")
    assert tracker._store.tags["lmexp.pid"] == str(os.getpid()) and tracker._store.tags["lmexp.host"] == socket.gethostname()


def test_a_server_that_accepts_no_connection_is_found_down_within_the_probe_timeout():
    """A host that drops connection attempts (here: a listening socket whose accept queue is full)
    counts as down after the probe's timeout, before MLflow's own requests would wait theirs out."""
    import socket

    from lmexp.mlflow_store import is_unreachable, probe_server

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    waiting = []
    try:
        for _ in range(4):  # fill the accept queue: later attempts get no answer at all
            client = socket.socket()
            client.setblocking(False)
            client.connect_ex(("127.0.0.1", port))
            waiting.append(client)
        with pytest.raises(ConnectionError) as raised:
            probe_server(f"http://127.0.0.1:{port}", timeout=0.5)
        assert is_unreachable(raised.value)
    finally:
        for client in waiting:
            client.close()
        server.close()
    with socket.socket() as listening:  # a server that accepts passes
        listening.bind(("127.0.0.1", 0))
        listening.listen(8)
        probe_server(f"http://127.0.0.1:{listening.getsockname()[1]}", timeout=5)
