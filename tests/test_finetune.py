"""Transfer: classification data, fine-tuning from our own pretrained checkpoints, predict,
cross-validation, causal-LM continuation, and the one-line errors of bad input."""

from __future__ import annotations

import csv
import json
import math
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from lmexp.cli import main
from lmexp.crossval import examples_digest
from lmexp.data.classification import ClassificationBatches, encode_examples, label_order, read_examples
from lmexp.data.tokenizer import train_tokenizer
from lmexp.errors import ConfigError, DataError
from lmexp.models import GPT, from_name
from lmexp.objectives import SequenceClassification
from lmexp.runs import build
from tests.test_bad_input import one_line_error

ROOT = Path(__file__).resolve().parents[1]
GOOD, BAD = ["good", "great", "lovely", "superb"], ["bad", "awful", "dull", "boring"]
FILLER = "the film was a story with some actors and a plot that".split()


def review(rng: random.Random, label: int) -> str:
    words = rng.sample(FILLER, 5) + [rng.choice(GOOD if label else BAD)] + rng.sample(FILLER, 3)
    rng.shuffle(words)
    return " ".join(words)


def write_reviews(path: Path, n: int, text_column: str = "sentence", seed: int = 0, pair: bool = False) -> Path:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        f.write("label\t" + text_column + ("\tsecond" if pair else "") + "\n")
        for i in range(n):
            label = i % 2
            f.write(f"{label}\t{review(rng, label)}" + (f"\t{review(rng, 1 - label)}" if pair else "") + "\n")
    return path


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A bert-tiny (masked LM) and a gpt-tiny (causal LM) pretrained on the reviews' text."""
    folder = tmp_path_factory.mktemp("pretrained")
    train = write_reviews(folder / "train.tsv", 400)
    made = {}
    with pytest.MonkeyPatch.context() as env:
        env.setenv("LMEXP_CACHE_DIR", str(folder / "cache"))
        for name, objective, network, tokenizer in (("bert", "lmexp.MaskedLM", "bert-tiny", "wordpiece"),
                                                    ("gpt", "lmexp.CausalLM", "gpt-tiny", "bpe")):
            run = build("fit", args=[
                f"--model={objective}", f"--model.network={network}", "--model.warmup_steps=5", "--model.lr=3e-3",
                "--data=lmexp.TextDataModule", f"--data.source={train}", "--data.text_column=sentence",
                f"--data.tokenizer={tokenizer}", "--data.vocab_size=300", "--data.batch_size=16",
                "--trainer.max_steps=40", "--trainer.val_check_interval=20", "--trainer.check_val_every_n_epoch=null",
                "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
                f"--trainer.default_root_dir={folder / name}",
            ], logger=False, run_name=name)
            run.execute()
            made[name] = run.run_dir / "checkpoints" / "best.ckpt"
    made["train"] = train
    return made


def classify_args(root: Path, train: Path, pretrained: Path, *extra: str) -> list[str]:
    return [
        "--model=lmexp.SequenceClassification", f"--model.pretrained={pretrained}", "--model.lr=3e-3",
        "--model.warmup_steps=5", "--data=lmexp.ClassificationDataModule", f"--data.train={train}",
        "--data.text_column=[sentence, content]", "--data.batch_size=16", "--trainer.max_steps=60",
        "--trainer.val_check_interval=30", "--trainer.check_val_every_n_epoch=null", "--checkpoint.monitor=val/acc",
        "--checkpoint.mode=max", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={root}", *extra,
    ]


# --- reading and encoding ----------------------------------------------------------------------


def test_each_file_uses_the_first_text_column_it_has(tmp_path: Path):
    train = read_examples(write_reviews(tmp_path / "t.tsv", 4), ["sentence", "content"])
    dev = read_examples(write_reviews(tmp_path / "d.tsv", 4, text_column="content"), ["sentence", "content"])
    assert len(train) == len(dev) == 4 and train.labels == ["0", "1", "0", "1"]
    assert dev.origins[0].endswith("d.tsv:2")
    assert label_order(["10", "2", "1"]) == ["1", "2", "10"] and label_order(["pos", "neg"]) == ["neg", "pos"]


