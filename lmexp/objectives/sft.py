"""Supervised fine-tuning (SFT) of a causal model on prompt/response pairs, judged by its answers.

The data (``lmexp.data.pairs.SFTDataModule``) renders each conversation with a chat template and
marks prompt tokens -100, so the next-token loss CausalLM computes is the loss on the responses
only, and ``val/loss``, ``val/ppl`` (and test's) are the response loss and perplexity. A labelled
task (a review -> "positive") is also scored the way it is used: by the answer the model gives.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from tokenizers import Tokenizer

from lmexp.atomic import write_text
from lmexp.data.chat import ChatTemplate, encode_segments, end_of_text_id
from lmexp.errors import ConfigError, check_positive
from lmexp.generation import complete, score_continuations
from lmexp.models import ModelConfig
from lmexp.objectives.base import attached_trainer
from lmexp.objectives.causal_lm import CausalLM

__all__ = ["ANSWER_SCORING", "SFT", "answer_ids", "macro_f1", "prompt_ids"]

AnswerScoring = Literal["generate", "choices", "both", "off"]
ANSWER_SCORING = ("generate", "choices", "both", "off")
ANSWERS_FILE = "answers.csv"


class SFT(CausalLM):
    """Causal-LM loss on the responses of prompt/response pairs; answers scored at test.

    The loss is CausalLM's over the tokens the data labels (responses, their end marker and
    end-of-text; prompts too with the data's ``include_prompt_loss``). At test, when the data has
    answers (``answers(split)``: the prompt before each last response and that response):

    - ``test/answer_acc``: greedy generation from each prompt, stopped at the tokenizer's
      end-of-text, the template's end marker or ``max_answer_tokens``; exact match of the stripped
      answer against the stripped expected response. ``test/answer_f1``: macro-F1 over the data's
      choices (an answer that is none of them is wrong for every class).
    - ``test/choice_acc`` (and ``test/choice_f1``): the most likely of the data's choices (its
      distinct responses), each scored by the summed log-probability of its tokens, end marker
      and end-of-text included, after the prompt.

    ``<run folder>/answers.csv`` lists each prompt, expected and generated answer (and the chosen
    one). With several processes (DDP), rank 0 answers every example while the others wait for
    its results (a broadcast), and every rank logs the same values.

    Args:
        answer_scoring: ``generate``, ``choices``, ``both`` or ``off``.
        max_answer_tokens: Tokens a generated answer may take.
        answer_examples: Answer at most this many test examples, the first ones (0: all).
        val_answer_examples: Also answer this many validation examples at every validation
            (``val/answer_acc``, ``val/choice_acc``; 0: none, as generation costs a forward pass per token).
        answer_batch_size: Prompts per generation batch ((prompt, choice) rows when scoring choices).
        **kwargs: See ``CausalLM`` (``pretrained``, ``lr``, ``label_smoothing``, ...).
    """

    task: ClassVar[str] = "causal_lm"
    reports_bits_per_byte: ClassVar[bool] = False  # prompt tokens are not predicted

    def __init__(
        self,
        network: str | ModelConfig = "gpt-nano",
        answer_scoring: AnswerScoring = "both",
        max_answer_tokens: int = 16,
        answer_examples: int = 0,
        val_answer_examples: int = 0,
        answer_batch_size: int = 64,
        **kwargs: Any,
    ) -> None:
        if answer_scoring not in ANSWER_SCORING:
            raise ConfigError(f"answer_scoring={answer_scoring!r} is unknown: use one of {', '.join(ANSWER_SCORING)}")
        check_positive("max_answer_tokens", max_answer_tokens)
        check_positive("answer_batch_size", answer_batch_size)
        for name, value in (("answer_examples", answer_examples), ("val_answer_examples", val_answer_examples)):
            if value < 0:
                raise ConfigError(f"{name}={value} is negative: use 0 (test: all examples; val: none) or more")
        super().__init__(network, **kwargs)
        if max_answer_tokens >= self.block_size:
            raise ConfigError(
                f"max_answer_tokens={max_answer_tokens} leaves no room for a prompt in the model's context "
                f"({self.block_size} tokens): use fewer, e.g. {max(1, self.block_size // 8)}"
            )
        self.last_answers: dict[str, dict[str, Any]] = {}  # per stage: metrics and rows of the latest scoring

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        trainer = attached_trainer(self)
        if self.hparams.val_answer_examples and trainer is not None and not trainer.sanity_checking:
            self._log_answers("val", self.hparams.val_answer_examples)

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        self._log_answers("test", self.hparams.answer_examples)

    # --------------------------------------------------------------------------- answers
    def _log_answers(self, stage: str, limit: int) -> None:
        trainer = attached_trainer(self)
        datamodule = getattr(trainer, "datamodule", None)
        if self.hparams.answer_scoring == "off" or datamodule is None or not hasattr(datamodule, "answers"):
            return
        if isinstance(trainer.strategy, FSDPStrategy):  # rank 0 alone cannot run a sharded model
            rank_zero_warn(f"SFT: {stage} answers are not scored under FSDP (each needs the whole model on one "
                           "process): score the checkpoint with lmexp test on one device")
            return
        result = self.score_answers(datamodule, stage, limit) if trainer.is_global_zero else None
        result = trainer.strategy.broadcast(result, src=0)  # the other ranks wait for rank 0's answers
        if not result or not result["rows"]:
            return
        self.last_answers[stage] = result
        # Equal on every rank (broadcast): sync_dist only states that they are reduced.
        self.log_dict({f"{stage}/{name}": value for name, value in result["metrics"].items()}, sync_dist=True)
        if stage == "test" and trainer.is_global_zero:
            self._write_answers(Path(trainer.default_root_dir), result["rows"])

    @torch.no_grad()
    def score_answers(self, datamodule: Any, split: str, limit: int = 0) -> dict[str, Any]:
        """Answer the prompts of ``datamodule.answers(split)``: {"metrics": {name: value}, "rows": [...]},
        a row per example with prompt, expected, generated (and chosen), usable without a trainer."""
        pairs = list(datamodule.answers(split))
        if limit:
            pairs = pairs[:limit]
        if not pairs:
            return {"metrics": {}, "rows": []}
        tokenizer, template = datamodule.tokenizer, datamodule.template
        eos_id = end_of_text_id(tokenizer)
        prompts = self._prompt_ids(datamodule, split, pairs)
        expected = [answer.strip() for _, answer in pairs]
        choices = list(dict.fromkeys(getattr(datamodule, "choices", None) or []))  # distinct, in the data's order
        mode = self.hparams.answer_scoring
        rows: list[dict[str, Any]] = [{"prompt": prompt, "expected": answer} for prompt, answer in pairs]
        metrics: dict[str, float] = {}
        labels = [choice.strip() for choice in choices]  # what answers are compared with
        cut = 0
        if mode in ("generate", "both"):
            room = self.block_size - self.hparams.max_answer_tokens
            cut = max(cut, sum(len(ids) > room for ids in prompts))
            known = tokenizer.get_vocab_size()
            # Special tokens stay in the text: a stop string may be one (<|im_end|>).

            def decode(ids: list[int]) -> str:
                return tokenizer.decode([i for i in ids if i < known], skip_special_tokens=False)

            # The end marker ends an answer where no end-of-text token does: with one, the marker
            # may also occur inside an answer (a newline), and the answer ends at end-of-text.
            stops = [template.stop] if template.stop and eos_id is None else []
            answers = complete(self.model, [ids[-room:] for ids in prompts], decode, self.hparams.max_answer_tokens,
                               stops, eos_id, self.hparams.answer_batch_size)
            if eos_id is not None and template.stop:
                answers = [answer.removesuffix(template.stop) for answer in answers]
            generated = [answer.strip() for answer in answers]
            correct = [g == e for g, e in zip(generated, expected)]
            for row, answer, ok in zip(rows, answers, correct):
                row.update(generated=answer, correct=ok)
            metrics["answer_acc"] = sum(correct) / len(correct)
            if labels:
                metrics["answer_f1"] = macro_f1(generated, expected, labels)
        if mode in ("choices", "both") and len(labels) >= 2:
            choice_ids = [answer_ids(template, tokenizer, choice, eos_id) for choice in choices]
            room = self.block_size - max(len(ids) for ids in choice_ids)
            if room < 1:
                raise ConfigError(
                    f"the longest answer choice takes {self.block_size - room} tokens, the model's whole context: "
                    "use answer_scoring: generate"
                )
            cut = max(cut, sum(len(ids) > room for ids in prompts))
            scored = [(ids[-room:], choice) for ids in prompts for choice in choice_ids]
            scores = score_continuations(self.model, scored, self.hparams.answer_batch_size).view(len(pairs), len(labels))
            chosen = [labels[i] for i in scores.argmax(dim=-1).tolist()]
            for row, choice, answer in zip(rows, chosen, expected):
                row.update(chosen=choice, chosen_correct=choice == answer)
            metrics["choice_acc"] = sum(c == e for c, e in zip(chosen, expected)) / len(pairs)
            metrics["choice_f1"] = macro_f1(chosen, expected, labels)
        elif mode == "choices":
            rank_zero_info(f"SFT: {split} has no set of answers to choose from (data.choices or data.response_values): "
                           "choice_acc not scored")
        if cut:
            rank_zero_info(f"SFT: {cut} {split} prompt(s) lost their start to fit the context ({self.block_size} tokens)")
        return {"metrics": metrics, "rows": rows}

    def _prompt_ids(self, datamodule: Any, split: str, pairs: list[tuple[str, str]]) -> list[list[int]]:
        """Each prompt encoded as the training data encodes it (segment by segment: earlier answers
        of a conversation are segments of their own) when the data gives the messages before each
        answer (``answer_messages``); else the rendered prompt in one piece (the same ids for a
        one-turn prompt, which is a single segment)."""
        tokenizer, template = datamodule.tokenizer, datamodule.template
        if hasattr(datamodule, "answer_messages"):
            return [prompt_ids(template, tokenizer, messages) for messages in datamodule.answer_messages(split)[: len(pairs)]]
        return [tokenizer.encode(prompt, add_special_tokens=False).ids for prompt, _ in pairs]

    @staticmethod
    def _write_answers(folder: Path, rows: list[dict[str, Any]]) -> Path | None:
        """``answers.csv`` in the run folder (when there is one): what the model said to each prompt."""
        if not folder.is_dir():
            return None
        columns = list(dict.fromkeys(key for row in rows for key in row))
        text = io.StringIO()
        writer = csv.DictWriter(text, columns)
        writer.writeheader()
        writer.writerows(rows)
        path = folder / ANSWERS_FILE
        write_text(path, text.getvalue())
        rank_zero_info(f"SFT: answers written to {path}")
        return path


def prompt_ids(template: ChatTemplate, tokenizer: Tokenizer, messages: Sequence[Mapping[str, str]]) -> list[int]:
    """The ids of the prompt of ``messages`` (ending with the assistant header) as the training data
    encodes it: each segment on its own (earlier answers are segments of their own, each followed
    by the tokenizer's end-of-text when it has one)."""
    # An empty answer after the messages renders the header; dropping its (trained) segment
    # leaves the prompt's segments exactly as training splits them.
    segments = template.segments([*messages, {"role": "assistant", "content": ""}])[:-1]
    return encode_segments(tokenizer, segments, end_of_text_id(tokenizer))[0]


def answer_ids(template: ChatTemplate, tokenizer: Tokenizer, answer: str, eos_id: int | None) -> list[int]:
    """The ids of ``answer`` as a trained response: its text and the end marker in one segment,
    then eos_id when there is one (what a choice's score covers, so that no choice wins by
    being the start of a longer answer)."""
    return encode_segments(tokenizer, [(answer + (template.stop or ""), True)], eos_id)[0]


def macro_f1(predicted: list[str], expected: list[str], labels: list[str]) -> float:
    """Mean F1 over ``labels``; a prediction that is none of them counts against its example's
    true label only (a generated answer may be any text, which a class-index metric cannot hold)."""
    scores = []
    for label in labels:
        hits = sum(p == e == label for p, e in zip(predicted, expected))
        false_pos = sum(p == label != e for p, e in zip(predicted, expected))
        false_neg = sum(e == label != p for p, e in zip(predicted, expected))
        total = 2 * hits + false_pos + false_neg
        scores.append(2 * hits / total if total else 0.0)
    return sum(scores) / len(scores) if scores else 0.0
