"""TextDataModule: raw text in, resumable token batches out."""

from __future__ import annotations

from pathlib import Path
from typing import Any, get_args

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from tokenizers import Tokenizer
from torch.utils.data import DataLoader

from lmexp.data.batches import BatchTransform, TokenBatches, causal_lm_batch, count_windows
from lmexp.data.cache import PrepareReport, TokenCache, build_token_cache, prepare_token_cache
from lmexp.data.cleaning import Dedupe, Normalization
from lmexp.data.contract import DataContract, Task
from lmexp.data.masking import MLMBatchTransform
from lmexp.data.sources import lmexp_cache_dir, source_fingerprint
from lmexp.data.tokenizer import resolve_tokenizer, special_tokens_for, tokenizer_identity
from lmexp.data.windows import SlidingWindowBatches
from lmexp.errors import ConfigError, DataError, check_choice, check_positive
from lmexp.lightning_internals import batches_processed

LM_TASKS = ("causal_lm", "masked_lm")


def bound_contract(datamodule: pl.LightningDataModule, given: DataContract | None) -> DataContract | None:
    """The contract a data module was handed, else the one its trainer's objective states (for
    plain ``trainer.fit(model, datamodule)`` use, where nobody calls ``accept``)."""
    if given is not None:
        return given
    trainer = datamodule.trainer
    module = trainer.lightning_module if trainer is not None else None
    return module.data_contract() if hasattr(module, "data_contract") else None


