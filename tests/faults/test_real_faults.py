"""Faults made for real rather than at a fault point: a filesystem that fills up, a temporary folder
on another filesystem than the run, SIGTERM under two DDP processes."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from lmexp.verbs.chaos import (
    RUN_NAME,
    Chaos,
    exit_problems,
    final_weights,
    saved_problems,
    temporaries,
    weight_problems,
)
from tests.faults.conftest import write_tiny_config

pytestmark = pytest.mark.fault


@pytest.fixture
def small_tmpfs(tmp_path: Path):
    """A 64 MB tmpfs of its own; needs root (or the right to mount), else the test is skipped."""
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a real full disk needs root to mount a small tmpfs (the fault points cover ENOSPC without it)")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount_point)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({made.stderr.decode().strip()}): the fault points cover ENOSPC")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(folder: Path, leave_bytes: int) -> Path:
    """Fill ``folder``'s filesystem up to ``leave_bytes`` of free space."""
    filler = folder / "filler"
    free = shutil.disk_usage(folder).free
    with open(filler, "wb") as handle:
        handle.truncate(0)
        chunk = b"\0" * (1 << 20)
        remaining = max(free - leave_bytes, 0)
        while remaining > 0:
            handle.write(chunk[: min(len(chunk), remaining)])
            remaining -= min(len(chunk), remaining)
    return filler


def test_a_full_disk_stops_with_one_line_and_loses_nothing(small_tmpfs: Path, tmp_path: Path):
    config = write_tiny_config(tmp_path / "config")
    reference = Chaos(config, tmp_path / "reference-runs", steps=12, log=lambda line: None).reference()
    chaos = Chaos(config, small_tmpfs, steps=12, log=lambda line: None)
    root = small_tmpfs / "run"
    first = chaos.fit(root, "train.step@{mid}:kill")  # checkpoints at step 4, killed at 7
    assert first.returncode == -9
    run = root / RUN_NAME
    saved = {p.name: p.read_bytes() for p in (run / "checkpoints").glob("*.ckpt")}
    filler = fill(small_tmpfs, leave_bytes=64 * 1024)  # less than one checkpoint

    full = chaos.fit(root, resume=True)
    assert exit_problems("run on a full disk", full, 2) == []
    error = next(line for line in full.stderr.splitlines() if line.startswith("error:"))
    assert "disk full" in error, error
    assert saved_problems(run) == []
    for name, data in saved.items():  # the complete checkpoints written before are untouched
        assert (run / "checkpoints" / name).read_bytes() == data
    assert temporaries(root) == []

    filler.unlink()
    again = chaos.fit(root, resume=True)
    assert exit_problems("resumed run", again, 0) == []
    assert weight_problems(reference, final_weights(run)) == []


def test_checkpoints_stay_whole_with_tmpdir_on_another_filesystem(tmp_path: Path):
    """Lightning writes its checkpoints through $TMPDIR and moves them; across filesystems that is
    a copy, which a kill cuts short. lmexp writes beside the target, so a kill there loses nothing."""
    other = Path("/dev/shm")
    if not other.is_dir() or os.stat(other).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second filesystem (/dev/shm) beside the test folder")
    config = write_tiny_config(tmp_path / "config")
    chaos = Chaos(config, tmp_path / "runs", steps=12, log=lambda line: None)
    reference = chaos.reference()
    tmpdir = other / f"lmexp-test-{uuid.uuid4().hex}"
    tmpdir.mkdir()
    try:
        root = tmp_path / "runs" / "cross-fs"
        env_tmp = {"TMPDIR": str(tmpdir)}
        first = chaos.fit(root, "checkpoint.write@2:kill", env=env_tmp)
        assert first.returncode == -9
        run = root / RUN_NAME
        assert saved_problems(run) == []
        again = chaos.fit(root, resume=True, env=env_tmp)
        assert exit_problems("resumed run", again, 0) == []
        assert weight_problems(reference, final_weights(run)) == [] and temporaries(root) == []
        assert list(tmpdir.iterdir()) == []  # nothing written to (and left in) the other filesystem
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


@pytest.mark.distributed
def test_sigterm_under_two_ddp_processes_stops_both_and_resumes_exactly(tmp_path: Path):
    config = write_tiny_config(tmp_path / "config")
    ddp = ["--trainer.devices=2", "--trainer.strategy=ddp"]
    chaos = Chaos(config, tmp_path / "runs", steps=12, extra=ddp, log=lambda line: None)
    reference = chaos.reference()
    root = tmp_path / "runs" / "sigterm"
    stopped = chaos.fit(root, "train.step@{mid}:term")  # every rank is signalled, as a scheduler does
    assert exit_problems("stopped run", stopped, 143) == []
    run = root / RUN_NAME
    assert (run / "checkpoints" / "interrupted.ckpt").is_file() and saved_problems(run) == []
    again = chaos.fit(root, resume=True)
    assert exit_problems("resumed run", again, 0) == []
    assert weight_problems(reference, final_weights(run)) == []
