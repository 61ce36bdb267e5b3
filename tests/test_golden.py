"""Files written by earlier versions still load: each golden set in tests/golden (a checkpoint, an
export and a tracking journal, never rewritten) is read, resumed and synced with today's code."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml

from lmexp.checkpoints import load_checkpoint, read_checkpoint
from lmexp.cli import main
from lmexp.mlflow_store import read_journal, sync_journal
from tests.golden.make_golden import golden_config

GOLDEN = Path(__file__).resolve().parent / "golden"
SETS = sorted(p for p in GOLDEN.iterdir() if p.is_dir() and not p.name.startswith("_"))


@pytest.mark.parametrize("golden", SETS, ids=[p.name for p in SETS])
def test_checkpoint_and_export_load_to_the_same_network(golden: Path):
    from_checkpoint, from_export = load_checkpoint(golden / "last.ckpt"), load_checkpoint(golden / "export")
    ids = torch.tensor([[1, 2, 3, 4]])
    torch.testing.assert_close(from_checkpoint.model(ids), from_export.model(ids), rtol=0, atol=0)
    assert from_export.tokenizer.get_vocab_size() == from_checkpoint.config.vocab_size


@pytest.mark.parametrize("golden", SETS, ids=[p.name for p in SETS])
def test_checkpoint_resumes(golden: Path, tmp_path: Path):
    shutil.copy(golden / "corpus.txt", tmp_path / "corpus.txt")
    config = golden_config(tmp_path)
    config["trainer"]["max_steps"] = 6
    config["trainer"]["logger"] = False
    (tmp_path / "golden.yaml").write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(tmp_path / "golden.yaml"), "--ckpt_path", str(golden / "last.ckpt")])
    resumed = next((tmp_path / "runs").glob("*/checkpoints/last.ckpt"))
    assert read_checkpoint(resumed)["global_step"] == 6


@pytest.mark.parametrize("golden", SETS, ids=[p.name for p in SETS])
def test_journal_syncs_into_a_store(golden: Path, tmp_path: Path, tracking_store: str):
    from mlflow import MlflowClient

    journal = tmp_path / "tracking-journal.jsonl"
    shutil.copy(golden / "tracking-journal.jsonl", journal)
    header, records = read_journal(journal)
    store = tracking_store
    header["tracking_uri"] = store  # the store it was kept for is gone; send it to this one
    journal.write_text("".join(__import__("json").dumps(r) + "\n" for r in [header, *records]))
    run_id = sync_journal(journal)
    run = MlflowClient(store).get_run(run_id)
    sent = [r for r in records if r["kind"] == "metrics"]
    assert run.data.metrics["val/loss"] == sent[-1]["values"]["val/loss"]
    assert run.info.status == "FINISHED" and not journal.exists()
