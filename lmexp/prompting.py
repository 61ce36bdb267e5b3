"""Classification by prompting a causal language model: no head, no training.

Each label has a verbalizer (``" positive"``); an example gets the label whose verbalizer the
model finds most likely after a template (zero-shot), or after k labelled demonstrations and
the template (few-shot, in-context learning). Scored on the same dev set as fine-tuning, it
tells whether fine-tuning pays for itself.
"""

from __future__ import annotations

import json
import random
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from torch import Tensor, nn

from lmexp.data.classification import Examples, label_order, read_examples, write_predictions_csv
from lmexp.data.tokenizer import describe_unknown, encode_prompt
from lmexp.errors import CheckpointError, ConfigError, DataError, check_positive
from lmexp.generation import score_continuations
from lmexp.hardware import check_device

DEFAULT_TEMPLATE = "Review: {text}\nSentiment:"
_PLACEHOLDER = re.compile(r"\{(\w+)\}")


@dataclass
class PromptSpec:
    """How examples become prompts and labels become continuations.

    Attributes:
        template: The prompt of one example; ``{text}`` is replaced by its text and ``{pair}``
            by its second text (sentence-pair tasks).
        verbalizers: Label as written in the data -> the continuation the model is asked to
            score after the template (``" negative"``: mind the leading space).
        shots: Labelled demonstrations put before every example (0: zero-shot).
        separator: Text between demonstrations, and between the last one and the example.
        calibrate: Contextual calibration (Zhao et al. 2021): divide the label probabilities by
            those of a content-free input and renormalize, removing the prompt's label bias.
        seed: Seed of the choice and order of the demonstrations.
        length_normalize: Score a verbalizer by the mean log-probability of its tokens instead
            of their sum, so long verbalizers are not penalized for their length.
        content_free: The content-free text of calibration (in ``{text}``, and ``{pair}``).
    """

    template: str = DEFAULT_TEMPLATE
    verbalizers: dict[str, str] | None = None
    shots: int = 0
    separator: str = "\n\n"
    calibrate: bool = False
    seed: int = 0
    length_normalize: bool = False
    content_free: str = "N/A"

    def __post_init__(self) -> None:
        if "{text}" not in self.template:
            raise ConfigError(
                f"template={self.template!r} has no {{text}}: put {{text}} where the example goes, "
                f"e.g. {DEFAULT_TEMPLATE!r}"
            )
        unknown = sorted({name for name in _PLACEHOLDER.findall(self.template)} - {"text", "pair"})
        if unknown:
            raise ConfigError(
                f"template={self.template!r} has placeholder(s) {', '.join('{' + u + '}' for u in unknown)}: "
                "only {text} and {pair} are filled in, rename or remove the others"
            )
        if not self.verbalizers or not isinstance(self.verbalizers, dict):
            raise ConfigError(
                f"verbalizers={self.verbalizers!r}: give each label its continuation, "
                "e.g. --verbalizers '{\"0\": \" negative\", \"1\": \" positive\"}'"
            )
        # YAML reads {0: bad} with int keys: labels in files are text.
        self.verbalizers = {str(label): value for label, value in self.verbalizers.items()}
        if len(self.verbalizers) < 2:
            raise ConfigError(f"verbalizers={self.verbalizers!r} names one label: classification needs two or more")
        for label, value in self.verbalizers.items():
            if not isinstance(value, str) or not value:
                raise ConfigError(
                    f"verbalizer of label {label!r} is {value!r}: give a non-empty text such as ' positive'"
                )
        if isinstance(self.shots, bool) or not isinstance(self.shots, int) or self.shots < 0:
            raise ConfigError(f"shots={self.shots!r} must be an integer >= 0 (0: zero-shot)")

    @property
    def label_names(self) -> list[str]:
        """The labels in a stable order (numeric or alphabetical), as fine-tuning orders them."""
        return label_order(list(self.verbalizers or {}))

    def check_labels(self, labels: Sequence[str] | None, where: str) -> None:
        """Refuse data whose labels have no verbalizer, naming them."""
        missing = sorted(set(labels or []) - set(self.verbalizers or {}))
        if missing:
            raise ConfigError(
                f"label(s) {', '.join(repr(m) for m in missing)} in {where} have no verbalizer "
                f"(verbalizers: {', '.join(repr(k) for k in self.verbalizers or {})}): add them to verbalizers"
            )

    def render(self, text: str, pair: str | None = None) -> str:
        """The template filled in one pass (text that spells ``{pair}`` stays as it is)."""
        values = {"text": text, "pair": pair if pair is not None else ""}
        return re.sub(r"\{(text|pair)\}", lambda m: values[m.group(1)], self.template)


