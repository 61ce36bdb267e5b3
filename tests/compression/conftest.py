"""A tiny trained GPT for the compression tests: its run folder holds the config.yaml that the
commands read their data from."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmexp.runs import build
from tests.conftest import make_corpus


def train_tiny_gpt(folder: Path, paragraphs: int, *args: str) -> Path:
    """Train a gpt-tiny on a generated corpus in `folder` (its own token cache); the best checkpoint."""
    corpus = folder / "corpus.txt"
    corpus.write_text(make_corpus(paragraphs))
    with pytest.MonkeyPatch.context() as env:
        env.setenv("LMEXP_CACHE_DIR", str(folder / "cache"))
        run = build("fit", args=[
            "--model=lmexp.CausalLM", "--model.network=gpt-tiny", "--model.warmup_steps=2",
            "--data=lmexp.TextDataModule", f"--data.source={corpus}", "--data.batch_size=8",
            "--trainer.check_val_every_n_epoch=null", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", f"--trainer.default_root_dir={folder / 'runs'}", *args,
        ], logger=False, run_name="gpt")
        run.execute()
    return run.run_dir / "checkpoints" / "best.ckpt"
