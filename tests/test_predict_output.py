"""``lmexp predict`` without ``--output`` writes into the checkpoint's run folder, else the working
directory, and says where: never beside its input, whose folder may be shared or read-only."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest

from lmexp.cli import main
from lmexp.verbs.predict import default_output
from tests.test_eval_from_run import trained_classifier


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run folder of a tiny trained classifier."""
    return trained_classifier(tmp_path_factory.mktemp("predict")).parent / "runs" / "r"


@pytest.fixture
def table(tmp_path: Path) -> Path:
    """An input table in a folder of its own (a shared data folder), whose contents must not change."""
    (tmp_path / "shared").mkdir()
    path = tmp_path / "shared" / "dev.tsv"
    path.write_text("label\tcontent\n1\tthe film was great\n0\tthe plot was dull\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("export", [False, True], ids=["ckpt", "export-folder"])
def test_predictions_go_into_the_checkpoints_run_folder(run_dir: Path, table: Path, tmp_path: Path, monkeypatch,
                                                        capsys, export: bool):
    monkeypatch.chdir(tmp_path)
    best = run_dir / "checkpoints" / "best.ckpt"
    main(["predict", "--ckpt", str(best.with_suffix("") if export else best), "--input", str(table)])
    written = run_dir / "predictions" / "dev.predictions.csv"
    rows = list(csv.DictReader(written.read_text(encoding="utf-8").splitlines()))
    assert [row["text"] for row in rows] == ["the film was great", "the plot was dull"]
    assert sorted(p.name for p in table.parent.iterdir()) == ["dev.tsv"]  # nothing beside the input
    assert f"wrote 2 predictions to {written}" in capsys.readouterr().out


def test_a_checkpoint_outside_a_run_folder_writes_into_the_working_directory(run_dir: Path, table: Path,
                                                                             tmp_path: Path, monkeypatch, capsys):
    loose = Path(shutil.copy(run_dir / "checkpoints" / "best.ckpt", tmp_path / "model.ckpt"))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    main(["predict", "--ckpt", str(loose), "--input", str(table)])
    assert (work / "dev.predictions.csv").is_file()
    assert "wrote 2 predictions to dev.predictions.csv" in capsys.readouterr().out  # relative to the working dir
    assert sorted(p.name for p in table.parent.iterdir()) == ["dev.tsv"]


def test_an_output_given_is_where_predictions_go(run_dir: Path, table: Path, tmp_path: Path):
    out = tmp_path / "mine" / "p.csv"
    main(["predict", "--ckpt", str(run_dir / "checkpoints" / "best.ckpt"), "--input", str(table), "--output", str(out)])
    assert out.is_file() and not (run_dir / "predictions" / "p.csv").exists()


def test_default_output_follows_the_latest_link_to_the_run(run_dir: Path, tmp_path: Path):
    latest = run_dir.parent / "latest"
    assert default_output(latest / "checkpoints" / "best.ckpt", "x/dev.tsv") == \
        run_dir.resolve() / "predictions" / "dev.predictions.csv"
    assert default_output(tmp_path / "model.ckpt", "x/dev.tsv") == Path.cwd() / "dev.predictions.csv"