@dataclass
class PromptResult:
    """Label probabilities and predictions per example, with the metrics when labels are known."""

    label_names: list[str]
    probabilities: Tensor
    """(N, n_labels), rows sum to 1 (calibrated when the spec says so)."""
    scores: Tensor
    """(N, n_labels) log p(verbalizer | prompt), summed (or, length-normalized, averaged) over its tokens."""
    predictions: list[str]
    labels: list[str] | None
    metrics: dict[str, Any]
    """accuracy, macro_f1, precision/recall per label, confusion (rows true, columns predicted); empty without labels."""
    n_truncated: int
    """Prompts that lost demonstrations or part of their text to fit the model's context."""
    truncated: list[bool] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    """What the model read before each verbalizer."""
    demonstrations: list[int] = field(default_factory=list)
    """Rows of the training examples shown as demonstrations, in prompt order."""
    content_free: Tensor | None = None
    """(n_labels,) probabilities of the content-free input, when calibrated."""
    block_size: int | None = None
    """The model's context in tokens, which prompts and verbalizers had to fit."""


def check_causal(config: Any, where: str) -> None:
    """Refuse a bidirectional network: its logits at a position see the tokens it should predict."""
    arch = getattr(config, "arch", "gpt")
    if arch == "bert":
        raise CheckpointError(
            f"{where} holds a bert (masked LM) network; prompting needs a causal GPT checkpoint "
            "(or fine-tune this one with lmexp fit and SequenceClassification)"
        )


def choose_demonstrations(labels: Sequence[str], shots: int, seed: int) -> list[int]:
    """Indices of ``shots`` examples, balanced over labels as far as the data allows, in random order.

    Labels take turns (in a seeded random order, which decides who gets the remainder); a label
    out of examples drops out. The same seed gives the same demonstrations.
    """
    if shots > len(labels):
        raise ConfigError(f"shots={shots} but the training file has {len(labels)} examples: lower --shots")
    rng = random.Random(seed)
    groups: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        groups.setdefault(label, []).append(i)
    order = label_order(list(groups))
    for label in order:
        rng.shuffle(groups[label])
    rng.shuffle(order)
    picked: list[int] = []
    depth = 0
    while len(picked) < shots:
        for label in order:
            if depth < len(groups[label]) and len(picked) < shots:
                picked.append(groups[label][depth])
        depth += 1
    rng.shuffle(picked)
    return picked


CHECKPOINT_TEMPLATE = "checkpoint"


