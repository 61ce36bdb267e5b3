"""Resumed runs end with the same weights as uninterrupted ones: mid-epoch, at an epoch's end,
on a validation step, and after a crash inside a gradient-accumulation window."""

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lmexp import CausalLM, TextDataModule
from lmexp.callbacks import CheckpointOnException, LmexpCheckpoint
from lmexp.objectives import ExactResume
from tests.helpers import FailAtBatch, FailAtEpochStart


def train(
    corpus: Path, root: Path, max_steps: int, *, every: int = 6, accumulate: int = 1,
    ckpt_path: str | None = None, extra_callbacks: list | None = None, batches_per_epoch: int | None = None,
    schedule_steps: int | None = None,
) -> tuple[CausalLM, pl.Trainer]:
    pl.seed_everything(7)
    data = TextDataModule(str(corpus), batch_size=4)
    # Dropout on, so the tests also prove the random state is restored.
    objective = CausalLM(
        "gpt-tiny", network_overrides={"dropout": 0.1}, warmup_steps=3, max_steps=schedule_steps or max_steps
    )
    checkpoints = LmexpCheckpoint(
        dirpath=str(root), monitor=None, filename="step{step}", every_n_train_steps=every, save_top_k=-1,
        save_last=False, export_best=False,
    )
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, val_check_interval=4, limit_val_batches=2,
        accumulate_grad_batches=accumulate, limit_train_batches=batches_per_epoch, logger=False, enable_progress_bar=False, enable_model_summary=False,
        deterministic=True, callbacks=[checkpoints, CheckpointOnException(str(root)), *(extra_callbacks or [])],
        default_root_dir=str(root),
    )
    trainer.fit(objective, datamodule=data, ckpt_path=ckpt_path)
    return objective, trainer


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    """The same weight names (in any order) and bitwise equal tensors: a weight that one model
    lacks fails here rather than being skipped."""
    expected, actual = a.state_dict(), b.state_dict()
    missing, extra = sorted(expected.keys() - actual.keys()), sorted(actual.keys() - expected.keys())
    assert not missing and not extra, f"weights differ in names after resuming: missing {missing}, extra {extra}"
    for name, x in expected.items():
        torch.testing.assert_close(
            actual[name], x, rtol=0, atol=0, msg=lambda m, name=name: f"{name} differs after resuming: {m}"
        )


