"""Prompt/response pairs (or conversations) for supervised fine-tuning of a causal model.

Tables in (``.jsonl``/``.csv``/``.tsv``, prompt and response columns or a ``messages`` list),
rendered with a chat template, encoded with the loss on response tokens only, and batched padded
or packed. Reading and encoding are plain functions; ``SFTDataModule`` wires them to Lightning.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from tokenizers import Tokenizer
from torch.utils.data import DataLoader

from lmexp.data.chat import ChatTemplate, check_messages, end_of_text_id, join_segments
from lmexp.data.classification import ClassificationBatches
from lmexp.data.contract import DataContract
from lmexp.data.datamodule import ResumableDataModule, bound_contract
from lmexp.data.sources import cell_text, read_rows, table_columns
from lmexp.data.tokenizer import PAD, resolve_tokenizer, special_tokens_for, train_tokenizer
from lmexp.errors import ConfigError, DataError, check_positive

IGNORE = -100  # a label no loss is computed on (prompt and padding)
PAD_DOCUMENT = -1  # the document id of padding in packed rows (see TransformerTrunk.forward)
END_OF_TEXT = "<|endoftext|>"  # added to a tokenizer trained here, so responses end with it

__all__ = ["Conversation", "SFTDataModule", "Truncation", "encode_conversations", "read_conversations"]


@dataclass(frozen=True)
class Conversation:
    """One example: messages ({role, content}) ending with the assistant's response, and where it was read."""

    messages: tuple[Mapping[str, str], ...]
    origin: str

    @property
    def response(self) -> str:
        """The last assistant message: what evaluation expects the model to answer."""
        return self.messages[-1]["content"]

    @property
    def context(self) -> list[Mapping[str, str]]:
        """The messages before the response: what the model answers."""
        return list(self.messages[:-1])


def _names(columns: str | Sequence[str] | None) -> list[str]:
    if columns is None:
        return []
    return [columns] if isinstance(columns, str) else list(columns)


def _first(columns: list[str], candidates: list[str]) -> str | None:
    return next((name for name in candidates if name in columns), None)