@dataclass(frozen=True)
class ChatSettings:
    """The chat template a fine-tuned (SFT) model was trained with, which its prompts must follow."""

    template: Any  # lmexp.data.chat.ChatTemplate
    system: str | None = None
    response_values: dict[str, str] | None = None
    """A response cell -> the response text it was trained on ({"0": "negative"}), when the data mapped them."""

    def messages(self, text: str) -> list[dict[str, str]]:
        """The conversation of one user message: the system message first when there is one."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return [*system, {"role": "user", "content": text}]


def chat_settings(inputs: Mapping[str, Any] | None, chat_template: str | None) -> ChatSettings | None:
    """How ``lmexp generate``/``prompt`` wrap a text: ``chat_template`` ``checkpoint`` (the default)
    takes the template an SFT checkpoint saved (none for other checkpoints), ``none`` the raw
    text, a name in ``lmexp.data.chat.TEMPLATES`` that template."""
    from lmexp.data.chat import TEMPLATES, ChatTemplate

    saved = dict(inputs or {}) if (inputs or {}).get("kind") == "sft" else None
    if chat_template is None or chat_template == "none":
        return None
    if chat_template == CHECKPOINT_TEMPLATE:
        if saved is None:
            return None
        template = ChatTemplate.from_value(saved.get("template"))
    elif chat_template in TEMPLATES:
        template = TEMPLATES[chat_template]
    else:
        raise ConfigError(
            f"chat_template={chat_template!r} is unknown: use {CHECKPOINT_TEMPLATE} (the fine-tuned checkpoint's), "
            f"none (the raw text) or one of {', '.join(TEMPLATES)}"
        )
    values = (saved or {}).get("response_values")
    return ChatSettings(template, (saved or {}).get("system"), {str(k): str(v) for k, v in values.items()} if values else None)


class _PromptBuilder:
    """Demonstrations + template per example, cut to leave room for the longest verbalizer."""

    def __init__(self, tokenizer: Tokenizer, spec: PromptSpec, demonstrations: list[str], budget: int | None) -> None:
        self.tokenizer, self.spec, self.demos, self.budget = tokenizer, spec, demonstrations, budget
        self.unknown: dict[str, None] = {}
        self.n_with_unknown = 0

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def _join(self, dropped: int, text: str, pair: str | None) -> str:
        return self.spec.separator.join([*self.demos[dropped:], self.spec.render(text, pair)])

    def build(self, text: str, pair: str | None) -> tuple[str, list[int], bool]:
        """(prompt, its ids, whether it was cut): oldest demonstrations go first, then the text's start."""
        prompt = self._join(0, text, pair)
        ids, unknown = encode_prompt(self.tokenizer, prompt)
        if unknown:
            self.n_with_unknown += 1
            self.unknown.update(dict.fromkeys(unknown))
        if self.budget is None or len(ids) <= self.budget:
            return prompt, ids, False
        for dropped in range(1, len(self.demos) + 1):
            prompt = self._join(dropped, text, pair)
            ids = self._encode(prompt)
            if len(ids) <= self.budget:
                return prompt, ids, True
        while len(ids) > self.budget:
            excess = len(ids) - self.budget
            text_enc = self.tokenizer.encode(text, add_special_tokens=False)
            pair_enc = self.tokenizer.encode(pair, add_special_tokens=False) if pair is not None else None
            cut_pair = pair_enc is not None and len(pair_enc.ids) > len(text_enc.ids)  # longest first
            encoding, source = (pair_enc, pair) if cut_pair else (text_enc, text)
            if not encoding.ids:  # checked up front; only a tokenizer joining across the cut gets here
                raise ConfigError(
                    f"the template {self.spec.template!r} alone does not fit the model's context: shorten it"
                )
            n = min(excess, len(encoding.ids))
            cut = encoding.offsets[n][0] if n < len(encoding.ids) else len(source)
            source = source[max(cut, 1):]
            if cut_pair:
                pair = source
            else:
                text = source
            prompt = self._join(len(self.demos), text, pair)
            ids = self._encode(prompt)
        return prompt, ids, True


def _encode_verbalizers(tokenizer: Tokenizer, spec: PromptSpec, names: list[str]) -> list[list[int]]:
    encoded = []
    for label in names:
        verbalizer = spec.verbalizers[label]
        ids, unknown = encode_prompt(tokenizer, verbalizer)
        if not ids:
            raise ConfigError(
                f"verbalizer {verbalizer!r} of label {label!r} encodes to no tokens: "
                "use text made of characters the model's tokenizer knows"
            )
        if unknown:
            raise ConfigError(
                f"verbalizer {verbalizer!r} of label {label!r} has pieces {describe_unknown(unknown)}"
            )
        encoded.append(ids)
    seen: dict[tuple[int, ...], str] = {}
    for label, ids in zip(names, encoded):
        if tuple(ids) in seen:
            raise ConfigError(
                f"verbalizers of labels {seen[tuple(ids)]!r} and {label!r} encode to the same tokens, so they "
                "always score the same: give them different words"
            )
        seen[tuple(ids)] = label
    return encoded


def _check_pairs(spec: PromptSpec, examples: Examples, where: str) -> None:
    has_slot = "{pair}" in spec.template
    if has_slot and examples.pairs is None:
        raise ConfigError(
            f"template {spec.template!r} has {{pair}} but {where} has single texts: remove {{pair}}, "
            "or name the second text's column with --text_pair_column"
        )
    if not has_slot and examples.pairs is not None:
        raise ConfigError(
            f"{where} has sentence pairs but template {spec.template!r} has no {{pair}}: "
            "put {pair} where the second text goes"
        )


