"""``lmexp runs clean``: what killed runs leave behind is listed, then removed; nothing else is."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from lmexp.atomic import TEMPORARY_PREFIX
from lmexp.cli import main
from lmexp.run_folders import RUN_MARK, read_run_mark
from lmexp.verbs.clean import find_leftovers, run_state


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def run_folder(root: Path, name: str, status: str | None, pid: int, checkpoint: bytes | None = None,
               verb: str = "fit") -> Path:
    folder = root / "exp" / name
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text("seed_everything: 1\n")
    if status is not None:
        (folder / RUN_MARK).write_text(json.dumps({"status": status, "verb": verb, "pid": pid,
                                                   "host": socket.gethostname()}))
    if checkpoint is not None:
        (folder / "checkpoints").mkdir()
        (folder / "checkpoints" / "last.ckpt").write_bytes(checkpoint)
    return folder


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    import torch

    root = tmp_path / "runs"
    good = tmp_path / "good.ckpt"
    torch.save({"global_step": 3, "state_dict": {}}, good)
    dead = dead_pid()
    run_folder(root, "killed-early", "running", dead)
    run_folder(root, "killed-with-checkpoint", "running", dead, good.read_bytes())
    run_folder(root, "killed-cut-checkpoint", "running", dead, b"PK\x03\x04 cut short")
    run_folder(root, "alive", "running", os.getpid())
    run_folder(root, "finished", "finished", dead, good.read_bytes())
    run_folder(root, "evaluation", "finished", dead, verb="test")
    run_folder(root, "before-marks", None, dead, good.read_bytes())
    (root / "exp" / "empty").mkdir()
    (root / "exp" / "killed-with-checkpoint" / "checkpoints" / f"{TEMPORARY_PREFIX}{dead}-last.ckpt").write_bytes(b"x")
    (root / "exp" / "alive" / f"{TEMPORARY_PREFIX}{os.getpid()}-config.yaml").write_text("being written")
    (root / "exp" / "latest").symlink_to("gone", target_is_directory=True)
    return root


def test_states_come_from_the_run_mark_and_the_process(runs: Path):
    assert run_state(runs / "exp" / "killed-early") == "killed"
    assert run_state(runs / "exp" / "alive") == "running"
    assert run_state(runs / "exp" / "finished") == "finished"
    assert run_state(runs / "exp" / "before-marks") == "unknown"


def test_only_leftovers_of_killed_runs_are_listed(runs: Path):
    found = {item.path.relative_to(runs).as_posix(): item.reason for item in find_leftovers(runs)}
    dead = next(p.name for p in (runs / "exp" / "killed-with-checkpoint" / "checkpoints").iterdir()
                if p.name.startswith(TEMPORARY_PREFIX))
    assert found == {
        "exp/killed-early": "killed before its first checkpoint",
        "exp/killed-cut-checkpoint": "killed before its first checkpoint",
        "exp/empty": "empty run folder",
        f"exp/killed-with-checkpoint/checkpoints/{dead}": "temporary file of an unfinished write",
        "exp/latest": "link to a run folder that is gone",
    }


def test_clean_dry_run_lists_then_clean_removes(runs: Path, capsys):
    before = sorted(p.name for p in (runs / "exp").iterdir())
    main(["runs", "clean", "--root", str(runs), "--dry-run"])
    out = capsys.readouterr().out
    assert "would remove" in out and "killed-early" in out and "5 leftovers" in out
    assert sorted(p.name for p in (runs / "exp").iterdir()) == before
    main(["runs", "clean", "--root", str(runs)])
    assert sorted(p.name for p in (runs / "exp").iterdir()) == [
        "alive", "before-marks", "evaluation", "finished", "killed-with-checkpoint"]
    assert sorted(p.name for p in (runs / "exp" / "killed-with-checkpoint" / "checkpoints").iterdir()) == ["last.ckpt"]
    assert any(p.name.startswith(TEMPORARY_PREFIX) for p in (runs / "exp" / "alive").iterdir())  # a live run's stays
    main(["runs", "clean", "--root", str(runs)])
    assert "nothing to clean" in capsys.readouterr().out


def test_bad_root_is_one_line(tmp_path: Path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["runs", "clean", "--root", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and "nowhere" in err[0]


def test_a_run_marks_its_folder_running_then_finished(tmp_path: Path, tiny_corpus: Path):
    from lmexp.runs import build

    run = build("fit", overrides={
        "model": "lmexp.CausalLM", "model.init_args.network": "gpt-tiny", "model.init_args.warmup_steps": 0, "data": "lmexp.TextDataModule",
        "data.init_args.source": str(tiny_corpus), "data.init_args.tokenizer": "char", "trainer.max_steps": 2,
        "trainer.limit_val_batches": 1, "trainer.enable_progress_bar": False, "trainer.logger": False,
        "trainer.default_root_dir": str(tmp_path / "runs"),
    })
    run.execute()
    mark = read_run_mark(run.run_dir)
    assert mark["status"] == "finished" and mark["verb"] == "fit" and mark["pid"] == os.getpid()


def test_clean_ends_the_mlflow_runs_of_dead_processes_as_killed(tmp_path: Path, isolated_tracking: str, capsys):
    from mlflow import MlflowClient

    from lmexp.mlflow_store import ensure_store

    ensure_store(isolated_tracking)
    client = MlflowClient(isolated_tracking)
    experiment = client.get_experiment_by_name("clean-test") or client.get_experiment(
        client.create_experiment("clean-test"))
    here = {"lmexp.host": socket.gethostname()}
    dead = client.create_run(experiment.experiment_id, run_name="dead",
                             tags={**here, "lmexp.pid": str(dead_pid())}).info.run_id
    alive = client.create_run(experiment.experiment_id, run_name="alive",
                              tags={**here, "lmexp.pid": str(os.getpid())}).info.run_id
    (tmp_path / "runs").mkdir()
    main(["runs", "clean", "--root", str(tmp_path / "runs"), "--dry-run"])
    assert "would end MLflow run 'dead'" in capsys.readouterr().out
    assert client.get_run(dead).info.status == "RUNNING"
    main(["runs", "clean", "--root", str(tmp_path / "runs")])
    assert client.get_run(dead).info.status == "KILLED" and client.get_run(alive).info.status == "RUNNING"
    client.set_terminated(alive)


def test_clean_without_a_runs_folder_has_nothing_to_do(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    main(["runs", "clean", "--dry-run"])
    assert "nothing to clean under runs" in capsys.readouterr().out
