"""Labelled text for sequence classification: tables in, dynamically padded batches out.

Reading, label mapping and encoding are plain functions, shared by the data module, ``lmexp
predict`` and prompting, so a model sees its inputs framed the same way everywhere.
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from tokenizers import Tokenizer
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lmexp.atomic import write_text
from lmexp.data.contract import DataContract
from lmexp.data.datamodule import ResumableDataModule, bound_contract
from lmexp.data.sources import cell_text, read_rows, table_columns
from lmexp.data.tokenizer import CLS, PAD, SEP, resolve_tokenizer, special_tokens_for, train_tokenizer
from lmexp.errors import ConfigError, DataError, check_positive

IGNORE_LABEL = -100  # no label (prediction input)


@dataclass
class Examples:
    """Rows of a labelled table: texts, optional second texts, labels as written, origins."""

    texts: list[str]
    pairs: list[str] | None
    labels: list[str] | None
    origins: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, index: Sequence[int]) -> Examples:
        pick = lambda values: [values[i] for i in index] if values is not None else None  # noqa: E731
        return Examples(pick(self.texts), pick(self.pairs), pick(self.labels), pick(self.origins))


def _as_list(columns: str | Sequence[str] | None) -> list[str]:
    if columns is None:
        return []
    return [columns] if isinstance(columns, str) else list(columns)


def _pick_column(path: Path, columns: list[str], candidates: list[str], setting: str, what: str) -> str:
    for name in candidates:
        if name in columns:
            return name
    names = candidates[0] if len(candidates) == 1 else f"any of {candidates}"
    raise DataError(
        f"{path} has no {what} column {names} (columns: {', '.join(columns) or 'none'}): "
        f"add the file's column name to {setting}"
    )


def read_examples(
    path: str | Path,
    text_column: str | Sequence[str] = ("text", "sentence"),
    text_pair_column: str | Sequence[str] | None = None,
    label_column: str | None = "label",
) -> Examples:
    """Read a ``.tsv``/``.csv``/``.jsonl`` table of labelled (or, with no label column, raw) texts.

    Column settings may list several names: each file uses the first it has (SST-2 calls its
    text ``sentence`` in train and ``content`` in dev). Empty texts and missing labels are errors
    naming the row, not silently skipped rows.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{str(path)!r} does not exist: pass a .tsv, .csv or .jsonl file")
    columns = table_columns(path)
    text = _pick_column(path, columns, _as_list(text_column), "data.text_column", "text")
    pair = None
    if text_pair_column is not None:
        candidates = _as_list(text_pair_column)
        if not any(name in columns for name in candidates):
            raise DataError(
                f"{path} has no second text column {candidates} (columns: {', '.join(columns)}): it holds "
                "single texts; remove data.text_pair_column, or name the file's second text column"
            )
        pair = _pick_column(path, columns, candidates, "data.text_pair_column", "second text")
    label = _pick_column(path, columns, [label_column], "data.label_column", "label") if label_column else None
    examples = Examples([], [] if pair else None, [] if label else None)
    for origin, row in read_rows(path):
        for column in (text, pair):
            if column is not None and not cell_text(row.get(column)).strip():
                raise DataError(f"{origin} has an empty {column!r} cell: fill in the text or remove the row")
        examples.texts.append(cell_text(row[text]))
        if pair is not None:
            examples.pairs.append(cell_text(row[pair]))
        if label is not None:
            value = cell_text(row.get(label)).strip()
            if not value:
                raise DataError(f"{origin} has no {label!r} value: label the row or remove it")
            examples.labels.append(value)
        examples.origins.append(origin)
    if not examples.texts:
        raise DataError(f"{path} has no rows: give a file with a header and at least one example")
    return examples


def label_order(labels: Sequence[str]) -> list[str]:
    """The label set in a stable order: numerically when every label is an integer (0, 1, 2),
    else alphabetically."""
    unique = set(labels)
    if all(label.lstrip("-").isdigit() for label in unique):
        return sorted(unique, key=int)
    return sorted(unique)