def classification_metrics(predictions: Tensor, targets: Tensor, names: list[str]) -> dict[str, Any]:
    """Accuracy, macro-F1, per-label precision and recall, and the confusion matrix, as
    ``SequenceClassification`` reports them, so prompting and fine-tuning compare directly."""
    from torchmetrics.classification import (
        MulticlassAccuracy,
        MulticlassConfusionMatrix,
        MulticlassF1Score,
        MulticlassPrecision,
        MulticlassRecall,
    )

    n = len(names)
    precision = MulticlassPrecision(n, average=None)(predictions, targets)
    recall = MulticlassRecall(n, average=None)(predictions, targets)
    return {
        "accuracy": float(MulticlassAccuracy(n, average="micro")(predictions, targets)),
        "macro_f1": float(MulticlassF1Score(n, average="macro")(predictions, targets)),
        "precision": {label: float(value) for label, value in zip(names, precision)},
        "recall": {label: float(value) for label, value in zip(names, recall)},
        "confusion": MulticlassConfusionMatrix(n)(predictions, targets).tolist(),
    }


def classify(
    model: nn.Module,
    tokenizer: Tokenizer,
    examples: Examples,
    spec: PromptSpec,
    train_examples: Examples | None = None,
    batch_size: int = 32,
) -> PromptResult:
    """Label ``examples`` by the verbalizer the model finds most likely after each prompt.

    ``train_examples`` supply the ``spec.shots`` demonstrations (the same for every example).
    A prompt too long for the model's context (``config.block_size``, leaving room for the
    longest verbalizer) loses its oldest demonstrations, then the start of its text; the result
    counts such prompts.
    """
    config = getattr(model, "config", None)
    check_causal(config, "the model")
    check_positive("batch_size", batch_size)
    names = spec.label_names
    spec.check_labels(examples.labels, "the input")
    _check_pairs(spec, examples, "the input")
    vocab_size = getattr(config, "vocab_size", None)
    if vocab_size is not None and tokenizer.get_vocab_size() > vocab_size:
        raise CheckpointError(
            f"the tokenizer has {tokenizer.get_vocab_size()} tokens but the model has vocab_size={vocab_size}: "
            "use the tokenizer saved with the checkpoint"
        )

    chosen: list[int] = []
    demos: list[str] = []
    if spec.shots:
        if train_examples is None or train_examples.labels is None:
            raise ConfigError(f"shots={spec.shots} needs labelled training examples for demonstrations: pass --train")
        spec.check_labels(train_examples.labels, "the training file")
        _check_pairs(spec, train_examples, "the training file")
        chosen = choose_demonstrations(train_examples.labels, spec.shots, spec.seed)
        pairs = train_examples.pairs
        demos = [
            spec.render(train_examples.texts[i], pairs[i] if pairs is not None else None)
            + spec.verbalizers[train_examples.labels[i]]
            for i in chosen
        ]

    verbalizer_ids = _encode_verbalizers(tokenizer, spec, names)
    longest = max(len(ids) for ids in verbalizer_ids)
    block_size = getattr(config, "block_size", None)
    budget = None if block_size is None else block_size - longest
    pair_slot = "" if examples.pairs is not None else None
    bare = tokenizer.encode(spec.render("", pair_slot), add_special_tokens=False).ids
    if budget is not None and len(bare) + 1 > budget:
        raise ConfigError(
            f"the template takes {len(bare)} tokens and the longest verbalizer {longest}, leaving no room for the "
            f"text in the model's context (block_size={block_size}): shorten the template or verbalizers"
        )

    builder = _PromptBuilder(tokenizer, spec, demos, budget)
    prompts, prompt_ids, truncated = [], [], []
    pairs = examples.pairs
    for i, text in enumerate(examples.texts):
        prompt, ids, cut = builder.build(text, pairs[i] if pairs is not None else None)
        prompts.append(prompt)
        prompt_ids.append(ids)
        truncated.append(cut)
    if builder.unknown:
        print(
            f"warning: {builder.n_with_unknown} of {len(examples)} prompts have pieces "
            f"{describe_unknown(list(builder.unknown))}",
            file=sys.stderr,
        )

    rows = [(ids, verbalizer) for ids in prompt_ids for verbalizer in verbalizer_ids]
    scores = score_continuations(model, rows, batch_size, spec.length_normalize).view(len(examples), len(names))
    probabilities = scores.softmax(dim=-1)
    content_free = None
    if spec.calibrate:
        free = spec.content_free
        _, free_ids, _ = builder.build(free, free if pairs is not None else None)
        free_scores = score_continuations(
            model, [(free_ids, verbalizer) for verbalizer in verbalizer_ids], batch_size, spec.length_normalize
        )
        content_free = free_scores.softmax(dim=-1)
        probabilities = probabilities / content_free
        probabilities = probabilities / probabilities.sum(dim=-1, keepdim=True)

    predicted = probabilities.argmax(dim=-1)
    metrics: dict[str, Any] = {}
    if examples.labels is not None:
        index = {label: i for i, label in enumerate(names)}
        targets = torch.tensor([index[label] for label in examples.labels])
        metrics = classification_metrics(predicted, targets, names)
    return PromptResult(
        label_names=names,
        probabilities=probabilities,
        scores=scores,
        predictions=[names[i] for i in predicted.tolist()],
        labels=list(examples.labels) if examples.labels is not None else None,
        metrics=metrics,
        n_truncated=sum(truncated),
        truncated=truncated,
        prompts=prompts,
        demonstrations=chosen,
        content_free=content_free,
        block_size=block_size,
    )


