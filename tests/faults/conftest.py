"""The fault-injection suite's shared pieces: a tiny fit config and one ``Chaos`` per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lmexp.verbs.chaos import Chaos
from tests.conftest import make_corpus


def write_tiny_config(folder: Path, **trainer: object) -> Path:
    """A fit config of a tiny character-level GPT on a generated corpus (seconds per run)."""
    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "corpus.txt"
    corpus.write_text(make_corpus())
    config = folder / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "seed_everything": 3,
        "trainer": {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False, "enable_model_summary": False,
                    "gradient_clip_val": 1.0, **trainer},
        "model": {"class_path": "lmexp.CausalLM", "init_args": {"network": "gpt-tiny", "warmup_steps": 0}},
        "data": {"class_path": "lmexp.TextDataModule",
                 "init_args": {"source": str(corpus), "tokenizer": "char", "batch_size": 2}},
    }))
    return config


@pytest.fixture(scope="session")
def chaos(tmp_path_factory: pytest.TempPathFactory) -> Chaos:
    """Scenarios of the tiny config; the uninterrupted reference run is made once."""
    root = tmp_path_factory.mktemp("chaos")
    return Chaos(write_tiny_config(root / "config"), root / "runs", steps=12, log=lambda line: None)
