import math
import re
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lmexp import CausalLM, MaskedLM, TextDataModule
from lmexp.data.masking import MLMBatchTransform
from lmexp.errors import ConfigError
from lmexp.objectives import warmup_cosine


def test_schedule_values_at_warmup_end_and_end():
    assert warmup_cosine(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100, 0.1) == pytest.approx(1.0)  # last warmup step reaches the peak
    assert warmup_cosine(10, 10, 100, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(55, 10, 100, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)  # half way down the cosine
    assert warmup_cosine(100, 10, 100, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(500, 10, 100, 0.1) == pytest.approx(0.1)  # stays at the floor


def test_weight_decay_spares_biases_norms_and_embeddings():
    objective = CausalLM("gpt-tiny", network_overrides={"vocab_size": 50})
    decay, no_decay = objective.parameter_groups()
    names = {id(p): n for n, p in objective.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    spared = {names[id(p)] for p in no_decay["params"]}
    assert decayed and all(n.endswith("weight") and "ln" not in n and "emb" not in n for n in decayed)
    assert any("tok_emb" in n for n in spared) and any(n.endswith("bias") for n in spared)
    assert len(decayed) + len(spared) == len(list(objective.parameters()))  # tied weight counted once


def overfit(objective, batch, steps: int, lr: float) -> float:
    optimizer = torch.optim.AdamW(objective.parameters(), lr=lr, weight_decay=0.0)
    objective.train()
    for _ in range(steps):
        loss, *_ = objective.lm_loss(batch, "train")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return loss.item()


def test_tiny_gpt_overfits_one_batch():
    torch.manual_seed(0)
    objective = CausalLM("gpt-tiny", network_overrides={"vocab_size": 40})
    tokens = torch.randint(0, 40, (4, 33))
    batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}
    first, *_ = objective.lm_loss(batch, "train")
    assert first.item() == pytest.approx(math.log(40), rel=0.1)
    assert overfit(objective, batch, 150, 3e-3) < 0.05


def test_tiny_bert_overfits_one_masked_batch():
    torch.manual_seed(0)
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4, **{f"t{i}": i for i in range(5, 40)}}
    objective = MaskedLM("bert-tiny", network_overrides={"vocab_size": 40})
    windows = torch.randint(5, 40, (4, 29))  # + [CLS] [SEP] [SEP] = block_size 32
    batch = MLMBatchTransform(vocab, mlm_probability=0.3, sentence_order=True)(windows, 0, 0)
    loss = overfit(objective, batch, 200, 3e-3)
    assert loss < 0.05  # MLM loss plus SOP loss


def test_objectives_refuse_the_wrong_architecture():
    with pytest.raises(ConfigError, match="CausalLM needs a causal network .* is a bert: .* MaskedLM for bert"):
        CausalLM("bert-tiny")
    with pytest.raises(ConfigError, match="MaskedLM needs a bert network"):
        MaskedLM("gpt-tiny")


def test_network_overrides_reject_unknown_fields():
    with pytest.raises(ConfigError, match=r"unknown model config field\(s\) n_layers: valid fields are arch, n_layer"):
        CausalLM("gpt-tiny", network_overrides={"n_layers": 3})


@pytest.mark.parametrize(("objective_cls", "network", "tokenizer"), [(CausalLM, "gpt-tiny", "char"), (MaskedLM, "bert-tiny", "wordpiece")])
def test_a_few_dozen_steps_lower_val_loss(tiny_corpus: Path, cpu_trainer_kwargs: dict, objective_cls, network, tokenizer):
    pl.seed_everything(0)
    data = TextDataModule(str(tiny_corpus), tokenizer=tokenizer, vocab_size=120, batch_size=8)
    objective = objective_cls(network, lr=3e-3, warmup_steps=5)
    trainer = pl.Trainer(
        max_steps=40, limit_val_batches=4, val_check_interval=40, check_val_every_n_epoch=None, **cpu_trainer_kwargs
    )
    before = trainer.validate(objective, datamodule=data, verbose=False)[0]["val/loss"]
    trainer.fit(objective, datamodule=data)
    after = trainer.callback_metrics["val/loss"].item()
    assert after < before - 0.5
    assert trainer.callback_metrics["val/ppl"].item() == pytest.approx(math.exp(after), rel=1e-4)
    if objective_cls is MaskedLM:
        assert 0.0 < trainer.callback_metrics["val/acc"].item() <= 1.0
        assert "val/bpb" not in trainer.callback_metrics  # only masked tokens are predicted
    else:
        bpb = after / math.log(2) / data.bytes_per_token("val")
        assert trainer.callback_metrics["val/bpb"].item() == pytest.approx(bpb, rel=1e-4)
        assert 0.0 < trainer.callback_metrics["val/acc"].item() <= 1.0


def test_bf16_on_a_cpu_without_bf16_units_warns_with_the_fix(tiny_corpus: Path, cpu_trainer_kwargs: dict, monkeypatch):
    monkeypatch.setattr("lmexp.objectives.base.cpu_has_bf16_units", lambda: False)
    data = TextDataModule(str(tiny_corpus), batch_size=2)
    trainer = pl.Trainer(max_steps=1, limit_val_batches=0, precision="bf16-mixed", **cpu_trainer_kwargs)
    with pytest.warns(UserWarning, match=r"without bf16 units .* use --trainer.precision 32-true"):
        trainer.fit(CausalLM("gpt-tiny", warmup_steps=0), datamodule=data)


class GradNormRecorder(pl.Callback):
    """Record the total gradient norm each optimizer step used (after clipping)."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_train_start(self, trainer, pl_module) -> None:
        def record(optimizer, args, kwargs):
            grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            self.norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())

        # Lightning runs forward and backward inside step(closure): read the gradients after it.
        trainer.optimizers[0].register_step_post_hook(record)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_gradient_clipping_keeps_the_fused_optimizer(tiny_corpus: Path, cpu_trainer_kwargs: dict, precision: str):
    data = TextDataModule(str(tiny_corpus), batch_size=2)
    recorder = GradNormRecorder()
    trainer = pl.Trainer(
        max_steps=3, limit_val_batches=0, precision=precision, gradient_clip_val=1e-3,
        callbacks=[recorder], **cpu_trainer_kwargs,
    )
    objective = CausalLM("gpt-tiny", warmup_steps=0)
    trainer.fit(objective, datamodule=data)
    assert trainer.optimizers[0].defaults["fused"] is True
    assert len(recorder.norms) == 3 and all(norm <= 1e-3 * 1.01 for norm in recorder.norms)


def test_masked_lm_batch_without_selected_tokens_has_zero_loss_not_nan():
    objective = MaskedLM("bert-tiny", network_overrides={"vocab_size": 40})
    batch = {"input_ids": torch.randint(5, 40, (2, 8)), "labels": torch.full((2, 8), -100)}
    loss, _, _, metrics = objective.lm_loss(batch, "train")
    assert loss.item() == 0.0 and torch.isfinite(metrics["mlm_acc"])
    loss.backward()  # still part of the graph


def test_resume_with_another_schedule_length_warns(tiny_corpus: Path, cpu_trainer_kwargs: dict, tmp_path: Path):
    data = TextDataModule(str(tiny_corpus), batch_size=2)
    trainer = pl.Trainer(max_steps=4, limit_val_batches=0, **cpu_trainer_kwargs)
    trainer.fit(CausalLM("gpt-tiny", warmup_steps=1), datamodule=data)
    trainer.save_checkpoint(tmp_path / "four.ckpt")
    longer = pl.Trainer(max_steps=8, limit_val_batches=0, **cpu_trainer_kwargs)
    with pytest.warns(UserWarning, match=r"schedule was 4 steps long and is now 8 .* --model.max_steps 4"):
        longer.fit(CausalLM("gpt-tiny", warmup_steps=1), datamodule=data, ckpt_path=tmp_path / "four.ckpt")


def test_test_split_bits_per_byte_uses_the_test_splits_bytes(tiny_corpus: Path, cpu_trainer_kwargs: dict):
    data = TextDataModule(str(tiny_corpus), tokenizer="bpe", vocab_size=400, batch_size=4, test_fraction=0.2)
    trainer = pl.Trainer(max_steps=2, limit_val_batches=0, **cpu_trainer_kwargs)
    objective = CausalLM("gpt-tiny", warmup_steps=0)
    trainer.fit(objective, datamodule=data)
    result = trainer.test(objective, datamodule=data, verbose=False)[0]
    expected = result["test/loss"] / math.log(2) / data.bytes_per_token("test")
    assert data.bytes_per_token("test") != data.bytes_per_token("val")
    assert result["test/bpb"] == pytest.approx(expected, rel=1e-5)


def test_training_without_a_validation_split(tiny_corpus: Path, tmp_path: Path):
    from lmexp.callbacks import LmexpCheckpoint

    data = TextDataModule(str(tiny_corpus), batch_size=2, val_fraction=0.0)
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=6, val_check_interval=3, logger=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[LmexpCheckpoint(dirpath=str(tmp_path))],
    )
    trainer.fit(CausalLM("gpt-tiny", warmup_steps=1), datamodule=data)
    assert trainer.global_step == 6 and (tmp_path / "last.ckpt").is_file()
    assert "val/loss" not in trainer.callback_metrics


def test_adamw8bit_trains_with_8bit_state(tiny_corpus: Path, cpu_trainer_kwargs: dict):
    pytest.importorskip("bitsandbytes")
    data = TextDataModule(str(tiny_corpus), batch_size=4)
    trainer = pl.Trainer(max_steps=30, limit_val_batches=0, **cpu_trainer_kwargs)
    objective = CausalLM("gpt-tiny", optimizer="adamw8bit", lr=3e-3, warmup_steps=0)
    trainer.fit(objective, datamodule=data)
    optimizer = trainer.optimizers[0]
    assert type(optimizer).__name__ == "AdamW8bit"
    big = max((p for group in optimizer.param_groups for p in group["params"]), key=torch.Tensor.numel)
    assert optimizer.state[big]["state1"].dtype == torch.uint8  # the large matrices keep 8-bit moments
    batch = next(iter(data.train_dataloader()))
    loss = objective.lm_loss(batch, "train")[0].item()
    assert loss < math.log(data.vocab_size) * 0.8


def test_unknown_optimizer_is_refused():
    with pytest.raises(ConfigError, match="optimizer='sgd' is unknown"):
        CausalLM("gpt-tiny", optimizer="sgd")


def test_model_vocabulary_may_be_padded_beyond_the_tokenizer(tiny_corpus: Path, cpu_trainer_kwargs: dict):
    data = TextDataModule(str(tiny_corpus), batch_size=2)
    objective = CausalLM("gpt-tiny", network_overrides={"vocab_size": 128}, warmup_steps=0)
    pl.Trainer(max_steps=2, limit_val_batches=0, **cpu_trainer_kwargs).fit(objective, datamodule=data)
    assert data.vocab_size < 128 and objective.model.lm_head.weight.shape[0] == 128


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"weight_decay": -0.1}, "weight_decay=-0.1 is negative"),
        ({"betas": (1.5, 0.99)}, "betas=[1.5, 0.99] must be two values in [0, 1)"),
        ({"max_steps": -5}, "max_steps=-5 must be a positive integer"),
    ],
)
def test_optimizer_settings_are_checked_when_the_objective_is_built(settings, expected):
    with pytest.raises(ConfigError, match=re.escape(expected)):
        CausalLM("gpt-tiny", **settings)


def test_lm_test_scores_accuracy_continuations_and_sliding_windows(tiny_corpus: Path, cpu_trainer_kwargs: dict):
    pl.seed_everything(0)
    data = TextDataModule(str(tiny_corpus), batch_size=4, test_fraction=0.2)
    objective = CausalLM("gpt-tiny", warmup_steps=0, lr=3e-3, continuation_passages=4,
                         continuation_prompt_tokens=8, continuation_tokens=8)
    trainer = pl.Trainer(max_steps=30, limit_val_batches=0, **cpu_trainer_kwargs)
    trainer.fit(objective, datamodule=data)
    disjoint = trainer.test(objective, datamodule=data, verbose=False)[0]
    assert 0 < disjoint["test/acc"] < 1 and 0 <= disjoint["test/bleu"] <= 1 and 0 <= disjoint["test/rougeL"] <= 1
    data.eval_stride = 4  # every token with at least 29 tokens of context instead of 0 to 31
    sliding = trainer.test(objective, datamodule=data, verbose=False)[0]
    assert sliding["test/loss"] != pytest.approx(disjoint["test/loss"], rel=1e-6)
    assert sliding["test/rougeL"] == pytest.approx(disjoint["test/rougeL"])  # the same passages, greedy
