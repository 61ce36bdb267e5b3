"""Every kind of file lmexp reads, cut short or garbled: one ``error:`` line and exit status 2, never
a traceback. (The token cache, which rebuilds itself instead, is tested in tests/data.)"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from lmexp.cli import main

pytestmark = pytest.mark.fault
GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "v0.1.0"


def cut(path: Path, keep: float = 0.5) -> None:
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])


def garble(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for i in range(0, len(data), 7):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))


def one_error_line(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert stop.value.code == 2, err
    assert "Traceback" not in err and len(errors) == 1, err
    return errors[0]


@pytest.fixture
def trained(tmp_path: Path) -> Path:
    """A copy of a golden run's files: last.ckpt, export/, tracking-journal.jsonl, corpus.txt."""
    folder = tmp_path / "golden"
    shutil.copytree(GOLDEN, folder)
    return folder


CHECKPOINT_DAMAGE: dict[str, Callable[[Path], None]] = {
    "cut": cut, "garbled": garble, "empty": lambda p: p.write_bytes(b""), "text": lambda p: p.write_text("hello"),
}


@pytest.mark.parametrize("damage", CHECKPOINT_DAMAGE, ids=list(CHECKPOINT_DAMAGE))
def test_damaged_checkpoint(trained: Path, capsys, damage: str):
    CHECKPOINT_DAMAGE[damage](trained / "last.ckpt")
    line = one_error_line(capsys, ["generate", "--ckpt", str(trained / "last.ckpt"), "--max_new_tokens", "3"])
    assert "last.ckpt" in line


@pytest.mark.parametrize("file", ["model.safetensors", "config.json", "tokenizer.json"])
@pytest.mark.parametrize("damage", ["cut", "garbled"])
def test_damaged_export(trained: Path, capsys, file: str, damage: str):
    (cut if damage == "cut" else garble)(trained / "export" / file)
    line = one_error_line(capsys, ["generate", "--ckpt", str(trained / "export"), "--max_new_tokens", "3"])
    assert file in line or "export" in line


def test_damaged_config_file(tmp_path: Path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer: [max_steps: 3\nmodel: {")
    one_error_line(capsys, ["fit", "--config", str(bad)])


def test_journal_garbled_in_the_middle(trained: Path, capsys):
    journal = trained / "tracking-journal.jsonl"
    lines = journal.read_text().splitlines()
    lines[3] = lines[3][: len(lines[3]) // 2]
    journal.write_text("\n".join(lines) + "\n")
    line = one_error_line(capsys, ["runs", "sync", str(journal)])
    assert "tracking-journal.jsonl" in line


@pytest.mark.parametrize("damage", ["garbled", "text"])
def test_damaged_tracking_store(tmp_path: Path, capsys, damage: str):
    store = tmp_path / "mlflow.db"
    store.write_bytes(b"SQLite format 3\0" + bytes(range(256)) * 8 if damage == "garbled" else b"not a database")
    line = one_error_line(capsys, ["runs", "--tracking_uri", f"sqlite:///{store}"])
    assert "mlflow.db" in line


def test_damaged_sweep_file(tmp_path: Path, capsys):
    from sweeps.__main__ import main as sweeps_main

    bad = tmp_path / "sweep.yaml"
    bad.write_text(json.dumps({"study": "x", "configs": ["c.yaml"]})[:-5])
    with pytest.raises(SystemExit) as stop:
        sweeps_main(["run", "--config", str(bad)])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1, err
