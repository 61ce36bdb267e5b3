from pathlib import Path

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from lmexp.checkpoints import load_checkpoint
from lmexp.cli import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_compiled_training_compiles_and_writes_plain_checkpoints(tiny_corpus: Path, tmp_path: Path):
    """--model.compile=true trains through graphs dynamo captured, and the checkpoint still loads
    into an uncompiled model."""
    torch._dynamo.reset()  # graphs of earlier tests in this process must not count
    counters.clear()
    main([
        "fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), f"--data.source={tiny_corpus}",
        "--model.network=gpt-tiny", "--model.network_overrides=null", "--model.compile=true",
        "--trainer.max_steps=6", "--trainer.val_check_interval=3", "--trainer.limit_val_batches=2",
        "--model.warmup_steps=1", f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false",
    ])
    # lmexp itself compiles nothing but the network, so every captured graph is the network's.
    assert counters["stats"]["unique_graphs"] >= 1, dict(counters["stats"])
    state = torch.load(tmp_path / "latest" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert not any("_orig_mod" in key for key in state)  # loadable into an uncompiled model
    assert load_checkpoint(tmp_path / "latest" / "checkpoints" / "last.ckpt").model(torch.tensor([[1, 2, 3]])).shape[-1] > 10