def label_ids(examples: Examples, labels: list[str], where: str) -> list[int]:
    """Map labels as written to ids; a label outside the trained set is an error naming it."""
    index = {label: i for i, label in enumerate(labels)}
    ids = []
    for value, origin in zip(examples.labels or [], examples.origins):
        if value not in index:
            raise DataError(
                f"{origin} has label {value!r}, which {where} does not know (labels: {', '.join(labels)}): "
                "fix the label, or train with it (data.labels lists the label set)"
            )
        ids.append(index[value])
    return ids


def write_predictions_csv(
    path: str | Path,
    examples: Examples,
    label_names: Sequence[str],
    predictions: Sequence[str],
    probabilities: torch.Tensor,
    labels: Sequence[str] | None = None,
) -> Path:
    """Write text (text_pair), label, prediction and one ``p_<label>`` column per label.

    ``lmexp predict`` and ``lmexp prompt`` write the same table, so their outputs compare
    column by column. ``labels`` (as written in the input) adds the label column.
    """
    path = Path(path).expanduser()
    table = io.StringIO(newline="")
    writer = csv.writer(table)
    header = ["text"] + (["text_pair"] if examples.pairs is not None else [])
    header += ["label"] if labels is not None else []
    writer.writerow(header + ["prediction"] + [f"p_{label}" for label in label_names])
    for i, text in enumerate(examples.texts):
        row = [text] + ([examples.pairs[i]] if examples.pairs is not None else [])
        row += [labels[i]] if labels is not None else []
        writer.writerow(row + [predictions[i]] + [f"{p:.6f}" for p in probabilities[i].tolist()])
    write_text(path, table.getvalue())  # whole or not at all: an earlier table survives a failure
    return path


@dataclass(frozen=True)
class InputFraming:
    """How texts become model inputs: what ``lmexp predict`` must repeat exactly."""

    arch: str
    max_length: int
    text_column: list[str]
    text_pair_column: list[str] | None = None
    label_column: str | None = "label"

    def to_dict(self) -> dict[str, Any]:
        return {"arch": self.arch, "max_length": self.max_length, "text_column": self.text_column,
                "text_pair_column": self.text_pair_column, "label_column": self.label_column}


def encode_examples(
    tokenizer: Tokenizer, texts: Sequence[str], pairs: Sequence[str] | None, arch: str, max_length: int
) -> list[tuple[list[int], list[int]]]:
    """(token ids, segment ids) per example, truncated to ``max_length`` tokens.

    BERT: ``[CLS] text [SEP]`` (``[CLS] a [SEP] b [SEP]`` for pairs, the longer side cut first).
    GPT: the text (pairs joined by a newline), cut at the end; its classifier reads the last
    token, so nothing follows the text.
    """
    encode = lambda batch: [e.ids for e in tokenizer.encode_batch(list(batch), add_special_tokens=False)]  # noqa: E731
    firsts = encode(texts)
    seconds = encode(pairs) if pairs is not None else [None] * len(firsts)
    if arch == "bert":
        cls, sep = tokenizer.token_to_id(CLS), tokenizer.token_to_id(SEP)
        if cls is None or sep is None:
            raise ConfigError(f"a bert classifier needs {CLS} and {SEP} in its tokenizer: train it with tokenizer wordpiece")
        framing = [cls, sep] if pairs is None else [cls, sep, sep]
    else:
        newline = tokenizer.encode("\n", add_special_tokens=False).ids
        framing = newline if pairs is not None else []
    budget = max_length - len(framing)
    if budget < 2:
        raise ConfigError(f"data.max_length={max_length} leaves no room for text: use at least {len(framing) + 2}")
    encoded = []
    for first, second in zip(firsts, seconds):
        if second is None:
            first = first[:budget]
        else:
            while len(first) + len(second) > budget:  # longest first, as BERT does
                if len(first) >= len(second):
                    first = first[:-1]
                else:
                    second = second[:-1]
        if arch == "bert":
            ids = [cls, *first, sep] + ([*second, sep] if second is not None else [])
            types = [0] * (len(first) + 2) + ([1] * (len(second) + 1) if second is not None else [])
        else:
            ids = first + (framing + second if second is not None else [])
            types = [0] * len(ids)
        encoded.append((ids, types))
    return encoded


