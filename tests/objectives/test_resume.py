"""A run resumed from a mid-epoch checkpoint ends with the same weights as an uninterrupted one."""

from pathlib import Path

import lightning.pytorch as pl
import torch

from lmexp import CausalLM, TextDataModule
from lmexp.callbacks import LmexpCheckpoint


def train(tiny_corpus: Path, root: Path, max_steps: int, ckpt_path: str | None = None) -> tuple[CausalLM, pl.Trainer]:
    pl.seed_everything(7)
    data = TextDataModule(str(tiny_corpus), batch_size=4)
    # Dropout on, so the test also proves the random state is restored.
    objective = CausalLM("gpt-tiny", network_overrides={"dropout": 0.1}, warmup_steps=3, max_steps=12)
    checkpoints = LmexpCheckpoint(
        dirpath=str(root), monitor=None, filename="step{step}", every_n_train_steps=6, save_top_k=-1,
        save_last=False, export_best=False,
    )
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, val_check_interval=4, limit_val_batches=2,
        logger=False, enable_progress_bar=False, enable_model_summary=False, deterministic=True,
        callbacks=[checkpoints], default_root_dir=str(root),
    )
    trainer.fit(objective, datamodule=data, ckpt_path=ckpt_path)
    return objective, trainer


def test_resume_mid_epoch_equals_uninterrupted_run(tiny_corpus: Path, tmp_path: Path):
    straight, trainer = train(tiny_corpus, tmp_path / "a", 12)
    assert trainer.num_training_batches > 12  # the checkpoint at step 6 is mid-epoch
    checkpoint = tmp_path / "a" / "step6.ckpt"
    assert torch.load(checkpoint, weights_only=True)["TextDataModule"] == {"epoch": 0, "batches_done": 6}

    resumed, trainer = train(tiny_corpus, tmp_path / "b", 12, ckpt_path=str(checkpoint))
    assert trainer.global_step == 12
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=f"{name} differs after resuming")


def test_resume_without_rng_restore_would_differ(tiny_corpus: Path, tmp_path: Path, monkeypatch):
    """Guards the test above: with dropout, skipping the RNG restore changes the result."""
    straight, _ = train(tiny_corpus, tmp_path / "a", 12)
    monkeypatch.setattr(CausalLM, "on_train_batch_start", lambda self, batch, idx: None)
    resumed, _ = train(tiny_corpus, tmp_path / "b", 12, ckpt_path=str(tmp_path / "a" / "step6.ckpt"))
    differs = any(not torch.equal(a, b) for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()))
    assert differs
