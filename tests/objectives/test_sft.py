"""SFT: the response-only loss against a hand computation, and answers scored by generation and
by the most likely choice."""

from __future__ import annotations

import csv
import json
import math
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch

from lmexp.errors import ConfigError
from lmexp.objectives import SFT
from lmexp.objectives.sft import macro_f1
from tests.test_generate_template import TEMPLATE, Scripted, char_tokenizer

TINY = {"n_layer": 1, "n_embd": 32, "n_head": 2, "block_size": 32}


def tiny_sft(vocab_size: int, **kwargs) -> SFT:
    torch.manual_seed(0)
    return SFT("gpt-nano", network_overrides={**TINY, "vocab_size": vocab_size}, **kwargs)


def test_the_loss_is_the_mean_nll_of_the_labelled_tokens_only():
    sft = tiny_sft(20)
    ids = torch.randint(1, 20, (2, 6), generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([[-100, -100, 3, 4, 5, -100], [-100, 7, 8, -100, -100, -100]])  # responses; rest -100
    loss = sft.lm_step({"input_ids": ids, "labels": labels}, "train").loss
    logits = sft.model(ids)
    by_hand = [-logits[b, t].log_softmax(-1)[labels[b, t]] for b in range(2) for t in range(6) if labels[b, t] >= 0]
    torch.testing.assert_close(loss, torch.stack(by_hand).mean())
    # What a prompt position would be trained towards does not matter: it carries no loss.
    assert len(by_hand) == 5
    other = labels.clone()
    other[0, 0] = 9  # the same position given a target (as include_prompt_loss does) changes the loss
    assert not torch.isclose(sft.lm_step({"input_ids": ids, "labels": other}, "train").loss, loss)


def answer_data(expected: list[str], questions: str = "abb") -> SimpleNamespace:
    """The part of SFTDataModule that answer scoring reads."""
    tok = char_tokenizer()
    return SimpleNamespace(
        tokenizer=tok, template=TEMPLATE, choices=["yes", "no", "maybe"],
        answers=lambda split: [(TEMPLATE.prompt([{"role": "user", "content": q}]), e)
                               for q, e in zip(questions, expected)],
    )


def test_answers_are_generated_to_the_end_marker_and_chosen_by_likelihood():
    data = answer_data(["maybe", "no", "maybe"], questions="cbb")
    sft = tiny_sft(data.tokenizer.get_vocab_size())
    sft.model = Scripted(data.tokenizer)  # answers "maybe" + end-of-text to c, "no\n" + end-of-text to b
    result = sft.score_answers(data, "test")
    assert [row["generated"] for row in result["rows"]] == ["maybe", "no", "no"]
    assert [row["chosen"] for row in result["rows"]] == ["maybe", "no", "no"]
    metrics = result["metrics"]
    assert metrics["answer_acc"] == pytest.approx(2 / 3) and metrics["choice_acc"] == pytest.approx(2 / 3)
    # F1 per choice: maybe 2/3 (1 hit, 1 missed), no 2/3 (1 hit, 1 false), yes 0 (never expected or said).
    assert metrics["answer_f1"] == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)
    assert sft.score_answers(data, "test", limit=1)["metrics"]["answer_acc"] == 1.0


def test_answer_scoring_settings():
    data = answer_data(["yes", "no", "yes"])
    vocab = data.tokenizer.get_vocab_size()
    only_choices = tiny_sft(vocab, answer_scoring="choices")
    only_choices.model = Scripted(data.tokenizer)
    assert set(only_choices.score_answers(data, "test")["metrics"]) == {"choice_acc", "choice_f1"}
    short = tiny_sft(vocab, answer_scoring="generate", max_answer_tokens=2)
    short.model = Scripted(data.tokenizer)
    assert [row["generated"] for row in short.score_answers(data, "test")["rows"]] == ["ye", "no", "no"]
    with pytest.raises(ConfigError, match="answer_scoring='maybe' is unknown"):
        tiny_sft(vocab, answer_scoring="maybe")
    with pytest.raises(ConfigError, match="max_answer_tokens=32 leaves no room"):
        tiny_sft(vocab, max_answer_tokens=32)


def test_macro_f1_counts_an_answer_outside_the_choices_as_wrong():
    assert macro_f1(["a", "b"], ["a", "b"], ["a", "b"]) == 1.0
    assert macro_f1(["a", "???"], ["a", "b"], ["a", "b"]) == pytest.approx((1.0 + 0.0) / 2)
    assert math.isclose(macro_f1(["a", "a"], ["a", "b"], ["a", "b"]), (2 / 3 + 0) / 2)


def test_fit_and_test_log_answer_accuracy_and_write_answers_csv(tmp_path):
    """A few steps of SFT on a tiny table through Lightning: the test logs response loss and the
    answer metrics, and answers.csv in the run folder holds what the model said."""
    from lmexp.data.pairs import SFTDataModule

    rows = [{"prompt": f"review {w}", "response": label} for w, label in
            [("good", "1"), ("bad", "0"), ("fine", "1"), ("awful", "0")] * 4]
    table = tmp_path / "pairs.jsonl"
    table.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    data = SFTDataModule(train=str(table), test=str(table), template={"user": "{content}:", "assistant": " {content}\n"},
                         response_values={"0": "negative", "1": "positive"}, tokenizer="char", batch_size=4,
                         val=str(table))
    model = SFT("gpt-nano", network_overrides=TINY, lr=3e-3, warmup_steps=0, max_answer_tokens=4, val_answer_examples=2)
    trainer = pl.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path, limit_val_batches=1, val_check_interval=2,
                         num_sanity_val_steps=0)
    trainer.fit(model, datamodule=data)
    assert len(model.last_answers["val"]["rows"]) == 2  # val answers a cheap share at each validation
    assert {"val/answer_acc", "val/choice_acc"} <= set(trainer.callback_metrics)
    metrics = trainer.test(model, datamodule=data, verbose=False)[0]
    assert {"test/loss", "test/ppl", "test/answer_acc", "test/choice_acc", "test/choice_f1"} <= set(metrics)
    assert "test/bpb" not in metrics  # prompts are not predicted: bits per byte would mislead
    with open(tmp_path / "answers.csv", newline="", encoding="utf-8") as f:
        answers = list(csv.DictReader(f))
    assert len(answers) == len(rows) and answers[0]["prompt"] == "review good: "
    assert answers[0]["expected"] == "positive" and answers[0]["chosen"] in ("positive", "negative")
    accuracy = sum(row["correct"] == "True" for row in answers) / len(answers)
    assert metrics["test/answer_acc"] == pytest.approx(accuracy)