def read_conversations(
    path: str | Path,
    prompt_column: str | Sequence[str] = "prompt",
    response_column: str | Sequence[str] = "response",
    messages_column: str | Sequence[str] | None = "messages",
    system: str | None = None,
    response_values: Mapping[str, str] | None = None,
) -> list[Conversation]:
    """Read a table of prompt/response pairs or of conversations.

    A file with a messages column (a JSON list of {role, content}, ending with the assistant's
    message) is read as conversations; otherwise its prompt and response columns make one user
    and one assistant message. Column settings may list several names: each file uses the first
    it has. ``response_values`` maps a response cell to its text (``{"1": "positive"}``);
    ``system``, when given, is the system message of every example that has none.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{str(path)!r} does not exist: pass a .jsonl, .csv or .tsv file")
    columns = table_columns(path)
    messages = _first(columns, _names(messages_column))
    prompt = response = None
    if messages is None:
        prompt, response = _first(columns, _names(prompt_column)), _first(columns, _names(response_column))
        if prompt is None or response is None:
            missing = [(setting, names) for setting, names, found in (
                ("data.prompt_column", _names(prompt_column), prompt),
                ("data.response_column", _names(response_column), response)) if found is None]
            setting, names = missing[0]
            raise DataError(
                f"{path} has no column {' or '.join(map(repr, names))} (columns: {', '.join(columns) or 'none'}): "
                f"set {setting} to the file's column"
                + (" or data.messages_column to its messages column" if messages_column else "")
            )
    values = {str(key): str(value) for key, value in response_values.items()} if response_values else None
    conversations = []
    for origin, row in read_rows(path):
        if messages is not None:
            turns = _message_list(row.get(messages), origin, messages)
        else:
            turns = [{"role": "user", "content": _cell(row, prompt, origin)},
                     {"role": "assistant", "content": _response(_cell(row, response, origin), values, origin)}]
        if system is not None and turns[0]["role"] != "system":
            turns.insert(0, {"role": "system", "content": system})
        conversations.append(Conversation(tuple(turns), origin))
    if not conversations:
        raise DataError(f"{path} has no rows: give a file with a header and at least one example")
    return conversations


def _cell(row: Mapping[str, object], column: str, origin: str) -> str:
    text = cell_text(row.get(column))
    if not text.strip():
        raise DataError(f"{origin} has an empty {column!r} cell: fill it in or remove the row")
    return text


def _response(value: str, values: Mapping[str, str] | None, origin: str) -> str:
    if values is None:
        return value
    key = value.strip()
    if key not in values:
        raise DataError(
            f"{origin} has response {key!r}, which data.response_values does not map "
            f"(it maps {', '.join(map(repr, values))}): add it there or fix the row"
        )
    return values[key]


def _message_list(cell: object, origin: str, column: str) -> list[dict[str, str]]:
    """A messages cell (a list, or its JSON text in a CSV) checked: known roles, text content,
    ending with a non-empty assistant message."""

    if isinstance(cell, str):
        try:
            cell = json.loads(cell)
        except json.JSONDecodeError as err:
            raise DataError(f"{origin}: the {column!r} cell is not JSON ({err.msg}): write a JSON list of "
                            "{\"role\": ..., \"content\": ...}") from None
    try:
        checked = check_messages(cell)  # type: ignore[arg-type]
    except DataError as err:
        raise DataError(f"{origin}: {err}") from None
    if not checked or checked[-1][0] != "assistant":
        raise DataError(f"{origin}: the conversation must end with an assistant message (the response to train on)")
    if len(checked) < 2:
        raise DataError(f"{origin}: the conversation has only the assistant's answer: add the message it answers "
                        "(a user or system message) before it")
    for role, content in checked:
        if role == "assistant" and not content.strip():
            raise DataError(f"{origin} has an empty assistant message: fill in the response or remove the row")
    return [{"role": role, "content": content} for role, content in checked]


@dataclass
class Truncation:
    """What truncation cut from one split: examples cut, prompt and response tokens removed."""

    pairs: int = 0
    prompt_tokens: int = 0
    response_tokens: int = 0
    examples: int = 0

    def describe(self) -> str:
        return (f"{self.pairs} of {self.examples} examples cut ({self.prompt_tokens} prompt and "
                f"{self.response_tokens} response tokens)")


@dataclass
class Encoded:
    """Model inputs and next-token labels (-100 = no loss) of each example of a split."""

    inputs: list[list[int]] = field(default_factory=list)
    labels: list[list[int]] = field(default_factory=list)
    truncation: Truncation = field(default_factory=Truncation)


def encode_conversations(
    tokenizer: Tokenizer,
    template: ChatTemplate,
    conversations: Sequence[Conversation],
    max_length: int,
    include_prompt_loss: bool = False,
) -> Encoded:
    """Encode examples for the next-token loss on their responses.

    Each template segment is encoded on its own; the tokenizer's end-of-text id follows each
    response (a tokenizer without one relies on the template's end marker, and with neither the
    model could not learn to stop: refused). The model reads up to ``max_length`` tokens of an
    example (all but its last). A longer example loses its prompt's start first (earlier turns
    included); only a response that does not fit alone loses its tail, and then half of the budget
    stays with the prompt's end, so the model still sees what it answers.
    """
    eos_id = end_of_text_id(tokenizer)
    if eos_id is None and template.stop is None:
        raise ConfigError(
            f"the tokenizer has no end-of-text token and data.template.assistant={template.assistant!r} has no end "
            "marker, so a model could not learn where a response stops: end it with one, e.g. '{content}\\n'"
        )
    segments = [template.segments(conversation.messages) for conversation in conversations]
    texts = [text for parts in segments for text, _ in parts]
    pieces = iter(encoding.ids for encoding in tokenizer.encode_batch(texts, add_special_tokens=False))
    limit = max_length + 1
    out = Encoded(truncation=Truncation(examples=len(conversations)))
    for conversation, parts in zip(conversations, segments):
        ids, trained = join_segments([next(pieces) for _ in parts], [flag for _, flag in parts], eos_id)
        prompt_cut = response_cut = 0
        if len(ids) > limit:
            # The response is the trailing run of trained tokens; everything before it is prompt.
            prompt = len(trained) - trained[::-1].index(False) if False in trained else 0
            response = len(ids) - prompt
            keep_prompt = limit - response if response < limit else min(prompt, limit // 2)
            prompt_cut, response_cut = prompt - keep_prompt, response - (limit - keep_prompt)
            ids = ids[prompt_cut : len(ids) - response_cut]
            trained = trained[prompt_cut : len(trained) - response_cut]
            out.truncation.pairs += 1
            out.truncation.prompt_tokens += prompt_cut
            out.truncation.response_tokens += response_cut
        if len(ids) < 2:
            raise DataError(f"{conversation.origin} encodes to {len(ids)} token: give it a prompt and a response")
        out.inputs.append(ids[:-1])
        out.labels.append([token if include_prompt_loss or flag else IGNORE for token, flag in zip(ids[1:], trained[1:])])
    return out


def pack(lengths: Sequence[int], max_length: int, order: Sequence[int]) -> list[list[int]]:
    """Examples (indices, in ``order``) grouped into rows of at most ``max_length`` tokens, each
    example whole in one row (next fit: a row is closed when the next example does not fit)."""
    rows: list[list[int]] = []
    used = max_length
    for index in order:
        if used + lengths[index] > max_length:
            rows.append([])
            used = 0
        rows[-1].append(int(index))
        used += lengths[index]
    return rows


class SFTBatches(ClassificationBatches):
    """Batches of examples (or of packed rows of examples), right-padded to their longest row,
    resumable mid-epoch with ClassificationBatches' order (seed and epoch), bucketing and rank
    sharding. A batch holds input_ids, labels and attention_mask; packed rows add document_ids
    (0, 1, ... per example of the row, -1 on padding)."""

    def __init__(self, encoded: Encoded, rows: list[list[int]], batch_size: int, pad_id: int, **kwargs: Any) -> None:
        # The base class orders and buckets (ids, _) units by len(ids): a range stands in for the row's tokens.
        units = [(range(sum(len(encoded.inputs[i]) for i in row)), row) for row in rows]
        super().__init__(units, None, batch_size, pad_id, **kwargs)  # type: ignore[arg-type]
        self.data = encoded
        self.packed = any(len(row) > 1 for row in rows)

    def collate(self, index: np.ndarray) -> dict[str, torch.Tensor]:
        """The batch of the rows at ``index``: each row's examples side by side, right-padded."""
        rows = [self.encoded[i][1] for i in index]
        lengths = [sum(len(self.data.inputs[i]) for i in row) for row in rows]
        shape = (len(rows), max(lengths))
        input_ids = torch.full(shape, self.pad_id, dtype=torch.long)
        labels = torch.full(shape, IGNORE, dtype=torch.long)
        documents = torch.full(shape, PAD_DOCUMENT, dtype=torch.long)
        for r, row in enumerate(rows):
            at = 0
            for document, i in enumerate(row):
                n = len(self.data.inputs[i])
                input_ids[r, at : at + n] = torch.tensor(self.data.inputs[i])
                labels[r, at : at + n] = torch.tensor(self.data.labels[i])
                documents[r, at : at + n] = document
                at += n
        batch = {"input_ids": input_ids, "labels": labels, "attention_mask": (documents >= 0).long()}
        if self.packed:
            batch["document_ids"] = documents
        return batch


