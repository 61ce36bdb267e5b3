"""A fit killed while it writes a checkpoint or an export: the previous file or folder survives
whole, nothing is left in $TMPDIR, and ``--ckpt_path last`` ends where an unbroken run ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

from lmexp.atomic import TEMPORARY_PREFIX
from lmexp.checkpoints import load_checkpoint, read_checkpoint
from lmexp.run_folders import run_folders
from tests.faults.conftest import write_tiny_config

pytestmark = pytest.mark.fault
ROOT = Path(__file__).resolve().parents[2]
STEPS = 12
# Every 4 steps a save writes best.ckpt, its export best/, then last.ckpt (no validation split:
# the best checkpoint is the latest one).
EVERY = 4


def fit(config: Path, root: Path, *extra: str, fault: str | None = None,
        tmpdir: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("LMEXP_FAULT", None)
    if fault:
        env["LMEXP_FAULT"] = fault
    if tmpdir is not None:
        env["TMPDIR"] = str(tmpdir)
    command = [sys.executable, "-m", "lmexp", "fit", "--config", str(config), f"--trainer.default_root_dir={root}",
               f"--trainer.max_steps={STEPS}", f"--checkpoint.every_n_train_steps={EVERY}", "--data.val_fraction=0",
               *extra]
    return subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=400)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path).model.state_dict()


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name, value in a.items():
        assert torch.equal(value, b[name]), name


def temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.startswith(TEMPORARY_PREFIX)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """The tiny config and the weights an uninterrupted run of it ends with."""
    folder = tmp_path_factory.mktemp("checkpoint-faults")
    config = write_tiny_config(folder / "config")
    done = fit(config, folder / "straight")
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = run_folders(folder / "straight")
    return config, weights(run / "checkpoints" / "last.ckpt")


@pytest.fixture
def other_tmpdir(tmp_path: Path):
    """A $TMPDIR on another filesystem than the run folder (tmpfs), where the machine has one."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK) or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        yield None
        return
    folder = shm / f"lmexp-test-{uuid.uuid4().hex}"
    folder.mkdir()
    yield folder
    for entry in folder.iterdir():
        entry.unlink()
    folder.rmdir()


def test_a_kill_while_writing_a_checkpoint_keeps_the_previous_one_and_resumes_exactly(tiny, tmp_path, other_tmpdir):
    config, straight = tiny
    root = tmp_path / "runs"
    # The 4th checkpoint write is last.ckpt at step 8: the kill strikes with half of it on disk.
    killed = fit(config, root, fault="checkpoint.write@4:kill", tmpdir=other_tmpdir)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    (run,) = run_folders(root)
    checkpoints = run / "checkpoints"
    assert read_checkpoint(checkpoints / "last.ckpt")["global_step"] == EVERY  # the previous one, whole
    assert read_checkpoint(checkpoints / "best.ckpt")["global_step"] == 2 * EVERY
    if other_tmpdir is not None:
        assert list(other_tmpdir.iterdir()) == []  # nothing staged (or leaked) in $TMPDIR

    resumed = fit(config, root, "--ckpt_path", "last", tmpdir=other_tmpdir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert run_folders(root) == [run]  # the same run continued
    assert read_checkpoint(checkpoints / "last.ckpt")["global_step"] == STEPS
    assert_same_weights(weights(checkpoints / "last.ckpt"), straight)
    assert temporaries(root) == []  # the killed write's temporary file was cleared
    if other_tmpdir is not None:
        assert list(other_tmpdir.iterdir()) == []


def test_a_kill_while_exporting_keeps_the_previous_export_loadable(tiny, tmp_path, other_tmpdir):
    config, straight = tiny
    root = tmp_path / "runs"
    killed = fit(config, root, fault="export.write@2:kill", tmpdir=other_tmpdir)  # the export at step 8
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    (run,) = run_folders(root)
    export = run / "checkpoints" / "best"
    assert not [p for p in export.iterdir() if p.name.startswith(".") or p.suffix == ".tmp"]
    previous = load_checkpoint(export)  # the step-4 export, whole
    assert previous.tokenizer is not None

    resumed = fit(config, root, "--ckpt_path", "last", tmpdir=other_tmpdir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(weights(export), straight)  # the export of the final (and best) checkpoint
    assert temporaries(root) == []