class ResumableDataModule(pl.LightningDataModule):
    """Saves where training stands in the data in every checkpoint, so a resumed run skips
    exactly the batches already trained on (the data sets skip them in ``resume_from``)."""

    _resume: tuple[int, int] | None = None  # (epoch, batches done) to skip on the next train loader

    def state_dict(self) -> dict[str, Any]:
        trainer = self.trainer
        if trainer is None:
            return {}
        return {"epoch": trainer.current_epoch, "batches_done": batches_processed(trainer)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            self._resume = (int(state_dict["epoch"]), int(state_dict["batches_done"]))

    def take_resume_position(self) -> tuple[int, int] | None:
        """The position to resume from, once: later epochs start at their beginning."""
        position, self._resume = self._resume, None
        return position


class TextDataModule(ResumableDataModule):
    """Clean a text corpus, train a tokenizer, cache token ids, and serve batches.

    The task (causal or masked LM), the block size and a pretrained model's tokenizer come from
    the objective's ``DataContract`` unless set here, so they are never typed twice.
    ``prepare_data`` does the expensive work once per node; every rank then memory-maps the same
    cache and reads its own share of the batches.

    Args:
        source: A text file, folder or glob (plain text, ``.jsonl``, ``.csv``, ``.tsv``,
            ``.parquet``, each also gzip or zstd compressed), or a built-in corpus:
            ``python-docs`` (offline, the default), ``python-stdlib``, ``tinyshakespeare``.
        train: Explicit training files (a path, folder or glob), instead of ``source``.
        val: Explicit validation files, used as given (``val_fraction`` then carves nothing).
        test: Explicit test files, used as given (``test_fraction`` then carves nothing).
        text_column: Field or column that holds the text in JSONL/CSV/TSV/Parquet input.
        tokenizer: ``char``, ``bpe`` (byte-level) or ``wordpiece`` to train one on the training
            split, or the path of a ``tokenizer.json`` to use as it is. A pretrained model's own
            tokenizer (``model.pretrained``) always wins.
        vocab_size: Target vocabulary size for ``bpe``/``wordpiece`` (``char`` uses its alphabet).
        batch_size: Samples per batch on each device.
        block_size: Tokens per sample; ``None`` takes the model's context length.
        task: ``causal_lm`` or ``masked_lm``; ``None`` takes the model's.
        val_fraction: Share of documents held out for validation.
        test_fraction: Share of documents held out for testing.
        seed: Seed of the split and of the batch order.
        normalization: Unicode normalization applied while cleaning.
        min_chars: Documents shorter than this are dropped.
        dedupe: Drop exact-duplicate ``documents`` (default), also repeated ``lines``, or ``none``.
        mlm_probability: Share of tokens selected for masked LM.
        sentence_order: Add sentence-order prediction labels (masked LM only).
        cache_dir: Where token caches live; default ``$LMEXP_CACHE_DIR`` or ``~/.cache/lmexp``.
        shard_mb: Source megabytes per cache shard: the unit of parallel building (and of exact
            de-duplication). Changing it builds a new cache.
        tokenizer_sample_mb: Megabytes of train text the tokenizer is trained on, drawn from
            every shard (a smaller corpus is used whole).
        workers: Processes that build the cache; ``None`` uses every core.
        num_workers: DataLoader workers; 0 is fastest here since batches are memory-map slices.
        eval_stride: Causal LM validation and test slide a window of ``block_size`` tokens over
            the whole split, this many tokens at a time, and score every token exactly once
            with at least ``block_size - eval_stride + 1`` tokens of context. ``None`` (default)
            is ``block_size``: disjoint windows, fastest; smaller strides cost more and give
            the honest long-context loss (1: every token with full context).
    """

    def __init__(
        self,
        source: str | None = None,
        train: str | None = None,
        val: str | None = None,
        test: str | None = None,
        text_column: str = "text",
        tokenizer: str = "char",
        vocab_size: int = 4096,
        batch_size: int = 12,
        block_size: int | None = None,
        task: Task | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.0,
        seed: int = 1337,
        normalization: Normalization = "NFC",
        min_chars: int = 1,
        dedupe: Dedupe = "documents",
        mlm_probability: float = 0.15,
        sentence_order: bool = False,
        cache_dir: str | None = None,
        num_workers: int = 0,
        eval_stride: int | None = None,
        shard_mb: float = 16,
        tokenizer_sample_mb: float = 100,
        workers: int | None = None,
    ) -> None:
        super().__init__()
        if source is not None and train is not None:
            raise ConfigError(
                f"data.source={source!r} and data.train={train!r} both name the training text: give one of them"
            )
        for name, value in (("shard_mb", shard_mb), ("tokenizer_sample_mb", tokenizer_sample_mb)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"data.{name}={value!r} must be a positive number of megabytes, e.g. 16")
        if workers is not None:
            check_positive("data.workers", workers)
        for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"data.{name}={value} must be in [0, 1), e.g. 0.1")
        if val_fraction + test_fraction >= 1.0:
            raise ConfigError(
                f"data.val_fraction + data.test_fraction = {val_fraction + test_fraction} leaves no "
                "training data: keep their sum below 1"
            )
        given_tokenizer = resolve_tokenizer(tokenizer)
        check_choice("data.normalization", normalization, get_args(Normalization))
        check_choice("data.dedupe", dedupe, get_args(Dedupe))
        if task is not None:
            check_choice("data.task", task, LM_TASKS)
        if eval_stride is not None:
            check_positive("data.eval_stride", eval_stride)
        for name, value in (("batch_size", batch_size), ("vocab_size", vocab_size), ("min_chars", min_chars)):
            check_positive(f"data.{name}", value)
        if block_size is not None:
            check_positive("data.block_size", block_size)
        if num_workers < 0:
            raise ConfigError(f"data.num_workers={num_workers} is negative: use 0 (no worker processes) or more")
        if not 0.0 < mlm_probability < 1.0:
            raise ConfigError(f"data.mlm_probability={mlm_probability} must be in (0, 1), typically 0.15")
        self.save_hyperparameters()
        self.source = train or source or "python-docs"
        self.split_sources = {split: path for split, path in (("val", val), ("test", test)) if path is not None}
        self.shard_mb = shard_mb
        self.tokenizer_sample_mb = tokenizer_sample_mb
        self.workers = workers
        self.text_column = text_column
        self.tokenizer_kind = tokenizer
        self.vocab_size_target = vocab_size
        self.batch_size = batch_size
        self.block_size = block_size
        self.task = task
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed
        self.normalization = normalization
        self.min_chars = min_chars
        self.dedupe = dedupe
        self.mlm_probability = mlm_probability
        self.sentence_order = sentence_order
        self.cache_root = Path(cache_dir) if cache_dir else lmexp_cache_dir() / "tokens"
        self.num_workers = num_workers
        self.eval_stride = eval_stride
        self.given_tokenizer = given_tokenizer
        self.contract: DataContract | None = None
        self.cache: TokenCache | None = None

    def has_val_split(self) -> bool:
        return "val" in self.split_sources or self.val_fraction > 0

    def accept(self, contract: DataContract) -> None:
        """Take the model's side of the contract (task, context, a pretrained tokenizer)."""
        if contract.task not in LM_TASKS:
            raise ConfigError(
                f"TextDataModule serves language modelling, but the model's task is {contract.task}: "
                "use lmexp.ClassificationDataModule for classification"
            )
        self.contract = contract

    # ----------------------------------------------------------------- what the model needs
    def _contract(self) -> DataContract | None:
        self.contract = bound_contract(self, self.contract)
        return self.contract

    def resolved_task(self) -> Task:
        contract = self._contract()
        task = self.task or (contract.task if contract else None)
        if task is None:
            raise ConfigError("data.task is not set and the model does not declare one: set data.task")
        return task

    def resolved_block_size(self) -> int:
        contract = self._contract()
        block_size = self.block_size or (contract.block_size if contract else None)
        if block_size is None:
            raise ConfigError("data.block_size is not set and the model does not declare one: set data.block_size")
        return int(block_size)

    def encoding_tokenizer(self) -> Tokenizer | None:
        """The tokenizer to encode with as it is (a pretrained model's, or a given file); None
        means one is trained on the training split."""
        contract = self._contract()
        return contract.tokenizer if contract and contract.tokenizer is not None else self.given_tokenizer

    def cache_settings(self) -> dict[str, Any]:
        task = self.resolved_task()
        given = self.encoding_tokenizer()
        exclude = (self.cache_root,)
        return {
            "source": self.source,
            "fingerprint": source_fingerprint(self.source, exclude=exclude),
            "split_files": {
                split: {"source": path, "fingerprint": source_fingerprint(path, exclude=exclude)}
                for split, path in self.split_sources.items()
            },
            "shard_mb": self.shard_mb,
            "tokenizer_sample_mb": self.tokenizer_sample_mb,
            "text_column": self.text_column,
            "normalization": self.normalization,
            "min_chars": self.min_chars,
            "dedupe": self.dedupe,
            "val_fraction": 0.0 if "val" in self.split_sources else self.val_fraction,
            "test_fraction": 0.0 if "test" in self.split_sources else self.test_fraction,
            "seed": self.seed,
            "tokenizer": tokenizer_identity(given) if given is not None else self.tokenizer_kind,
            "vocab_size": None if given is not None else self.vocab_size_target,
            "special_tokens": [] if given is not None else special_tokens_for(self.tokenizer_kind, task),
        }

    # ------------------------------------------------------------------ Lightning hooks
    def prepare_data(self) -> None:
        self._preflight()
        build_token_cache(self.cache_root, self.cache_settings(), log=rank_zero_info,
                          tokenizer=self.encoding_tokenizer(), workers=self.workers)

    def prepare_cache(
        self, part: tuple[int, int] | None = None, workers: int | None = None, log: Any = print
    ) -> PrepareReport:
        """Build this data's token cache ahead of training, or the shards ``part`` = (k, N) names
        (every N-th, from the k-th) so that N machines sharing ``cache_dir`` build it together."""
        self._preflight()
        return prepare_token_cache(self.cache_root, self.cache_settings(), log=log, tokenizer=self.encoding_tokenizer(),
                                   part=part, workers=workers or self.workers)

    def setup(self, stage: str | None = None) -> None:
        if self.cache is None:
            self.cache = build_token_cache(
                self.cache_root, self.cache_settings(), log=lambda _: None, tokenizer=self.encoding_tokenizer(),
                workers=self.workers,
            )
        self._check_sizes()
        needed = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"]}.get(stage or "fit", [])
        if not self.has_val_split() and stage in ("fit", None):
            needed.remove("val")  # training without validation
        window, stride = self._window()
        ranks = self.trainer.world_size if self.trainer else 1
        for split in needed:
            tokens = self.cache.meta["splits"][split]["tokens"]
            if count_windows(tokens, window, stride) < ranks:
                fraction = {"train": "", "val": " or a larger data.val_fraction", "test": " or a larger data.test_fraction"}
                raise DataError(
                    f"the {split} split has {tokens} tokens, fewer than one sample of {window} "
                    f"(block_size={self.resolved_block_size()}) for each of {ranks} device(s): use more text, "
                    f"a smaller block_size{fraction[split]}"
                )

    def _preflight(self) -> None:
        """Settings that need no data fail before a long build, not after it. The cache itself
        does not depend on the block size: without one (no model bound yet) there is nothing to check."""
        contract = self._contract()
        if self.block_size is None and (contract is None or contract.block_size is None):
            return
        if self.task is None and contract is None:
            return
        self._check_sizes()

    def _check_sizes(self) -> None:
        block_size = self.resolved_block_size()
        contract = self._contract()
        model_block_size = contract.block_size if contract else None
        if model_block_size is not None and block_size > model_block_size:
            raise ConfigError(
                f"data.block_size={block_size} exceeds the model's context of {model_block_size} tokens: "
                "lower data.block_size or leave it unset to use the model's"
            )
        if self.resolved_task() == "masked_lm":
            framing = MLMBatchTransform.framing_tokens(self.sentence_order)
            if block_size < framing + 2:
                raise ConfigError(
                    f"block_size={block_size} leaves no room for text around the {framing} [CLS]/[SEP] tokens "
                    f"of masked LM: use a block_size of at least {framing + 2}"
                )
        elif self.sentence_order:
            raise ConfigError("data.sentence_order applies to masked LM only: remove it or train MaskedLM")

    @property
    def tokenizer(self) -> Tokenizer | None:
        """The trained tokenizer; None until setup() has run."""
        return self.cache.tokenizer if self.cache is not None else None

    @property
    def vocab_size(self) -> int | None:
        return self.cache.tokenizer.get_vocab_size() if self.cache is not None else None

    def bytes_per_token(self, split: str = "val") -> float:
        """UTF-8 bytes per token, to turn nats per token into bits per byte."""
        assert self.cache is not None
        return self.cache.bytes_per_token(split)

    # -------------------------------------------------------------------- batches
    def _transform(self, training: bool) -> BatchTransform:
        if self.resolved_task() != "masked_lm":
            return causal_lm_batch
        # Training: each rank draws its own masks (batch indices repeat across ranks).
        # Evaluation: one fixed draw, so val/loss compares across epochs and world sizes.
        rank = self.trainer.global_rank if self.trainer and training else 0
        assert self.cache is not None
        tokenizer = self.cache.tokenizer
        specials = [t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special]
        return MLMBatchTransform(
            tokenizer.get_vocab(), self.mlm_probability, self.sentence_order, self.seed + 7919 * rank,
            special_tokens=specials,
        )

    def _window(self) -> tuple[int, int]:
        """(tokens fetched per sample, distance between samples)."""
        block_size = self.resolved_block_size()
        if self.resolved_task() == "masked_lm":
            framing = MLMBatchTransform.framing_tokens(self.sentence_order)
            return block_size - framing, block_size - framing
        return block_size + 1, block_size  # inputs and shifted labels share all but one token

    def _batches(self, split: str, shuffle: bool) -> TokenBatches:
        assert self.cache is not None
        window, stride = self._window()
        trainer = self.trainer
        epoch_fn = (lambda: trainer.current_epoch) if trainer and shuffle else (lambda: 0)
        return TokenBatches(
            self.cache.tokens(split),
            window,
            stride,
            self.batch_size,
            shuffle=shuffle,
            seed=self.seed,
            rank=trainer.global_rank if trainer else 0,
            world_size=trainer.world_size if trainer else 1,
            transform=self._transform(training=shuffle),
            epoch_fn=epoch_fn,
        )

    def _loader(self, dataset: TokenBatches) -> DataLoader:
        # Workers are started anew each epoch (not persistent) so their copy of the dataset
        # sees the current epoch and resume position. The loader's own generator keeps it from
        # drawing from the global RNG, which a resumed run must find as it was saved.
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(dataset, batch_size=None, num_workers=self.num_workers, generator=generator)

    def train_dataloader(self) -> DataLoader:
        batches = self._batches("train", shuffle=True)
        if len(batches) == 0:
            raise DataError(
                f"the train split has too few tokens for one batch of {self.batch_size} x "
                f"{self.resolved_block_size()}: lower data.batch_size or block_size, or add text"
            )
        position = self.take_resume_position()
        if position is not None:
            batches.resume_from(*position)
        return self._loader(batches)

    def _eval_batches(self, split: str) -> TokenBatches | SlidingWindowBatches:
        if self.resolved_task() != "causal_lm":
            return self._batches(split, shuffle=False)
        assert self.cache is not None
        block_size = self.resolved_block_size()
        stride = self.eval_stride or block_size
        if stride > block_size:
            raise ConfigError(
                f"data.eval_stride={stride} exceeds block_size={block_size}: use at most {block_size} "
                "(block_size: disjoint windows; smaller: more context per token)"
            )
        trainer = self.trainer
        return SlidingWindowBatches(
            self.cache.tokens(split), block_size, stride, self.batch_size,
            rank=trainer.global_rank if trainer else 0, world_size=trainer.world_size if trainer else 1,
        )

    def val_dataloader(self) -> DataLoader | list:
        if not self.has_val_split():
            return []  # no validation split: Lightning skips validation
        return self._loader(self._eval_batches("val"))

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._eval_batches("test"))

