"""``lmexp predict``: label a table of texts with a fine-tuned classifier, without Lightning.

The checkpoint carries what is needed: the network with its classification head, the label
names, the tokenizer and how training framed its inputs (columns, maximum length).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from lmexp.arguments import json_parser
from lmexp.checkpoints import load_checkpoint
from lmexp.data.classification import encode_examples, label_ids, pad_batch, read_examples, write_predictions_csv
from lmexp.data.sources import table_columns
from lmexp.data.tokenizer import PAD
from lmexp.errors import CheckpointError, DataError
from lmexp.hardware import check_device
from lmexp.run_folders import run_of_checkpoint, shown_path

__all__ = ["default_output", "predict_file", "run", "run_predict"]


def predict_file(
    ckpt: str,
    input: str,
    output: str | None = None,
    text_column: list[str] | None = None,
    text_pair_column: list[str] | None = None,
    label_column: str | None = None,
    batch_size: int = 64,
    device: str = "cpu",
) -> Path:
    """Write a CSV of predicted labels and class probabilities for a table of texts.

    Args:
        ckpt: A classifier's ``.ckpt`` or export folder (``checkpoints/best``).
        input: A ``.tsv``, ``.csv`` or ``.jsonl`` file of texts (labels optional: if the file has
            the label column, accuracy is printed too).
        output: The CSV to write (default: ``default_output``: in the checkpoint's run folder,
            else the working directory; never beside the input, whose folder may be shared).
        text_column: The text's column names (default: those the classifier was trained with).
        text_pair_column: The second text's column names (default: as in training).
        label_column: The label column (default: as in training); a file without it is fine.
        batch_size: Examples per forward pass.
        device: ``cpu`` or ``cuda``.
    """
    check_device(device)
    loaded = load_checkpoint(ckpt)
    labels = loaded.config.labels
    if not labels:
        raise CheckpointError(
            f"{ckpt!r} holds a {loaded.config.arch} language model without a classification head: "
            "predict needs a classifier fine-tuned with lmexp.SequenceClassification"
        )
    if loaded.tokenizer is None:
        raise CheckpointError(f"{ckpt!r} contains no tokenizer: re-export it with its tokenizer.json")
    framing = loaded.inputs or {}
    path = Path(input).expanduser()
    label_column = label_column or framing.get("label_column") or "label"
    has_labels = path.is_file() and label_column in table_columns(path)
    examples = read_examples(
        path, text_column or framing.get("text_column") or ["text", "sentence"],
        text_pair_column or framing.get("text_pair_column"), label_column if has_labels else None,
    )
    truth = label_ids(examples, labels, f"the classifier {ckpt!r}") if has_labels else None
    max_length = framing.get("max_length") or loaded.config.block_size
    encoded = encode_examples(loaded.tokenizer, examples.texts, examples.pairs, loaded.config.arch, max_length)
    pad_id = loaded.tokenizer.token_to_id(PAD) or 0
    model = loaded.model.to(device).eval()
    probabilities = []
    with torch.inference_mode():
        for start in range(0, len(encoded), batch_size):
            batch = pad_batch(encoded[start : start + batch_size], None, pad_id)
            logits = model.classify(
                batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
                token_type_ids=batch["token_type_ids"].to(device),
            )
            probabilities.append(logits.float().softmax(-1).cpu())
    probs = torch.cat(probabilities)
    predicted = probs.argmax(-1).tolist()
    target = Path(output).expanduser() if output else default_output(ckpt, path)
    write_predictions_csv(target, examples, labels, [labels[i] for i in predicted], probs,
                          examples.labels if has_labels else None)
    summary = f"wrote {len(predicted)} predictions to {shown_path(target.resolve())}"
    if truth is not None:
        correct = sum(p == t for p, t in zip(predicted, truth))
        summary += f" (accuracy {correct / len(truth):.4f} against the file's {label_column!r} column)"
    print(summary)
    return target


def default_output(ckpt: str | Path, input_path: str | Path) -> Path:
    """Where predictions go without ``--output``: ``<run>/predictions/<input stem>.predictions.csv``
    when the checkpoint is in a run folder (they stay with the model that made them), else
    ``<input stem>.predictions.csv`` in the working directory."""
    name = f"{Path(input_path).stem}.predictions.csv"
    run = run_of_checkpoint(ckpt)
    return run / "predictions" / name if run is not None else Path.cwd() / name


def run(argv: list[str]) -> Path:
    """``lmexp predict``: parse the flags, check the input exists, predict."""
    parser = json_parser(prog="lmexp predict", description=(predict_file.__doc__ or "").splitlines()[0])
    parser.add_function_arguments(predict_file, as_positional=False)
    config = parser.parse_args(argv)
    if not Path(config.input).expanduser().is_file():
        raise DataError(f"--input {config.input!r} does not exist: pass a .tsv, .csv or .jsonl file of texts")
    return predict_file(**{k: v for k, v in config.as_dict().items() if k != "config"})


run_predict = run  # the verb's entry point under its descriptive name


if __name__ == "__main__":
    run(sys.argv[1:])
