"""Atomic files and folders (lmexp.atomic) and the fault points (lmexp.faults) that test them."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmexp import faults
from lmexp.atomic import TEMPORARY_PREFIX, remove_stale_temporaries, replace_folder, storage_error, write_bytes
from lmexp.errors import StorageError


def test_fault_spec_is_checked_and_counts_hits(fault):
    with pytest.raises(ValueError, match="POINT"):
        fault("no.such.point:kill")
    fault("export.write@2:enospc")
    faults.fault_point("export.write")  # first hit: nothing
    with pytest.raises(OSError) as raised:
        faults.fault_point("export.write", path="x")
    assert raised.value.errno == errno.ENOSPC
    fault("train.loss@3:diverge")
    assert [faults.poisoned("train.loss", step) for step in (2, 3, 4)] == [False, True, True]
    fault("train.loss@3:nan")
    assert [faults.poisoned("train.loss", step) for step in (2, 3, 4)] == [False, True, False]


def test_write_keeps_the_old_file_on_a_full_disk_and_says_so_in_one_line(tmp_path, fault):
    target = tmp_path / "last.ckpt"
    write_bytes(target, b"old" * 100)
    fault("checkpoint.write:enospc")
    with pytest.raises(StorageError) as raised:
        write_bytes(target, b"new" * 1000, fault="checkpoint.write")
    message = str(raised.value)
    assert "disk full" in message and str(target) in message and "3.0 KB" in message and "\n" not in message
    assert target.read_bytes() == b"old" * 100
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left


def test_written_files_take_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        write_bytes(tmp_path / "a", b"x")
        replace_folder(tmp_path / "export", lambda folder: (folder / "model.safetensors").write_bytes(b"y"))
    finally:
        os.umask(previous)
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "export" / "model.safetensors").stat().st_mode & 0o777 == 0o644


def test_a_folder_is_replaced_whole_or_not_at_all(tmp_path):
    export = tmp_path / "best"
    replace_folder(export, lambda folder: (folder / "config.json").write_text("1"))

    def half_then_fail(folder: Path) -> None:
        (folder / "config.json").write_text("")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        replace_folder(export, half_then_fail)
    assert (export / "config.json").read_text() == "1"
    replace_folder(export, lambda folder: (folder / "config.json").write_text("2"))
    assert (export / "config.json").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_killed_writer_leaves_nothing_a_later_write_does_not_tidy(tmp_path):
    pid = dead_pid()
    (tmp_path / f"{TEMPORARY_PREFIX}{pid}-last.ckpt").write_bytes(b"half")
    # A swap killed after the old export was set aside and before the new one moved in:
    aside = tmp_path / f"{TEMPORARY_PREFIX}{pid}-old-best"
    aside.mkdir()
    (aside / "config.json").write_text("old")
    mine = tmp_path / f"{TEMPORARY_PREFIX}{os.getpid()}-live"
    mine.write_text("in progress")
    remove_stale_temporaries(tmp_path)
    assert (tmp_path / "best" / "config.json").read_text() == "old"  # put back, not deleted
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["best", mine.name])


def test_other_write_errors_are_left_as_they_are(tmp_path):
    err = OSError(errno.EIO, "Input/output error")
    assert storage_error(err, tmp_path / "x") is err
    denied = storage_error(OSError(errno.EACCES, "Permission denied"), tmp_path / "x")
    assert isinstance(denied, StorageError) and "choose a writable folder" in str(denied)


def test_a_full_disk_met_by_any_library_is_one_line():
    from lmexp.errors import find_user_error

    wrapped = RuntimeError("while saving")
    wrapped.__cause__ = OSError(errno.ENOSPC, "No space left on device", "/runs/x/samples.txt")
    found = find_user_error(wrapped)
    assert isinstance(found, StorageError) and "disk full while writing '/runs/x/samples.txt'" in str(found)
    assert find_user_error(OSError(errno.EIO, "Input/output error")) is None


def test_a_predictions_table_is_written_whole_or_not_at_all(tmp_path):
    import torch

    from lmexp.data.classification import Examples, write_predictions_csv

    examples = Examples(texts=["good", "bad, really"], pairs=None, labels=None)
    path = write_predictions_csv(tmp_path / "out" / "p.csv", examples, ["neg", "pos"], ["pos", "neg"],
                                 torch.tensor([[0.25, 0.75], [0.9, 0.1]]))
    before = path.read_text(encoding="utf-8")
    assert before.splitlines() == ["text,prediction,p_neg,p_pos", "good,pos,0.250000,0.750000",
                                   '"bad, really",neg,0.900000,0.100000']
    with pytest.raises(IndexError):  # a failure on the second row, after the first is written
        write_predictions_csv(path, examples, ["neg", "pos"], ["neg", "neg"], torch.tensor([[0.5, 0.5]]))
    assert path.read_text(encoding="utf-8") == before
    assert [p.name for p in path.parent.iterdir()] == ["p.csv"]


def test_another_machines_temporary_is_left_alone_until_it_is_old(tmp_path: Path):
    import time

    from lmexp.atomic import FOREIGN_STALE_SECONDS, stale_temporary

    foreign = tmp_path / f"{TEMPORARY_PREFIX}1@ffffffff-00003"  # a pid on a machine that is not this one
    foreign.mkdir()
    (foreign / "train.bin").write_bytes(b"being written")
    assert not stale_temporary(foreign)
    remove_stale_temporaries(tmp_path)
    assert foreign.exists()
    old = time.time() - FOREIGN_STALE_SECONDS - 60
    for path in (foreign / "train.bin", foreign):
        os.utime(path, (old, old))
    assert stale_temporary(foreign)
    remove_stale_temporaries(tmp_path)
    assert not foreign.exists()
