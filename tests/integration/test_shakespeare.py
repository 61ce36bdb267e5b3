"""Tiny Shakespeare with the shipped character recipe (nanoGPT's CPU settings): quality gates."""

from pathlib import Path

import pytest
import torch

from lmexp.cli import main
from tests.conftest import shared_data

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_character_recipe_reaches_nanogpt_quality(tmp_path: Path):
    source = shared_data("tinyshakespeare.txt")
    main([
        "fit", "--config", str(ROOT / "configs" / "shakespeare_char.yaml"), f"--data.source={source}",
        f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false",
    ])
    best = torch.load(tmp_path / "latest" / "checkpoints" / "best.ckpt", weights_only=True)
    scores = [v for k, v in best["callbacks"].items() if k.startswith("LmexpCheckpoint")][0]
    assert scores["best_model_score"].item() <= 1.90  # nanoGPT reports ~1.88 for this recipe
