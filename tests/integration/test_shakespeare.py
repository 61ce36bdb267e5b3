"""Tiny Shakespeare with the shipped character recipe, configs/shakespeare_char.yaml (nanoGPT's
CPU model and batch, lmexp's schedule): a validation-loss gate."""

from pathlib import Path

import pytest
import torch

from lmexp.cli import main
from tests.conftest import shared_data

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(1800)  # 800 steps: about a minute on 2 idle cores, twenty on a heavily loaded machine
def test_character_recipe_reaches_val_loss_1_90(tmp_path: Path):
    """The shipped recipe, run as shipped (800 steps, early stopping), reaches validation loss
    1.90 or lower on lmexp's validation split. BENCHMARKS.md measures 1.8665 for this recipe on
    40 batches of that split (Sweeps: pruning, "shipped recipe"); the gate leaves room for
    run-to-run noise. Not a comparison with nanoGPT, whose figures are on its own split and schedule."""
    source = shared_data("tinyshakespeare.txt")
    main([
        "fit", "--config", str(ROOT / "configs" / "shakespeare_char.yaml"), f"--data.source={source}",
        f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false",
    ])
    best = torch.load(tmp_path / "latest" / "checkpoints" / "best.ckpt", weights_only=True)
    scores = next(v for k, v in best["callbacks"].items() if k.startswith("LmexpCheckpoint"))
    assert scores["monitor"] == "val/loss"
    assert scores["best_model_score"].item() <= 1.90
