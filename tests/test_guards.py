"""The finite-loss guard: a non-finite step never reaches the weights; stop or skip, one-line reports."""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch

from lmexp import CausalLM, TextDataModule
from lmexp.callbacks import LmexpCheckpoint
from lmexp.cli import main
from lmexp.errors import ConfigError
from lmexp.guards import FiniteLossGuard, TrainingDiverged


class StepSnapshot(pl.Callback):
    """The weights and optimizer state as step ``step`` starts, and as the next one starts."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.before: tuple[dict, dict] | None = None
        self.after: tuple[dict, dict] | None = None

    def _take(self, trainer: pl.Trainer, module: pl.LightningModule) -> tuple[dict, dict]:
        return copy.deepcopy(module.state_dict()), copy.deepcopy(trainer.optimizers[0].state_dict()["state"])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            self.before = self._take(trainer, pl_module)
        elif trainer.global_step == self.step + 1 and self.after is None:
            self.after = self._take(trainer, pl_module)


def fit(
    tiny_corpus: Path, callbacks: list[pl.Callback], steps: int = 4, accumulate: int = 1, **model_args
) -> pl.Trainer:
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=any(isinstance(c, LmexpCheckpoint) for c in callbacks),
        limit_val_batches=0, gradient_clip_val=1.0, accumulate_grad_batches=accumulate, callbacks=callbacks,
    )
    model = CausalLM("gpt-tiny", warmup_steps=0, **model_args)
    trainer.fit(model, datamodule=TextDataModule(str(tiny_corpus), batch_size=2, val_fraction=0))
    return trainer


def assert_same_tensors(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for key, value in before.items():
        if isinstance(value, dict):
            assert_same_tensors(value, after[key])
        elif isinstance(value, torch.Tensor):
            assert torch.equal(value, after[key]), key


@pytest.mark.parametrize("optimizer", ["adamw", "muon", "adamw8bit"])
def test_a_skipped_step_leaves_weights_and_optimizer_state_bit_identical(tiny_corpus, fault, optimizer):
    fault("train.loss@2:nan")
    snapshot = StepSnapshot(2)
    guard = FiniteLossGuard(mode="skip")
    trainer = fit(tiny_corpus, [guard, snapshot], optimizer=optimizer)
    assert trainer.global_step == 4 and guard.skipped == 1
    (weights, state), (weights_after, state_after) = snapshot.before, snapshot.after
    assert state, "the optimizer has state from the good steps before the skipped one"
    assert_same_tensors(weights, weights_after)
    assert_same_tensors(state, state_after)
    assert all(torch.isfinite(p).all() for p in trainer.lightning_module.parameters())


def test_a_poisoned_micro_batch_skips_the_whole_accumulated_step(tiny_corpus, fault):
    fault("train.loss@1:nan")  # both micro-batches of step 1 see global_step 1
    guard = FiniteLossGuard(mode="skip")
    fit(tiny_corpus, [guard], steps=3, accumulate=2)
    assert guard.skipped == 1


def test_stop_raises_one_line_naming_step_learning_rate_and_last_checkpoint(tiny_corpus, fault, tmp_path):
    fault("train.loss@2:nan")
    with pytest.raises(TrainingDiverged) as stopped:
        fit(tiny_corpus, [FiniteLossGuard()], lr=3e-3, max_steps=1000)  # lr barely decayed
    message = str(stopped.value)
    assert "\n" not in message and "at step 2" in message and "learning rate 0.003" in message
    assert "last good checkpoint: none yet" in message

    fault("train.loss@3:nan")
    checkpoint = LmexpCheckpoint(str(tmp_path / "ckpt"), monitor=None, every_n_train_steps=1, export_best=False)
    with pytest.raises(TrainingDiverged, match=r"at step 3: .*last good checkpoint: \S*last\.ckpt"):
        fit(tiny_corpus, [FiniteLossGuard(), checkpoint])
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 3


class FakeStrategy:
    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        return decision


def test_skips_in_a_row_are_counted_and_a_good_step_resets_them():
    layer = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    trainer = SimpleNamespace(precision_plugin=None, strategy=FakeStrategy(), global_step=0, checkpoint_callback=None)
    guard = FiniteLossGuard(mode="skip", max_skips=3)

    def step(good: bool) -> None:
        for param in layer.parameters():
            param.grad = torch.ones_like(param) * (1.0 if good else float("nan"))
        guard.on_before_backward(trainer, None, torch.tensor(1.0))
        guard.on_before_optimizer_step(trainer, None, optimizer)
        assert all((p.grad is not None) == good for p in layer.parameters())  # a bad step's gradients are gone
        trainer.global_step += 1

    for good in (False, False, True, False, False, True, False, False):
        step(good)
    assert guard.skipped == 6 and guard.in_a_row == 2
    with pytest.raises(TrainingDiverged, match=r"at step 8: 3 non-finite steps in a row \(guard.max_skips=3\)"):
        step(False)

    guard.in_a_row = 0  # a non-finite loss with finite gradients counts too
    layer.weight.grad = torch.ones_like(layer.weight)
    guard.on_before_backward(trainer, None, torch.tensor(float("inf")))
    guard.on_before_optimizer_step(trainer, None, optimizer)
    assert guard.in_a_row == 1 and layer.weight.grad is None


def test_a_grad_scaler_s_own_inf_steps_are_not_counted():
    layer = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    scaled = SimpleNamespace(scaler=object())
    trainer = SimpleNamespace(precision_plugin=scaled, strategy=FakeStrategy(), global_step=5, checkpoint_callback=None)
    guard = FiniteLossGuard()
    layer.weight.grad = torch.full_like(layer.weight, float("inf"))  # the scaler skips this step itself
    guard.on_before_backward(trainer, None, torch.tensor(2.0))
    guard.on_before_optimizer_step(trainer, None, optimizer)
    assert layer.weight.grad is not None  # left to the scaler
    guard.on_before_backward(trainer, None, torch.tensor(float("nan")))
    with pytest.raises(TrainingDiverged, match="at step 5"):
        guard.on_before_optimizer_step(trainer, None, optimizer)


def test_no_checkpoint_is_saved_from_non_finite_weights(tmp_path):
    module = pl.LightningModule()
    module.layer = torch.nn.Linear(2, 2)
    trainer = SimpleNamespace(strategy=FakeStrategy(), global_step=7, checkpoint_callback=None)
    FiniteLossGuard().on_save_checkpoint(trainer, module, {})  # finite: saved
    with torch.no_grad():
        module.layer.bias[0] = float("nan")
    with pytest.raises(TrainingDiverged, match=r"by step 7: the weights hold NaN/inf \(layer.bias\)"):
        FiniteLossGuard().on_save_checkpoint(trainer, module, {})


@pytest.mark.parametrize(("mode", "max_skips"), [("ignore", 10), ("skip", 0)])
def test_bad_guard_settings_are_one_line_errors(mode, max_skips):
    with pytest.raises(ConfigError, match="guard"):
        FiniteLossGuard(mode=mode, max_skips=max_skips)


def test_generate_refuses_a_checkpoint_with_non_finite_weights_in_one_line(tmp_path, capsys):
    from tests.test_generation import tiny_export

    export = tiny_export(tmp_path / "export")
    from safetensors.torch import load_file, save_file

    weights = load_file(export / "model.safetensors")
    name = next(key for key in weights if key.endswith("weight"))
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, export / "model.safetensors")
    with pytest.raises(SystemExit) as exited:
        main(["generate", "--ckpt", str(export), "--prompt", "abc", "--max_new_tokens", "3"])
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(export) in err
    assert "holds non-finite weights (NaN/inf), trained past a divergence: use an earlier checkpoint" in err