class SFTDataModule(ResumableDataModule):
    """Supervised fine-tuning data: prompt/response pairs or conversations for a causal model.

    The loss is on the response tokens only (and the end-of-text token after each response), so
    the model learns to answer rather than to write prompts. The tokenizer comes from the
    pretrained model (``model.pretrained``) when there is one; otherwise one is trained on the
    rendered training texts, with an ``<|endoftext|>`` token that ends every response.

    Args:
        train: Training table (``.jsonl``, ``.csv`` or ``.tsv``).
        val: Validation table; without one, ``val_fraction`` of ``train`` is held out.
        test: Test table (``lmexp test``), e.g. a benchmark's dev set.
        prompt_column: The prompt's column, or several names of which each file uses the first it has.
        response_column: The response's column (names as for prompt_column).
        messages_column: A column holding a JSON list of {role, content} messages (system, user,
            assistant) ending with the assistant's response; a file that has it is read as
            conversations (every assistant message is trained), else prompt and response columns.
        template: How messages become text: ``plain``, ``chatml``, ``alpaca``, or
            {system: ..., user: ..., assistant: ...} format strings with {content}. The assistant's
            text before {content} ends the prompt; its text after {content} ends the response
            (trained, and where generation stops).
        system: A system message for every example that has none.
        response_values: Maps a response cell to its text, e.g. {"0": negative, "1": positive}.
        choices: The answers of a labelled task (default: response_values' texts), for
            ``SFT``'s choice accuracy (the most likely of them) and answer macro-F1; without
            either, responses are open-ended and only the generated answer is scored.
        include_prompt_loss: Train on the prompt tokens too (default: response tokens only).
        packing: Pack examples into rows of ``max_length`` tokens (no padding computed); packed
            examples cannot attend to each other and their positions restart (transformers only).
            Otherwise batches are padded to their longest example.
        max_length: Tokens the model reads per example (packed row) at most; longer examples
            lose their prompt's start first (counts reported). ``None``: the model's context.
        batch_size: Examples (packed rows) per batch on each device.
        bucket_by_length: Batch examples of similar length together (less padding), in shuffled
            batch order.
        val_fraction: Share of ``train`` held out for validation when ``val`` is not given.
        tokenizer: ``bpe``, ``char`` or ``wordpiece`` to train one on the training texts, or a
            ``tokenizer.json`` path; ignored when the model is pretrained (its own is used).
        vocab_size: Vocabulary size of a tokenizer trained here.
        seed: Seed of the validation split, the packing and the batch order.
        num_workers: DataLoader workers.
    """

    tokenizer_from_model: ClassVar[bool] = True  # a checkpoint's tokenizer encodes the data it is run on

    def __init__(
        self,
        train: str | None = None,
        val: str | None = None,
        test: str | None = None,
        prompt_column: str | list[str] = "prompt",
        response_column: str | list[str] = "response",
        messages_column: str | list[str] | None = "messages",
        template: str | dict[str, str] | None = "plain",
        system: str | None = None,
        response_values: dict[str, str] | None = None,
        choices: list[str] | None = None,
        include_prompt_loss: bool = False,
        packing: bool = False,
        max_length: int | None = None,
        batch_size: int = 16,
        bucket_by_length: bool = False,
        val_fraction: float = 0.05,
        tokenizer: str = "bpe",
        vocab_size: int = 4096,
        seed: int = 1337,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        check_positive("data.batch_size", batch_size)
        if max_length is not None:
            check_positive("data.max_length", max_length)
        if not 0.0 <= val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction={val_fraction} must be in [0, 1), e.g. 0.05")
        if train is None and test is None and val is None:
            raise ConfigError("SFTDataModule has no data: set data.train (and data.test to score a test file)")
        self.save_hyperparameters()
        self.paths = {"train": train, "val": val, "test": test}
        self.columns = (_names(prompt_column), _names(response_column), _names(messages_column))
        self.template = ChatTemplate.from_value(template)
        self.system = system
        self.response_values = {str(k): str(v) for k, v in response_values.items()} if response_values else None
        if choices is not None and len(set(choices)) < 2:
            raise ConfigError(f"data.choices={choices} must list at least two distinct answers")
        self.given_choices = [str(choice) for choice in choices] if choices is not None else None
        self.include_prompt_loss, self.packing = include_prompt_loss, packing
        self.max_length, self.batch_size, self.bucket_by_length = max_length, batch_size, bucket_by_length
        self.val_fraction, self.seed, self.num_workers = val_fraction, seed, num_workers
        self.tokenizer_kind, self.vocab_size_target = tokenizer, vocab_size
        self.given_tokenizer = resolve_tokenizer(tokenizer)
        self.contract: DataContract | None = None
        self.tokenizer: Tokenizer | None = None
        self.splits: dict[str, list[Conversation]] = {}
        self.encoded: dict[str, Encoded] = {}
        self.pad_id = 0

    # ------------------------------------------------------------------- the contract
    def accept(self, contract: DataContract) -> None:
        """Take the model's side of the contract (task, context, a pretrained tokenizer)."""
        if contract.task != "causal_lm":
            raise ConfigError(
                f"SFTDataModule trains a causal language model, but the model's task is {contract.task}: "
                "use lmexp.SFT (or lmexp.CausalLM) with a gpt network"
            )
        if self.packing and contract.arch == "lstm":
            raise ConfigError(
                "data.packing=true keeps packed examples apart with attention masks, which an lstm has not: "
                "set data.packing=false for an lstm network"
            )
        self.contract = contract

    def _contract(self) -> DataContract:
        self.contract = bound_contract(self, self.contract)
        if self.contract is None:
            raise ConfigError("the data module was not given the model's contract: call data.accept(model.data_contract())")
        self.accept(self.contract)
        return self.contract

    def resolved_max_length(self) -> int:
        block_size = self._contract().block_size
        return min(self.max_length or block_size, block_size)

    def input_settings(self) -> dict[str, Any]:
        """Saved in checkpoints: how ``lmexp generate``/``prompt``/``predict`` must frame new inputs."""
        return {"kind": "sft", "template": self.template.to_dict(), "system": self.system,
                "response_values": self.response_values, "max_length": self.resolved_max_length()}

    @property
    def vocab_size(self) -> int | None:
        return self.tokenizer.get_vocab_size() if self.tokenizer is not None else None

    @property
    def truncation(self) -> dict[str, Truncation]:
        """What truncation cut, per split: examples cut, prompt and response tokens removed."""
        return {split: encoded.truncation for split, encoded in self.encoded.items()}

    # ------------------------------------------------------------------ evaluation
    def answers(self, split: str) -> list[tuple[str, str]]:
        """(prompt text as ChatTemplate.prompt renders it, expected response) of each example of a split."""
        if split not in self.splits:
            raise DataError(f"there is no {split} data: set data.{split}"
                            + (" or data.val_fraction" if split == "val" else ""))
        return [(self.template.prompt(c.context), c.response) for c in self.splits[split]]

    def answer_messages(self, split: str) -> list[list[Mapping[str, str]]]:
        """The messages before each example's response (what ``answers`` renders as its prompt)."""
        self.answers(split)  # the same refusal when the split is missing
        return [c.context for c in self.splits[split]]

    @property
    def choices(self) -> list[str] | None:
        """The answers of a labelled task: ``data.choices``, else response_values' texts; None for
        open-ended responses (only the generated answer is scored)."""
        if self.given_choices is not None:
            return list(self.given_choices)
        if self.response_values is not None:
            return list(dict.fromkeys(self.response_values.values()))
        return None

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, stage: str | None = None) -> None:
        """Read and encode what ``stage`` needs (fit: train and val; validate: val; test: test only,
        when the tokenizer need not be trained on train); a later stage adds its splits."""
        contract = self._contract()
        wanted = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"], "predict": []}.get(
            stage or "fit", ["train", "val", "test"])
        needs_train = self.tokenizer is None and contract.tokenizer is None and self.given_tokenizer is None
        if needs_train or ("val" in wanted and self.paths["val"] is None):
            wanted = ["train", *wanted]
        for split in dict.fromkeys(wanted):
            if split not in self.splits:
                self._read(split)
        if self.tokenizer is None:
            self.tokenizer = contract.tokenizer or self.given_tokenizer or self._train_tokenizer()
            pad = self.tokenizer.token_to_id(PAD)
            self.pad_id = pad if pad is not None else 0
        max_length = self.resolved_max_length()
        for split, conversations in self.splits.items():
            if split not in self.encoded:
                self.encoded[split] = encode_conversations(self.tokenizer, self.template, conversations, max_length,
                                                           self.include_prompt_loss)
        counts = {split: len(conversations) for split, conversations in self.splits.items()}
        cut = "; ".join(f"{split}: {encoded.truncation.describe()}" for split, encoded in self.encoded.items()
                        if encoded.truncation.pairs)
        rank_zero_info(f"sft data: {counts} examples, max_length {max_length}"
                       f"{', packed' if self.packing else ''}; truncation: {cut or 'none'}")

    def _read(self, split: str) -> None:
        read = lambda path: read_conversations(path, *self.columns, self.system, self.response_values)
        if self.paths[split] is not None:
            self.splits[split] = read(self.paths[split])
        elif split == "train":
            raise ConfigError("SFTDataModule needs data.train to train (or to hold out validation data)")
        elif split == "val" and self.val_fraction > 0:
            data = self.splits["train"]
            order = np.random.default_rng(self.seed).permutation(len(data))
            n_val = max(1, round(len(data) * self.val_fraction))
            held = set(order[:n_val].tolist())
            self.splits["val"] = [c for i, c in enumerate(data) if i in held]
            self.splits["train"] = [c for i, c in enumerate(data) if i not in held]
            self.encoded.pop("train", None)

    def _train_tokenizer(self) -> Tokenizer:
        texts = ["".join(text for text, _ in self.template.segments(c.messages)) for c in self.splits["train"]]
        kind = self.tokenizer_kind
        specials = [*special_tokens_for(kind, "causal_lm"), END_OF_TEXT]  # type: ignore[arg-type]
        tokenizer = train_tokenizer(texts, kind, self.vocab_size_target, specials)  # type: ignore[arg-type]
        tokenizer.encode_special_tokens = True
        return tokenizer

    # -------------------------------------------------------------------- batches
    def _dataset(self, split: str, shuffle: bool) -> SFTBatches:
        if split not in self.encoded:
            setting = {"train": "data.train", "val": "data.val or data.val_fraction", "test": "data.test"}[split]
            raise DataError(f"there is no {split} data: set {setting}")
        encoded = self.encoded[split]
        lengths = [len(ids) for ids in encoded.inputs]
        if self.packing:
            order = np.random.default_rng((self.seed, 2)).permutation(len(lengths)) if shuffle else range(len(lengths))
            rows = pack(lengths, self.resolved_max_length(), order)
            if shuffle:
                fill = sum(lengths) / max(1, len(rows) * self.resolved_max_length())
                rank_zero_info(f"sft data: {len(lengths)} {split} examples packed into {len(rows)} rows of "
                               f"{self.resolved_max_length()} tokens ({fill:.0%} of them real)")
        else:
            rows = [[i] for i in range(len(lengths))]
        trainer = self.trainer
        world_size = trainer.world_size if trainer else 1
        if not shuffle and 0 < len(rows) < world_size:
            raise DataError(f"the {split} split has {len(rows)} rows, fewer than the {world_size} processes: "
                            f"give it at least {world_size} examples")
        return SFTBatches(
            encoded, rows, self.batch_size, self.pad_id, shuffle=shuffle, bucket_by_length=self.bucket_by_length,
            seed=self.seed, rank=trainer.global_rank if trainer else 0, world_size=world_size,
            epoch_fn=(lambda: trainer.current_epoch) if trainer and shuffle else (lambda: 0),
        )

    def _loader(self, dataset: SFTBatches) -> DataLoader:
        return DataLoader(dataset, batch_size=None, num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        dataset = self._dataset("train", shuffle=True)
        if len(dataset) == 0:
            raise DataError(f"the training split has fewer than one batch of {self.batch_size} per device: "
                            "lower data.batch_size")
        position = self.take_resume_position()
        if position is not None:
            dataset.resume_from(*position)
        return self._loader(dataset)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self._dataset("val", shuffle=False)) if "val" in self.encoded else []

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._dataset("test", shuffle=False))