def format_report(result: PromptResult) -> str:
    """The short text report of ``lmexp prompt``: metrics, per-label P/R, confusion, truncation."""
    n = len(result.predictions)
    lines = []
    if result.metrics:
        from lmexp.objectives.classification import format_confusion

        m = result.metrics
        lines.append(f"accuracy {m['accuracy']:.4f}  macro-F1 {m['macro_f1']:.4f}  ({n} examples)")
        width = max(len(label) for label in result.label_names) + 2
        lines.append(f"{'label':>{width}}  precision  recall")
        for label in result.label_names:
            lines.append(f"{label:>{width}}  {m['precision'][label]:9.4f}  {m['recall'][label]:6.4f}")
        lines.append(format_confusion(torch.tensor(m["confusion"]), result.label_names))
    else:
        lines.append(f"{n} examples labelled (the input has no labels: no metrics)")
    context = f" (block_size={result.block_size})" if result.block_size is not None else ""
    lines.append(f"prompts truncated to fit the context{context}: {result.n_truncated} of {n}")
    return "\n".join(lines)


def write_predictions(result: PromptResult, examples: Examples, path: str | Path) -> Path:
    """CSV of text (text_pair), label, prediction and one ``p_<label>`` column per label, as ``lmexp predict`` writes."""
    return write_predictions_csv(path, examples, result.label_names, result.predictions, result.probabilities,
                                 result.labels)


