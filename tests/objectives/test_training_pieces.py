"""The objectives' public pieces for code that runs them outside a trainer: building the network
from a data module, the loss with what it was computed from, gradient clipping; and the old
import path of ``logs_this_step``; an objective still written against ``lm_loss``."""

import warnings
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from lmexp import CausalLM, MaskedLM, TextDataModule
from lmexp.checkpoints import CHECKPOINT_KEY
from lmexp.objectives import LanguageModelObjective, SequenceClassification, clip_gradients


def test_read_data_then_configure_model_builds_without_a_trainer():
    objective = CausalLM("gpt-tiny")
    assert objective.model is None  # the vocabulary comes from the data
    objective.read_data(SimpleNamespace(vocab_size=37))
    objective.configure_model()
    assert objective.network_config.vocab_size == 37 and objective.model is not None

    classifier = SequenceClassification("bert-tiny", network_overrides={"vocab_size": 40})
    classifier.read_data(SimpleNamespace(vocab_size=40, labels=["neg", "pos"], class_counts=lambda: [3, 1]))
    classifier.configure_model()
    assert classifier.network_config.labels == ["neg", "pos"] and classifier.class_counts == [3, 1]


def test_configure_model_without_data_names_the_fix():
    with pytest.raises(Exception, match="vocab_size is unknown"):
        CausalLM("gpt-tiny").configure_model()


def lm_batch(vocab: int, masked: bool = False) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    ids = torch.randint(5, vocab, (2, 16))
    labels = torch.full_like(ids, -100)
    if masked:
        labels[:, ::3] = ids[:, ::3]
    else:
        labels = torch.roll(ids, -1, dims=1)
        labels[:, :4] = -100
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}


def test_compute_loss_returns_the_logits_it_scored():
    causal = CausalLM("gpt-tiny", network_overrides={"vocab_size": 50})
    batch = lm_batch(50)
    loss, outputs = causal.compute_loss(batch, "train", return_outputs=True, loss_name="hard_loss")
    assert torch.equal(loss, causal.compute_loss(batch, "train"))
    assert outputs["logits"].shape == (2, 16, 50)
    assert torch.equal(outputs["scored"], outputs["logits"][batch["labels"] != -100])

    masked = MaskedLM("bert-tiny", network_overrides={"vocab_size": 50})
    batch = lm_batch(50, masked=True)
    _, outputs = masked.compute_loss(batch, "val", return_outputs=True)
    selected = int((batch["labels"] != -100).sum())
    assert outputs["logits"].shape == outputs["scored"].shape == (selected, 50)
    assert outputs["hidden"].shape[:2] == (2, 16)

    classifier = SequenceClassification("bert-tiny", network_overrides={"vocab_size": 50, "labels": ["a", "b", "c"]})
    batch = {**lm_batch(50), "labels": torch.tensor([0, 2])}
    _, outputs = classifier.compute_loss(batch, "train", return_outputs=True)
    assert outputs["logits"].shape == outputs["scored"].shape == (2, 3)


@pytest.mark.parametrize(("algorithm", "check"), [
    ("norm", lambda g: torch.linalg.vector_norm(g) <= 1.0 + 1e-5),
    (None, lambda g: torch.linalg.vector_norm(g) <= 1.0 + 1e-5),
    ("value", lambda g: g.abs().max() <= 0.1),
])
def test_clip_gradients_clips_as_the_trainer_settings_say(algorithm, check):
    layer = torch.nn.Linear(4, 4)
    layer(torch.full((3, 4), 100.0)).sum().backward()
    clip_gradients(layer, 1.0 if algorithm != "value" else 0.1, algorithm)
    grads = torch.cat([p.grad.flatten() for p in layer.parameters()])
    assert check(grads)


def test_clip_gradients_without_a_value_leaves_gradients_alone():
    param = torch.nn.Parameter(torch.zeros(3))
    param.grad = torch.full((3,), 50.0)
    clip_gradients([param], None, "norm")
    assert torch.equal(param.grad, torch.full((3,), 50.0))
    with pytest.raises(ValueError, match="gradient_clip_algorithm='l1' is unknown"):
        clip_gradients([param], 1.0, "l1")


def test_every_objective_brings_exact_resume_and_throughput(tiny_corpus: Path, cpu_trainer_kwargs: dict):
    """A plain ``pl.Trainer`` with no callbacks of its own still logs throughput and saves the generators."""
    trainer = pl.Trainer(**cpu_trainer_kwargs, max_steps=3, log_every_n_steps=1, limit_val_batches=0)
    trainer.fit(CausalLM("gpt-tiny", warmup_steps=0), datamodule=TextDataModule(str(tiny_corpus), batch_size=2))
    assert "train/tokens_per_sec" in trainer.callback_metrics
    trainer.save_checkpoint(tiny_corpus.parent / "last.ckpt")
    saved = torch.load(tiny_corpus.parent / "last.ckpt", weights_only=False)
    assert torch.equal(saved[CHECKPOINT_KEY]["rng"]["torch"], torch.get_rng_state())


def test_an_lm_loss_override_still_trains_and_warns():
    """``lm_loss`` was the extension point before ``lm_step``: a subclass of either kind keeps its loss."""
    batch = lm_batch(50)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")

        class OwnLoss(LanguageModelObjective):
            task = "causal_lm"

            def lm_loss(self, batch, stage):
                logits = self.model(batch["input_ids"]).flatten(0, 1)
                nll = F.cross_entropy(logits, batch["labels"].flatten())
                return nll * 2, nll, None, {"half": nll / 2} if stage == "train" else {}

        class Regularized(CausalLM):
            def lm_loss(self, batch, stage):
                loss, nll, correct, metrics = super().lm_loss(batch, stage)
                return loss + 1, nll, correct, metrics

    # Each names the new method and points at the class in the caller's file (shown by default in a script).
    assert [(w.category, "implement lm_step" in str(w.message), w.filename) for w in record] \
        == [(DeprecationWarning, True, __file__)] * 2
    own = OwnLoss("gpt-tiny", network_overrides={"vocab_size": 50})
    assert torch.equal(own.compute_loss(batch, "train"), own.lm_loss(batch, "train")[0])
    assert own.lm_step(batch, "train").outputs == {}
    own.compute_loss(batch, "val")
    assert torch.equal(own.eval_nll["val"].compute(), own.lm_loss(batch, "val")[1])

    torch.manual_seed(0)
    regularized = Regularized("gpt-tiny", network_overrides={"vocab_size": 50})
    torch.manual_seed(0)
    plain = CausalLM("gpt-tiny", network_overrides={"vocab_size": 50})
    assert torch.allclose(regularized.compute_loss(batch, "train"), plain.compute_loss(batch, "train") + 1)
    with pytest.raises(NotImplementedError, match="implement lm_step"):
        regularized.compute_loss(batch, "train", return_outputs=True)


def test_logs_this_step_old_path_still_works_and_warns():
    from lmexp import lightning_internals

    with pytest.warns(DeprecationWarning, match="lmexp.lightning_internals.logs_this_step"):
        from lmexp.objectives.base import logs_this_step
    assert logs_this_step is lightning_internals.logs_this_step