def pad_batch(encoded: Sequence[tuple[list[int], list[int]]], labels: Sequence[int] | None, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest member (dynamic padding), with the attention mask."""
    length = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), length), pad_id, dtype=torch.long)
    types = torch.zeros((len(encoded), length), dtype=torch.long)
    mask = torch.zeros((len(encoded), length), dtype=torch.long)
    for row, (ids, segment) in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        types[row, : len(ids)] = torch.tensor(segment)
        mask[row, : len(ids)] = 1
    batch = {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": types}
    batch["labels"] = torch.tensor(list(labels) if labels is not None else [IGNORE_LABEL] * len(encoded))
    return batch


class ClassificationBatches(IterableDataset):
    """Batches of encoded examples, padded to their longest member, resumable mid-epoch.

    Training shuffles every epoch (seeded by seed and epoch); with ``bucket_by_length`` it sorts
    each chunk of 50 batches by length before cutting batches, so little padding is computed,
    and then shuffles the batch order. Each rank takes every ``world_size``-th batch; training
    drops the ranks' remainder so DDP ranks step together, evaluation keeps every example.
    """

    def __init__(
        self,
        encoded: list[tuple[list[int], list[int]]],
        labels: list[int] | None,
        batch_size: int,
        pad_id: int,
        *,
        shuffle: bool,
        bucket_by_length: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        epoch_fn: Any = lambda: 0,
    ) -> None:
        self.encoded, self.labels = encoded, labels
        self.batch_size, self.pad_id = batch_size, pad_id
        self.shuffle, self.bucket_by_length, self.seed = shuffle, bucket_by_length, seed
        self.rank, self.world_size, self.epoch_fn = rank, world_size, epoch_fn
        self._resume: tuple[int, int] | None = None

    def _batches(self, epoch: int) -> list[np.ndarray]:
        n = len(self.encoded)
        rng = np.random.default_rng((self.seed, epoch))
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        if self.bucket_by_length:
            chunk = self.batch_size * 50
            lengths = np.array([len(ids) for ids, _ in self.encoded])
            order = np.concatenate([
                part[np.argsort(lengths[part], kind="stable")] for part in np.split(order, range(chunk, n, chunk))
            ]) if n else order
        size = self._batch_size()
        batches = [order[i : i + size] for i in range(0, n, size)]
        if self.shuffle and self.bucket_by_length:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        if self.shuffle:  # equal counts per rank: DDP ranks must step together
            batches = batches[: len(batches) // self.world_size * self.world_size]
        return batches[self.rank :: self.world_size]

    def _batch_size(self) -> int:
        """Training batches hold batch_size examples. Evaluation batches of a split too small to
        give every DDP rank a batch are smaller, so that each rank gets one (a rank with none
        stops Lightning)."""
        if self.shuffle:
            return self.batch_size
        return max(1, min(self.batch_size, -(-len(self.encoded) // self.world_size)))

    def __len__(self) -> int:
        n_batches = -(-len(self.encoded) // self._batch_size())
        if self.shuffle:
            return n_batches // self.world_size
        return len(range(self.rank, n_batches, self.world_size))

    def resume_from(self, epoch: int, batches_done: int) -> None:
        self._resume = (epoch, batches_done)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        epoch = self.epoch_fn()
        first = self._resume[1] if self._resume is not None and self._resume[0] == epoch else 0
        self._resume = None
        # With DataLoader workers, worker w of k yields every k-th batch; the loader takes them
        # round-robin, so the order is the same as without workers.
        worker = get_worker_info()
        worker_id, n_workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        for index in self._batches(epoch)[first + worker_id :: n_workers]:
            yield self.collate(index)

    def collate(self, index: np.ndarray) -> dict[str, torch.Tensor]:
        """The batch of the examples at ``index``: padded, with their labels (a subclass frames its own)."""
        labels = [self.labels[i] for i in index] if self.labels is not None else None
        return pad_batch([self.encoded[i] for i in index], labels, self.pad_id)


class ClassificationDataModule(ResumableDataModule):
    """Labelled text from tables: single texts or sentence pairs, for ``SequenceClassification``.

    The tokenizer comes from the pretrained model (``model.pretrained``) when there is one, so
    fine-tuning sees text exactly as pre-training did; otherwise one is trained on the training
    texts (or read from a ``tokenizer.json``). Labels are mapped to ids in a stable order and
    stored with the model, so predictions come back as the labels of the file.

    Args:
        train: Training table (``.tsv``, ``.csv`` or ``.jsonl``).
        val: Validation table; without one, ``val_fraction`` of ``train`` is held out.
        test: Test table (``lmexp test``), e.g. a benchmark's dev set.
        text_column: The text's column, or several names of which each file uses the first it has.
        text_pair_column: The second text's column for sentence-pair tasks (entailment,
            paraphrase); ``None`` for single texts.
        label_column: The label's column.
        labels: The label set in id order (default: the training labels, numerically or
            alphabetically sorted).
        max_length: Tokens per example at most (framing included); longer texts are cut.
            ``None``: the model's context.
        batch_size: Examples per batch on each device.
        bucket_by_length: Batch examples of similar length together (less padding, faster),
            in shuffled batch order.
        val_fraction: Share of ``train`` held out for validation when ``val`` is not given.
        train_subset: Train on this many examples of the training split only (seeded choice):
            learning curves, or how a method does with few labels.
        num_folds: K-fold cross-validation: ``lmexp fit`` trains K runs, each validating on one
            fold of ``train`` and training on the rest, and reports the mean and spread.
        fold: The fold this run validates on (set by cross-validation; 0 .. num_folds-1).
        tokenizer: ``wordpiece``, ``bpe`` or ``char`` to train one on the training texts, or a
            ``tokenizer.json`` path; ignored when the model is pretrained (its own is used).
        vocab_size: Vocabulary size of a tokenizer trained here.
        seed: Seed of the validation split, the folds and the batch order.
        num_workers: DataLoader workers.
    """

    tokenizer_from_model: ClassVar[bool] = True  # a checkpoint's tokenizer encodes the data it is run on

    def __init__(
        self,
        train: str,
        val: str | None = None,
        test: str | None = None,
        text_column: str | list[str] = "text",
        text_pair_column: str | list[str] | None = None,
        label_column: str = "label",
        labels: list[str] | None = None,
        max_length: int | None = None,
        batch_size: int = 32,
        bucket_by_length: bool = False,
        val_fraction: float = 0.1,
        train_subset: int | None = None,
        num_folds: int = 1,
        fold: int | None = None,
        tokenizer: str = "wordpiece",
        vocab_size: int = 8192,
        seed: int = 1337,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        check_positive("data.batch_size", batch_size)
        check_positive("data.num_folds", num_folds)
        if train_subset is not None:
            check_positive("data.train_subset", train_subset)
        if max_length is not None:
            check_positive("data.max_length", max_length)
        if not 0.0 <= val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction={val_fraction} must be in [0, 1), e.g. 0.1")
        if fold is not None and not 0 <= fold < num_folds:
            raise ConfigError(f"data.fold={fold} must be in [0, {num_folds - 1}] for data.num_folds={num_folds}")
        if num_folds > 1 and val is not None:
            raise ConfigError("data.num_folds > 1 validates on folds of train: remove data.val")
        if labels is not None and len(set(labels)) < 2:
            raise ConfigError(f"data.labels={labels} must list at least two distinct labels")
        self.save_hyperparameters()
        self.train_path, self.val_path, self.test_path = train, val, test
        self.text_column = _as_list(text_column)
        self.text_pair_column = _as_list(text_pair_column) or None
        self.label_column = label_column
        self.given_labels = [str(label) for label in labels] if labels is not None else None
        self.max_length, self.batch_size, self.bucket_by_length = max_length, batch_size, bucket_by_length
        self.val_fraction, self.num_folds, self.fold = val_fraction, num_folds, fold
        self.train_subset = train_subset
        self.tokenizer_kind, self.vocab_size_target = tokenizer, vocab_size
        self.given_tokenizer = resolve_tokenizer(tokenizer)
        self.seed, self.num_workers = seed, num_workers
        self.contract: DataContract | None = None
        self.tokenizer: Tokenizer | None = None
        self.labels: list[str] | None = None
        self.splits: dict[str, Examples] = {}
        self._encoded: dict[str, list[tuple[list[int], list[int]]]] = {}

    # ------------------------------------------------------------------- the contract
    def accept(self, contract: DataContract) -> None:
        """Take the model's side of the contract (task, context, a pretrained tokenizer)."""
        if contract.task != "classification":
            raise ConfigError(
                f"ClassificationDataModule serves classification, but the model's task is {contract.task}: "
                "use lmexp.SequenceClassification as the model, or lmexp.TextDataModule for language modelling"
            )
        self.contract = contract

    def _contract(self) -> DataContract:
        self.contract = bound_contract(self, self.contract)
        if self.contract is None:
            raise ConfigError("the data module was not given the model's contract: call data.accept(model.data_contract())")
        return self.contract

    def framing(self) -> InputFraming:
        contract = self._contract()
        max_length = min(self.max_length or contract.block_size, contract.block_size)
        return InputFraming(contract.arch, max_length, self.text_column, self.text_pair_column, self.label_column)

    def input_settings(self) -> dict[str, Any]:
        """Saved in checkpoints: how ``lmexp predict`` must read and encode new inputs."""
        return self.framing().to_dict()

    @property
    def vocab_size(self) -> int | None:
        return self.tokenizer.get_vocab_size() if self.tokenizer is not None else None

    def class_counts(self) -> list[int] | None:
        """Training examples per label, in label order (for balanced class weights); None when no
        training split was read (an evaluation, whose metrics the loss weights do not change)."""
        if "train" not in self.splits:
            return None
        counts = Counter(label_ids(self.splits["train"], self.labels or [], "the training set"))
        return [counts.get(i, 0) for i in range(len(self.labels or []))]

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, stage: str | None = None) -> None:
        """Read, split and encode the tables. An evaluation (``test``, or ``validate`` with a
        ``val`` file) reads only its own table when the model already fixes the labels and the
        tokenizer (a trained checkpoint does): scoring 872 test sentences does not read or
        tokenize a training set, which need not even be there."""
        split = {"test": "test", "validate": "val"}.get(stage or "")
        if self.tokenizer is not None and ("train" in self.splits or split in self.splits):
            return  # set up already (an evaluation's own table only: a fit after it reads everything)
        contract = self._contract()
        if split == "test" and self.test_path is None:
            raise DataError("there is no test data: set data.test")
        read = lambda path: read_examples(path, self.text_column, self.text_pair_column, self.label_column)  # noqa: E731
        labels = self.given_labels or (list(contract.labels) if contract.labels else None)
        tokenizer = contract.tokenizer or self.given_tokenizer
        path = {"test": self.test_path, "val": self.val_path}.get(split or "")
        if path is not None and labels is not None and tokenizer is not None:
            self.splits = {split: read(path)}
            self.labels, self.tokenizer = labels, tokenizer
        else:
            self._read_all(read)
            self.tokenizer = tokenizer or self._train_tokenizer(contract)
        framing = self.framing()
        pad_id = self.tokenizer.token_to_id(PAD)
        self.pad_id = pad_id if pad_id is not None else 0
        for name, examples in self.splits.items():
            self._encoded[name] = encode_examples(self.tokenizer, examples.texts, examples.pairs, framing.arch,
                                                  framing.max_length)
        counts = {name: len(examples) for name, examples in self.splits.items()}
        rank_zero_info(f"classification data: {counts} examples, labels {self.labels}, max_length {framing.max_length}")

    def _read_all(self, read: Any) -> None:
        """Every split: train (with its held-out part or folds), val and test; the labels."""
        self.splits = self._split(read(self.train_path))
        if self.train_subset is not None and self.train_subset < len(self.splits["train"]):
            pick = np.random.default_rng((self.seed, 1)).permutation(len(self.splits["train"]))[: self.train_subset]
            self.splits["train"] = self.splits["train"].subset(np.sort(pick))
        if self.val_path is not None:
            self.splits["val"] = read(self.val_path)
        if self.test_path is not None:
            self.splits["test"] = read(self.test_path)
        self.labels = self.given_labels or label_order(self.splits["train"].labels or [])
        if len(self.labels) < 2:
            raise DataError(f"{self.train_path} has one label ({self.labels[0]}): classification needs at least two")

    def _split(self, data: Examples) -> dict[str, Examples]:
        order = np.random.default_rng(self.seed).permutation(len(data))
        if self.num_folds > 1:
            fold = self.fold or 0
            held = np.sort(order[fold :: self.num_folds])
            kept = np.sort(np.setdiff1d(order, held))
            return {"train": data.subset(kept), "val": data.subset(held)}
        if self.val_path is not None or self.val_fraction == 0:
            return {"train": data}
        n_val = max(1, round(len(data) * self.val_fraction))
        return {"train": data.subset(np.sort(order[n_val:])), "val": data.subset(np.sort(order[:n_val]))}

    def _train_tokenizer(self, contract: DataContract) -> Tokenizer:
        train = self.splits["train"]
        texts = train.texts + (train.pairs or [])
        kind = self.tokenizer_kind
        tokenizer = train_tokenizer(texts, kind, self.vocab_size_target, special_tokens_for(kind, "classification"))
        tokenizer.encode_special_tokens = True
        return tokenizer

    # -------------------------------------------------------------------- batches
    def _dataset(self, split: str, shuffle: bool) -> ClassificationBatches:
        if split not in self.splits:
            setting = {"val": "data.val or data.val_fraction", "test": "data.test"}[split]
            raise DataError(f"there is no {split} data: set {setting}")
        trainer = self.trainer
        known = "the training set" if "train" in self.splits else "the model"
        labels = label_ids(self.splits[split], self.labels or [], known)
        world_size = trainer.world_size if trainer else 1
        if not shuffle and 0 < len(self._encoded[split]) < world_size:
            raise DataError(f"the {split} split has {len(self._encoded[split])} examples, fewer than the {world_size} "
                            f"processes: give it at least {world_size}")
        return ClassificationBatches(
            self._encoded[split], labels, self.batch_size, self.pad_id, shuffle=shuffle,
            bucket_by_length=self.bucket_by_length, seed=self.seed,
            rank=trainer.global_rank if trainer else 0, world_size=world_size,
            epoch_fn=(lambda: trainer.current_epoch) if trainer and shuffle else (lambda: 0),
        )

    def _loader(self, dataset: ClassificationBatches) -> DataLoader:
        return DataLoader(dataset, batch_size=None, num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        dataset = self._dataset("train", shuffle=True)
        if len(dataset) == 0:
            raise DataError(f"the training split has fewer than one batch of {self.batch_size} per device: lower data.batch_size")
        position = self.take_resume_position()
        if position is not None:
            dataset.resume_from(*position)
        return self._loader(dataset)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self._dataset("val", shuffle=False)) if "val" in self.splits else []

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._dataset("test", shuffle=False))