def evaluate_prompt(
    ckpt: str,
    input: str,
    verbalizers: dict[str, str] | None = None,
    train: str | None = None,
    template: str | None = None,
    shots: int = 0,
    separator: str = "\n\n",
    calibrate: bool = False,
    length_normalize: bool = False,
    seed: int = 0,
    text_column: list[str] | str = ["text", "sentence", "content"],  # noqa: B006 (read, never mutated)
    text_pair_column: list[str] | str | None = None,
    label_column: str | None = "label",
    batch_size: int = 32,
    output: str | None = None,
    report_dir: str | None = None,
    device: str = "cpu",
    chat_template: str = CHECKPOINT_TEMPLATE,
) -> PromptResult:
    """Classify a labelled table by prompting a causal GPT with a template and verbalizers.

    Args:
        ckpt: A causal GPT's ``.ckpt`` or export folder (``checkpoints/best``).
        input: The ``.tsv``, ``.csv`` or ``.jsonl`` file to classify (a dev set); without its label
            column the predictions are written but no metrics.
        verbalizers: Label -> continuation, e.g. ``'{"0": " bad", "1": " good"}'``; with a
            fine-tuned (SFT) checkpoint, label -> answer, by default the answers it was trained on.
        train: A labelled table the demonstrations are drawn from (needed when shots > 0).
        template: The prompt of one example with ``{text}`` (and ``{pair}``); in bash, ``$'...'``
            writes a newline as ``\\n``. Default ``Review: {text}\\nSentiment:``; with a
            fine-tuned (SFT) checkpoint, the user's message, by default ``{text}`` (the chat
            template adds the rest).
        shots: Demonstrations before each example, balanced over labels (0: zero-shot).
        separator: Text between demonstrations and before the example (bash: ``$'\\n\\n'``).
        calibrate: Contextual calibration against the content-free input ``N/A``.
        length_normalize: Score verbalizers by mean instead of summed token log-probability.
        seed: Seed of the demonstrations' choice and order.
        text_column: The text's column, or several names of which each file uses the first it has.
        text_pair_column: The second text's column for sentence pairs.
        label_column: The label's column.
        batch_size: (prompt, verbalizer) rows per forward pass.
        output: A CSV to write: text, label, prediction, one probability column per label.
        report_dir: A folder for ``metrics.json`` and ``confusion.png``.
        device: ``cpu`` or ``cuda``.
        chat_template: ``checkpoint`` wraps each example in the chat template a fine-tuned (SFT)
            checkpoint was trained with (system message, the example as the user's message, the
            response header; each verbalizer is an answer followed by the end marker), and
            leaves the prompt as it is for other checkpoints; ``none`` never wraps; ``plain``,
            ``chatml`` or ``alpaca`` wraps in that template.
    """
    from lmexp.checkpoints import load_checkpoint
    from lmexp.data.sources import table_columns

    torch_device = check_device(device)
    if shots and train is None:
        raise ConfigError(f"shots={shots} needs --train, the labelled file demonstrations are drawn from")
    path = Path(input).expanduser()
    if not path.is_file():
        raise DataError(f"--input {input!r} does not exist: pass a .tsv, .csv or .jsonl file")
    has_labels = label_column is not None and label_column in table_columns(path)
    examples = read_examples(path, text_column, text_pair_column, label_column if has_labels else None)
    train_examples = read_examples(train, text_column, text_pair_column, label_column) if shots else None

    loaded = load_checkpoint(ckpt)
    check_causal(loaded.config, repr(ckpt))
    if loaded.tokenizer is None:
        raise CheckpointError(f"{ckpt!r} contains no tokenizer: re-export it with its tokenizer.json")
    chat = chat_settings(loaded.inputs, chat_template)
    if chat is not None:  # the prompt and answers the model was fine-tuned on
        if verbalizers is None:
            verbalizers = chat.response_values
        template = chat.template.prompt(chat.messages(template if template is not None else "{text}"))
        end = chat.template.stop or ""
        verbalizers = {label: str(answer) + end for label, answer in (verbalizers or {}).items()} or None
    spec = PromptSpec(
        template=template if template is not None else DEFAULT_TEMPLATE, verbalizers=verbalizers, shots=shots,
        separator=separator, calibrate=calibrate, seed=seed, length_normalize=length_normalize,
    )
    model = loaded.model.to(torch_device)
    result = classify(model, loaded.tokenizer, examples, spec, train_examples, batch_size)

    if output is not None:
        write_predictions(result, examples, output)
    if report_dir is not None:
        folder = Path(report_dir).expanduser()
        folder.mkdir(parents=True, exist_ok=True)
        report = {
            **result.metrics,
            "n_examples": len(examples),
            "n_truncated": result.n_truncated,
            "settings": {
                "ckpt": ckpt, "input": input, "train": train, "template": spec.template,
                "verbalizers": spec.verbalizers, "shots": spec.shots, "separator": spec.separator,
                "calibrate": spec.calibrate, "length_normalize": spec.length_normalize, "seed": spec.seed,
                "block_size": loaded.config.block_size,
            },
        }
        if result.content_free is not None:
            report["content_free"] = dict(zip(result.label_names, result.content_free.tolist()))
        (folder / "metrics.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
        if result.metrics:
            from lmexp.objectives.classification import plot_confusion

            plot_confusion(torch.tensor(result.metrics["confusion"]), result.label_names, folder / "confusion.png")
    return result