@pytest.mark.parametrize(("content", "kwargs", "message"), [
    ("sentence\nhello\n", {}, r"t.tsv has no label column label \(columns: sentence\): add the file's column name to data.label_column"),
    ("label\tsentence\n1\thello\n0\t  \n", {}, r"t.tsv:3 has an empty 'sentence' cell: fill in the text or remove the row"),
    ("label\tsentence\n1\thello\n", {"text_pair_column": "second"},
     r"t.tsv has no second text column \['second'\] \(columns: label, sentence\): it holds single texts; remove data.text_pair_column"),
    ("label\tbody\n1\thello\n", {}, r"t.tsv has no text column any of \['sentence', 'content'\] \(columns: label, body\)"),
    ("label\tsentence\n1\thello\n\tworld\n", {}, r"t.tsv:3 has no 'label' value"),
])
def test_bad_tables_are_one_line_errors(tmp_path: Path, content: str, kwargs: dict, message: str):
    path = tmp_path / "t.tsv"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        read_examples(path, ["sentence", "content"], **kwargs)


def test_bert_framing_truncates_the_longer_text_first():
    tokenizer = train_tokenizer(["a b c d e f g h"], "wordpiece", 64, ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    (ids, types), = encode_examples(tokenizer, ["a b c d e f"], ["g h"], "bert", max_length=7)
    assert len(ids) == 7 and ids[0] == cls and ids.count(sep) == 2 and ids[-1] == sep
    assert types == [0, 0, 0, 0, 1, 1, 1]  # [CLS] a b [SEP] | g h [SEP]: the long first text was cut
    (ids, types), = encode_examples(tokenizer, ["a b c d e f"], None, "gpt", max_length=4)
    assert len(ids) == 4 and cls not in ids and set(types) == {0}


def test_batches_are_padded_to_their_longest_member_and_buckets_pad_less():
    encoded = [([1] * n, [0] * n) for n in [3, 30, 4, 29, 5, 28, 6, 27] * 4]
    labels = [0, 1] * 16
    plain = list(ClassificationBatches(encoded, labels, 4, pad_id=0, shuffle=True, seed=1))
    bucketed = list(ClassificationBatches(encoded, labels, 4, pad_id=0, shuffle=True, bucket_by_length=True, seed=1))
    for batch in plain:
        assert batch["input_ids"].shape[1] == int(batch["attention_mask"].sum(1).max())
    padding = lambda batches: sum(int((b["attention_mask"] == 0).sum()) for b in batches)  # noqa: E731
    assert padding(bucketed) < padding(plain) / 4
    seen = sorted(int(x) for b in bucketed for x in b["attention_mask"].sum(1))
    assert seen == sorted(len(ids) for ids, _ in encoded)  # every example once
    # Evaluation over 3 ranks: every example exactly once, none dropped.
    shards = [list(ClassificationBatches(encoded, labels, 5, 0, shuffle=False, rank=r, world_size=3)) for r in range(3)]
    assert sum(b["labels"].numel() for shard in shards for b in shard) == len(encoded)
    # A split smaller than one batch per rank still gives every rank a batch (Lightning stops a
    # rank that has none): 5 examples, batches of 32, 2 ranks -> 3 and 2.
    shards = [list(ClassificationBatches(encoded[:5], labels[:5], 32, 0, shuffle=False, rank=r, world_size=2)) for r in range(2)]
    assert [[b["labels"].numel() for b in shard] for shard in shards] == [[3], [2]]


# --- the classification objective -------------------------------------------------------------


def test_layer_lr_decay_and_head_lr_give_each_depth_its_rate():
    objective = SequenceClassification("bert-tiny", network_overrides={"vocab_size": 50, "labels": ["a", "b"]},
                                       lr=1e-3, layer_lr_decay=0.5, head_lr=1e-2)
    names = {id(p): n for n, p in objective.model.named_parameters()}
    rates = {names[id(p)]: group["lr"] for group in objective.parameter_groups() for p in group["params"]}
    assert rates["classifier.out_proj.weight"] == pytest.approx(1e-2)
    assert rates["pooler.weight"] == pytest.approx(1e-3)  # above the top block: full lr
    assert rates["trunk.blocks.1.attn.qkv.weight"] == pytest.approx(5e-4)
    assert rates["trunk.blocks.0.attn.qkv.weight"] == pytest.approx(2.5e-4)
    assert rates["trunk.tok_emb.weight"] == pytest.approx(1.25e-4)
    # The MLM and sentence-order heads get no gradient while classifying: frozen, in no group.
    assert not any(n.startswith(("mlm_head.dense", "sop_head")) for n in rates)


def test_freeze_encoder_trains_the_head_only():
    objective = SequenceClassification("gpt-tiny", network_overrides={"vocab_size": 50, "labels": ["a", "b"]},
                                       freeze_encoder=True)
    trainable = {n for n, p in objective.model.named_parameters() if p.requires_grad}
    assert trainable == {"classifier.out_proj.weight", "classifier.out_proj.bias"}


def test_gpt_classifier_reads_the_last_real_token_whatever_the_padding():
    torch.manual_seed(0)
    model = GPT(from_name("gpt-tiny", vocab_size=50, labels=["a", "b", "c"])).eval()
    ids = torch.randint(1, 50, (1, 7))
    padded = torch.cat([ids, torch.zeros(1, 5, dtype=torch.long)], dim=1)
    mask = torch.tensor([[1] * 7 + [0] * 5])
    torch.testing.assert_close(model.classify(padded, mask), model.classify(ids))
    other = torch.cat([ids, torch.randint(1, 50, (1, 5))], dim=1)
    assert not torch.allclose(model.classify(other), model.classify(ids))


def test_class_weights_are_checked():
    with pytest.raises(ConfigError, match="class_weights='rare' is unknown"):
        SequenceClassification("bert-tiny", class_weights="rare")
    with pytest.raises(ConfigError, match=r"class_weights has 3 values but there are 2 labels"):
        SequenceClassification("bert-tiny", network_overrides={"vocab_size": 50, "labels": ["a", "b"]},
                               class_weights=[1.0, 2.0, 3.0])


# --- fine-tuning end to end ---------------------------------------------------------------------


def test_fine_tuned_bert_learns_tests_and_predicts(pretrained: dict[str, Path], tmp_path: Path, capsys, caplog):
    dev = write_reviews(tmp_path / "dev.tsv", 60, text_column="content", seed=5)
    run = build("fit", args=classify_args(tmp_path / "runs", pretrained["train"], pretrained["bert"],
                                          f"--data.test={dev}", "--model.class_weights=balanced",
                                          "--model.layer_lr_decay=0.9"), logger=False, run_name="ft")
    run.execute()
    assert run.trainer.callback_metrics["val/acc"] > 0.9
    assert run.model.hparams.pretrained == str(pretrained["bert"])
    best = run.run_dir / "checkpoints" / "best.ckpt"
    result = run.trainer.test(run.model, datamodule=run.datamodule, ckpt_path=str(best), verbose=False)[0]
    assert result["test/acc"] > 0.9 and 0 < result["test/f1"] <= 1
    assert {"test/precision/0", "test/recall/1"} <= set(result)
    assert (run.run_dir / "confusion_test.png").is_file()
    # `lmexp test` of the checkpoint: its hyperparameters say no pretrained file, so the data is
    # encoded with the checkpoint's own tokenizer (one trained on train.tsv would differ).
    main(["test", *classify_args(tmp_path / "runs", pretrained["train"], pretrained["bert"], f"--data.test={dev}"),
          "--ckpt_path", str(best), "--trainer.logger=false"])
    printed = re.search(r"test/acc\s*│\s*([0-9.]+)", capsys.readouterr().out)
    assert printed and float(printed.group(1)) == pytest.approx(result["test/acc"])
    assert "confusion matrix (rows: true label, columns: predicted)" in caplog.text

    # predict, from the checkpoint and from the export: the same labels and probabilities
    out = [tmp_path / "a.csv", tmp_path / "b.csv"]
    main(["predict", "--ckpt", str(best), "--input", str(dev), "--output", str(out[0])])
    main(["predict", "--ckpt", str(best.with_suffix("")), "--input", str(dev), "--output", str(out[1])])
    rows = list(csv.DictReader(open(out[0])))
    assert list(rows[0]) == ["text", "label", "prediction", "p_0", "p_1"] and len(rows) == 60
    assert out[0].read_text() == out[1].read_text()
    assert sum(r["prediction"] == r["label"] for r in rows) / len(rows) == pytest.approx(result["test/acc"])
    capsys.readouterr()

    unseen = tmp_path / "unseen.tsv"
    unseen.write_text("label\tcontent\nneutral\tthe film\n")
    message = one_line_error(capsys, ["predict", "--ckpt", str(best), "--input", str(unseen)])
    assert "unseen.tsv:2 has label 'neutral', which the classifier" in message and "(labels: 0, 1)" in message
    message = one_line_error(capsys, ["predict", "--ckpt", str(pretrained["bert"]), "--input", str(dev)])
    assert "holds a bert language model without a classification head" in message


def test_wrong_kind_of_checkpoint_is_a_one_line_error(pretrained: dict[str, Path], tmp_path: Path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("some new text to continue on\n\n" * 50)
    message = one_line_error(capsys, [
        "fit", "--model=lmexp.CausalLM", f"--model.pretrained={pretrained['bert']}", "--data=lmexp.TextDataModule",
        f"--data.source={text}", f"--trainer.default_root_dir={tmp_path}"])
    assert "CausalLM needs a causal network (gpt or lstm), but pretrained checkpoint" in message
    assert "is a bert" in message
    message = one_line_error(capsys, ["fit", *classify_args(tmp_path, pretrained["train"], pretrained["bert"],
                                                             "--data.text_pair_column=second")])
    assert "has no second text column ['second']" in message


def test_cross_validation_runs_one_tracked_fit_per_fold_under_a_parent(pretrained: dict[str, Path], tmp_path: Path,
                                                                        capsys):
    from tests.test_tracking import client

    main(["fit", *classify_args(tmp_path / "runs", pretrained["train"], pretrained["bert"], "--data.num_folds=2",
                                "--trainer.max_steps=30", "--trainer.val_check_interval=15", "--experiment=cv")])
    out = capsys.readouterr().out
    assert "cross-validation over 2 folds" in out and "val/acc:" in out
    mlflow = client()
    experiment = mlflow.get_experiment_by_name("cv")
    runs = mlflow.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if "crossval.fold" not in r.data.tags]
    folds = sorted((r for r in runs if "crossval.fold" in r.data.tags), key=lambda r: r.data.tags["crossval.fold"])
    assert [r.data.tags["mlflow.parentRunId"] for r in folds] == [parent.info.run_id] * 2
    record = json.loads((Path(parent.data.tags["run_dir"]) / "crossval.json").read_text())
    # Each fold's metrics are its best validation (by val/acc, the monitor): the highest val/acc
    # its run logged. The parent holds the mean and (sample) std of the folds' values, per metric.
    accs = [fold["val/acc"] for fold in record["folds"]]
    logged = [max(m.value for m in mlflow.get_metric_history(r.info.run_id, "val/acc")) for r in folds]
    assert accs == pytest.approx(logged, abs=1e-6)
    assert len({fold["val/loss"] for fold in record["folds"]}) == 2  # so a wrong mean shows
    for name in ("val/acc", "val/loss"):
        values = [fold[name] for fold in record["folds"]]
        mean = sum(values) / 2
        std = math.sqrt(sum((v - mean) ** 2 for v in values))  # n - 1 = 1
        assert record["summary"][name]["mean"] == pytest.approx(mean, abs=1e-12)
        assert parent.data.metrics[f"cv/{name}_mean"] == pytest.approx(mean, abs=1e-12)
        assert parent.data.metrics[f"cv/{name}_std"] == pytest.approx(std, abs=1e-12)

    # The folds trained on different data: their validation rows split train.tsv between them,
    # and each fold trained on exactly the rows it did not validate on.
    table = read_examples(pretrained["train"], "sentence")
    row_of = {int(origin.rsplit(":", 1)[1]): i for i, origin in enumerate(table.origins)}
    held = [split["val"]["lines"] for split in record["splits"]]
    assert set(held[0]).isdisjoint(held[1]) and sorted(held[0] + held[1]) == sorted(row_of)
    assert [len(lines) for lines in held] == [len(table) // 2] * 2
    for split, lines in zip(record["splits"], held):
        val = [row_of[line] for line in lines]
        train = sorted(set(range(len(table))) - set(val))
        assert split["val"] == {"examples": len(val), "sha256": examples_digest(table.subset(val)), "lines": lines}
        assert split["train"] == {"examples": len(train), "sha256": examples_digest(table.subset(train))}


def test_causal_lm_continues_a_pretrained_gpt_with_its_tokenizer(pretrained: dict[str, Path], tmp_path: Path):
    from lmexp.checkpoints import load_checkpoint

    base = load_checkpoint(pretrained["gpt"])
    text = tmp_path / "new.txt"
    rng = random.Random(3)
    text.write_text("\n\n".join(review(rng, i % 2) for i in range(200)))
    run = build("fit", args=[
        "--model=lmexp.CausalLM", f"--model.pretrained={pretrained['gpt']}", "--model.warmup_steps=2",
        "--data=lmexp.TextDataModule", f"--data.source={text}", "--data.tokenizer=char", "--data.batch_size=8",
        "--trainer.max_steps=4", "--trainer.limit_val_batches=2", "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}",
    ], logger=False)
    before = run.trainer.validate(run.model, datamodule=run.datamodule, verbose=False)[0]["val/loss"]
    # The pretrained model's BPE tokenizer encodes the new text (data.tokenizer=char is overruled).
    assert run.datamodule.tokenizer.to_str() == base.tokenizer.to_str()
    assert before < math.log(base.config.vocab_size) - 1.0  # far below chance: it already knows this kind of text
    run.execute()
    continued = load_checkpoint(run.run_dir / "checkpoints" / "last.ckpt")
    assert continued.tokenizer.to_str() == base.tokenizer.to_str()


@pytest.mark.distributed
def test_ddp_fine_tuning_with_heads_that_get_no_gradient(pretrained: dict[str, Path], tmp_path: Path):
    """BERT's MLM and sentence-order heads take no part in classification; DDP must not wait for them."""
    command = [sys.executable, "-m", "lmexp", "fit",
               *classify_args(tmp_path / "runs", pretrained["train"], pretrained["bert"], "--trainer.max_steps=6",
                              "--trainer.val_check_interval=3"),
               "--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.accelerator=cpu", "--trainer.logger=false"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    from lmexp.checkpoints import load_checkpoint

    tuned, base = load_checkpoint(tmp_path / "runs" / "latest" / "checkpoints" / "last.ckpt"), load_checkpoint(pretrained["bert"])
    assert tuned.config.labels == ["0", "1"]
    # The unused heads stayed as pre-training left them; the encoder was trained.
    torch.testing.assert_close(tuned.model.sop_head.weight, base.model.sop_head.weight, rtol=0, atol=0)
    assert not torch.equal(tuned.model.trunk.blocks[0].attn.qkv.weight, base.model.trunk.blocks[0].attn.qkv.weight)


def test_dataloader_workers_split_the_batches_instead_of_repeating_them():
    encoded = [([1] * n, [0] * n) for n in range(1, 23)]
    labels = [0, 1] * 11
    batches = ClassificationBatches(encoded, labels, 4, pad_id=0, shuffle=True, bucket_by_length=True, seed=1)
    alone = list(DataLoader(batches, batch_size=None, num_workers=0))
    with_workers = list(DataLoader(batches, batch_size=None, num_workers=2))
    assert len(with_workers) == len(alone) == len(batches)  # each batch once, not once per worker
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(alone, with_workers))  # same order