def test_assert_same_weights_notices_names_and_values():
    """Guards the helper the tests here rely on."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2))
    same = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2))
    same.load_state_dict(model.state_dict())
    assert_same_weights(model, same)
    shorter = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2, bias=False))
    shorter.load_state_dict(model.state_dict(), strict=False)
    with pytest.raises(AssertionError, match=r"missing \['1.bias'\], extra \[\]"):
        assert_same_weights(model, shorter)
    with pytest.raises(AssertionError, match=r"missing \[\], extra \['1.bias'\]"):
        assert_same_weights(shorter, model)
    with torch.no_grad():
        same[0].weight[0, 0] += 1e-7
    with pytest.raises(AssertionError, match="0.weight differs after resuming"):
        assert_same_weights(model, same)


def test_resume_mid_epoch_equals_uninterrupted_run(tiny_corpus: Path, tmp_path: Path):
    straight, trainer = train(tiny_corpus, tmp_path / "a", 12)
    assert trainer.num_training_batches > 12  # the checkpoint at step 6 is mid-epoch
    checkpoint = tmp_path / "a" / "step6.ckpt"
    assert torch.load(checkpoint, weights_only=True)["TextDataModule"] == {"epoch": 0, "batches_done": 6}
    resumed, trainer = train(tiny_corpus, tmp_path / "b", 12, ckpt_path=str(checkpoint))
    assert trainer.global_step == 12
    assert_same_weights(straight, resumed)


def test_resume_without_rng_restore_would_differ(tiny_corpus: Path, tmp_path: Path, monkeypatch):
    """Guards the tests here: with dropout, skipping the RNG restore changes the result."""
    straight, _ = train(tiny_corpus, tmp_path / "a", 12)
    monkeypatch.setattr(ExactResume, "on_train_batch_start", lambda self, trainer, module, batch, idx: None)
    resumed, _ = train(tiny_corpus, tmp_path / "b", 12, ckpt_path=str(tmp_path / "a" / "step6.ckpt"))
    expected, actual = straight.state_dict(), resumed.state_dict()
    assert expected.keys() == actual.keys()
    assert any(not torch.equal(x, actual[name]) for name, x in expected.items())


def test_resume_on_a_validation_step(tiny_corpus: Path, tmp_path: Path):
    straight, _ = train(tiny_corpus, tmp_path / "a", 12, every=4)  # validation also runs every 4 batches
    resumed, _ = train(tiny_corpus, tmp_path / "b", 12, every=4, ckpt_path=str(tmp_path / "a" / "step8.ckpt"))
    assert_same_weights(straight, resumed)


def test_resume_from_the_end_of_an_epoch(tiny_corpus: Path, tmp_path: Path):
    _, probe = train(tiny_corpus, tmp_path / "probe", 4)
    per_epoch = probe.num_training_batches
    steps = per_epoch + 3
    straight, straight_trainer = train(tiny_corpus, tmp_path / "a", steps, every=per_epoch)
    assert torch.load(tmp_path / "a" / f"step{per_epoch}.ckpt", weights_only=True)["epoch"] == 0
    resumed, trainer = train(tiny_corpus, tmp_path / "b", steps, every=per_epoch, ckpt_path=str(tmp_path / "a" / f"step{per_epoch}.ckpt"))
    assert trainer.current_epoch == straight_trainer.current_epoch and trainer.global_step == steps
    assert_same_weights(straight, resumed)


@pytest.mark.parametrize(
    ("batch", "where", "steps_kept"),
    [
        (4, "after_batch", 2),  # first batch of a window: its gradients never reached the optimizer
        (5, "before_backward", 2),  # mid-batch, after dropout drew random numbers
        (5, "after_batch", 3),  # the window's last batch: its step happened and is kept
        (5, "batch_start", 2),  # fetched but not run, crashing before the module's own hooks
        (4, "batch_start", 2),  # the same at a window's first batch
    ],
)
def test_crash_loses_nothing_with_gradient_accumulation(tiny_corpus: Path, tmp_path: Path, batch, where, steps_kept):
    straight, _ = train(tiny_corpus, tmp_path / "a", 6, accumulate=2, every=100)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tiny_corpus, tmp_path / "b", 6, accumulate=2, every=100, extra_callbacks=[FailAtBatch(batch, where)])
    interrupted = torch.load(tmp_path / "b" / "interrupted.ckpt", weights_only=True)
    assert interrupted["global_step"] == steps_kept
    assert interrupted["TextDataModule"]["batches_done"] == 2 * steps_kept  # back to the last optimizer step
    resumed, _ = train(tiny_corpus, tmp_path / "c", 6, accumulate=2, every=100, ckpt_path=str(tmp_path / "b" / "interrupted.ckpt"))
    assert_same_weights(straight, resumed)


def test_crash_as_an_epoch_starts_loses_nothing(tiny_corpus: Path, tmp_path: Path):
    options = {"accumulate": 2, "every": 100, "batches_per_epoch": 7}
    straight, _ = train(tiny_corpus, tmp_path / "a", 12, **options)
    with pytest.raises(RuntimeError, match="start of epoch 1"):
        train(tiny_corpus, tmp_path / "b", 12, extra_callbacks=[FailAtEpochStart(1)], **options)
    interrupted = torch.load(tmp_path / "b" / "interrupted.ckpt", weights_only=True)
    assert interrupted["TextDataModule"] == {"epoch": 1, "batches_done": 0}
    resumed, _ = train(tiny_corpus, tmp_path / "c", 12, ckpt_path=str(tmp_path / "b" / "interrupted.ckpt"), **options)
    assert_same_weights(straight, resumed)


def test_checkpoint_saved_after_a_finished_epoch_resumes_the_next_from_its_start(tiny_corpus: Path, tmp_path: Path):
    options = {"accumulate": 2, "every": 100, "batches_per_epoch": 7}
    straight, _ = train(tiny_corpus, tmp_path / "a", 12, **options)
    _, first_epoch = train(tiny_corpus, tmp_path / "b", 4, schedule_steps=12, **options)  # one epoch: 4 steps
    assert first_epoch.current_epoch == 1
    first_epoch.save_checkpoint(tmp_path / "b" / "after_epoch.ckpt")
    assert torch.load(tmp_path / "b" / "after_epoch.ckpt", weights_only=True)["TextDataModule"]["batches_done"] == 0
    resumed, _ = train(tiny_corpus, tmp_path / "c", 12, ckpt_path=str(tmp_path / "b" / "after_epoch.ckpt"), **options)
    assert_same_weights(straight, resumed)
