"""Kills while the tracking store is created and while the tracking journal is written: a kill
leaves no store or a complete one, and a journal whose whole lines all still sync."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from lmexp.mlflow_store import JOURNAL_NAME

pytestmark = pytest.mark.fault

CREATE = "import sys; from lmexp.mlflow_store import ensure_store; ensure_store(sys.argv[1])"


def _python(code: str, *args: str, fault: str | None = None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "LMEXP_FAULT"}
    if fault:
        env["LMEXP_FAULT"] = fault
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(process: subprocess.Popen) -> tuple[int, str]:
    _, err = process.communicate(timeout=300)
    return process.returncode, err


def _usable(uri: str) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment = client.create_experiment(f"check-{os.getpid()}-{len(client.search_experiments())}")
    run = client.create_run(experiment)
    client.log_metric(run.info.run_id, "train/loss", 1.0, step=3)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [3]


def test_a_kill_while_the_store_is_created_leaves_no_store_and_the_next_run_creates_it(tmp_path: Path):
    path = tmp_path / "mlflow.db"
    uri = f"sqlite:///{path}"
    code, err = _finish(_python(CREATE, uri, fault="store.create:kill"))
    assert code == -signal.SIGKILL, err
    assert not path.exists()  # no half-made store under the real name
    assert any(p.name.startswith(".lmexp-tmp-") for p in tmp_path.iterdir())  # the half-migrated temporary
    code, err = _finish(_python(CREATE, uri))
    assert code == 0, err
    _usable(uri)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".lmexp-tmp-")]


def test_two_processes_creating_one_fresh_store_at_once_both_succeed(tmp_path: Path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    creators = [_python(CREATE, uri) for _ in range(2)]
    for creator in creators:
        code, err = _finish(creator)
        assert code == 0, err
    _usable(uri)


TRACK = """
import sys, time
from lmexp.tracking import MLflowTracker
tracker = MLflowTracker(tracking_uri=sys.argv[1], experiment_name="torn", run_name="killed", save_dir=sys.argv[2],
                        retry_seconds=600)
for step in range(20):
    tracker.log_metrics({"train/loss": 10.0 - step}, step=step)
    tracker.settle(60)
time.sleep(600)  # the kill comes from the journal's fault point
"""


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_journal_cut_by_a_kill_syncs_its_whole_lines_elsewhere_and_the_run_ends_killed(
        tmp_path: Path, isolated_tracking: str):
    from mlflow import MlflowClient

    from lmexp.cli import main

    run_dir = tmp_path / "run"
    code, err = _finish(_python(TRACK, f"http://127.0.0.1:{_closed_port()}", str(run_dir), fault="journal.write@8:kill"))
    assert code == -signal.SIGKILL, err
    journal = run_dir / JOURNAL_NAME
    text = journal.read_text()
    assert not text.endswith("\n")  # the last line was cut
    whole = len(text.splitlines()) - 2  # less the header and the cut line
    assert whole > 0
    main(["runs", "sync", str(journal), "--tracking_uri", isolated_tracking])
    client = MlflowClient(isolated_tracking)
    (run,) = client.search_runs([client.get_experiment_by_name("torn").experiment_id])
    assert run.info.status == "KILLED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == list(range(whole))
    assert not journal.exists()
