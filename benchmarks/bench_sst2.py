"""Transfer on SST-2: does pre-training help, and how does prompting compare with fine-tuning?

    python benchmarks/bench_sst2.py --data ../shared/data/sst2

Every row is scored on SST-2's dev set (872 sentences, never used for training or model
selection; selection uses 2% of train), with the shipped configs as a user would run them:

1. BERT-mini pre-trained with our masked-LM objective on SST-2's training sentences (labels
   unused): ``configs/sst2_bert_mlm.yaml``, then fine-tuned: ``configs/sst2_bert.yaml``.
2. The same model fine-tuned from random initialization: same config, same tokenizer (the
   pre-training run's), same steps; only the starting weights differ.
3. A GPT pre-trained on the same sentences (``configs/sst2_gpt.yaml``), prompted zero-shot and
   few-shot (``lmexp.prompting``), with and without contextual calibration.
4. A bag-of-words logistic regression (scikit-learn, word 1-2-grams) on the same training split.

Fine-tuning speed is examples per second over the training batches alone (validation left
out). Results are printed and appended to BENCHMARKS.md. On 2 CPU cores: about 75 minutes,
most of it the 4000 pre-training steps (``--mlm-precision bf16-mixed`` where the CPU has bf16
units; ``--mlm-checkpoint`` reuses a pre-training run).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lightning.pytorch as pl  # noqa: E402

from benchmarks.report import command_line, markdown_table, publish  # noqa: E402
from lmexp.checkpoints import load_checkpoint  # noqa: E402
from lmexp.data.classification import read_examples  # noqa: E402
from lmexp.prompting import PromptSpec, classify  # noqa: E402
from lmexp.runs import build  # noqa: E402

TEMPLATE = "{text} . overall , it 's"  # SST-2's own tokenization: lower case, split punctuation
VERBALIZERS = {"0": " bad", "1": " good"}


class TrainingClock(pl.Callback):
    """Seconds spent in training batches and the examples they held (validation excluded)."""

    def __init__(self) -> None:
        self.seconds, self.examples, self._started = 0.0, 0, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seconds += time.perf_counter() - self._started
        self.examples += int(batch["input_ids"].shape[0])


def fit(config: str, folder: Path, name: str, data: Path, extra: list[str]) -> tuple[object, TrainingClock, float]:
    clock = TrainingClock()
    started = time.perf_counter()
    sources = ["--data.init_args.source", str(data / "train.tsv")] if "mlm" in config or "gpt" in config else [
        "--data.init_args.train", str(data / "train.tsv"), "--data.init_args.test", str(data / "dev.tsv")]
    run = build("fit", configs=[ROOT / "configs" / config], args=[*sources, *extra, "--trainer.enable_progress_bar=false",
                f"--trainer.default_root_dir={folder / name}"], run_name=name, logger=False, callbacks=[clock])
    run.execute()
    return run, clock, time.perf_counter() - started


def sst2_folder(path: str) -> Path:
    """The ``--data`` folder, which must hold SST-2's train.tsv and dev.tsv."""
    data = Path(path).resolve()
    if not (data / "train.tsv").is_file() or not (data / "dev.tsv").is_file():
        raise SystemExit(f"--data {data} must hold SST-2's train.tsv and dev.tsv")
    return data


def fine_tune_row(label: str, run, clock: TrainingClock, seconds: float) -> list[str]:
    best = run.run_dir / "checkpoints" / "best.ckpt"
    result = run.trainer.test(run.model, datamodule=run.datamodule, ckpt_path=str(best), verbose=False)[0]
    return [label, f"{result['test/acc']:.4f}", f"{result['test/f1']:.4f}", f"{clock.examples / clock.seconds:,.0f}",
            f"{seconds:.0f}"]


def best_validation_loss(checkpoint: Path) -> float:
    """A pre-training run's best val/loss, as its checkpoint callback recorded it."""
    import torch

    state = torch.load(checkpoint, map_location="cpu", weights_only=True).get("callbacks", {})
    return next(float(v["best_model_score"]) for k, v in state.items() if "Checkpoint" in k)


def bag_of_words_row(data: Path) -> list[str]:
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score

    train = read_examples(data / "train.tsv", ["sentence", "content"])
    dev = read_examples(data / "dev.tsv", ["sentence", "content"])
    started = time.perf_counter()
    vectorizer = CountVectorizer(ngram_range=(1, 2), min_df=2, binary=True)
    features = vectorizer.fit_transform(train.texts)
    model = LogisticRegression(max_iter=2000, C=1.0).fit(features, train.labels)
    seconds = time.perf_counter() - started
    predicted = model.predict(vectorizer.transform(dev.texts))
    return ["bag-of-words logistic regression (1-2-grams, scikit-learn)", f"{accuracy_score(dev.labels, predicted):.4f}",
            f"{f1_score(dev.labels, predicted, average='macro'):.4f}", f"{len(train) / seconds:,.0f}", f"{seconds:.0f}"]


def prompting_rows(gpt_ckpt: Path, data: Path, shots: list[int]) -> list[list[str]]:
    loaded = load_checkpoint(gpt_ckpt)
    dev = read_examples(data / "dev.tsv", ["sentence", "content"])
    train = read_examples(data / "train.tsv", ["sentence", "content"])
    rows = []
    for k in shots:
        for calibrate in (False, True):
            spec = PromptSpec(template=TEMPLATE, verbalizers=VERBALIZERS, shots=k, calibrate=calibrate, seed=0)
            started = time.perf_counter()
            result = classify(loaded.model, loaded.tokenizer, dev, spec, train_examples=train if k else None)
            seconds = time.perf_counter() - started
            name = f"GPT prompted, {k}-shot" + (", calibrated" if calibrate else "")
            if result.n_truncated:
                name += f" ({result.n_truncated} prompts cut to fit the context)"
            rows.append([name, f"{result.metrics['accuracy']:.4f}", f"{result.metrics['macro_f1']:.4f}", "-", f"{seconds:.0f}"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "sst2"), help="folder with train.tsv, dev.tsv")
    parser.add_argument("--mlm-steps", type=int, default=None, help="pre-training steps (default: the config's)")
    parser.add_argument("--fine-tune-steps", type=int, default=None, help="fine-tuning steps (default: the config's)")
    parser.add_argument("--gpt-steps", type=int, default=None, help="GPT pre-training steps (default: the config's)")
    parser.add_argument("--few-labels", type=int, default=2000, help="also fine-tune on this many labels (0: skip)")
    parser.add_argument("--few-label-steps", type=int, default=600, help="fine-tuning steps with few labels")
    parser.add_argument("--mlm-precision", default=None, help="precision of the pre-training (default: the config's)")
    parser.add_argument("--mlm-checkpoint", help="skip pre-training: fine-tune this MLM checkpoint (from the config)")
    parser.add_argument("--gpt-checkpoint", help="skip the GPT's training: prompt this checkpoint (from the config)")
    parser.add_argument("--shots", default="0,3", help="prompting demonstrations to try, comma-separated")
    parser.add_argument("--keep", help="run in this folder and keep it (default: a temporary one)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args()
    data = sst2_folder(args.data)
    # A shorter run validates (and keeps its best checkpoint) at least twice.
    steps = lambda n: [f"--trainer.max_steps={n}", f"--trainer.val_check_interval={min(250, n // 2)}"] if n else []  # noqa: E731
    rows: list[list[str]] = []
    with tempfile.TemporaryDirectory(prefix="bench-sst2-") as scratch:
        folder = Path(args.keep or scratch).resolve()
        os.environ["LMEXP_CACHE_DIR"] = str(folder / "cache")
        if args.mlm_checkpoint:
            pretrained = Path(args.mlm_checkpoint).resolve()
            import torch

            steps_done = torch.load(pretrained, map_location="cpu", weights_only=True)["global_step"]
            mlm_note = f"pre-trained separately, best checkpoint at step {steps_done}"
        else:
            precision = [f"--trainer.precision={args.mlm_precision}"] if args.mlm_precision else []
            mlm, _, mlm_seconds = fit("sst2_bert_mlm.yaml", folder, "mlm", data, [*steps(args.mlm_steps), *precision])
            pretrained = mlm.run_dir / "checkpoints" / "best.ckpt"
            mlm_note = f"{mlm_seconds:.0f} s"
        mlm_loss = best_validation_loss(pretrained)
        tokenizer = pretrained.with_suffix("") / "tokenizer.json"  # the export beside best.ckpt
        # The random-init baseline is the pre-trained network's shape and layout with fresh weights.
        network = load_checkpoint(pretrained).config
        layout = (f"{{dropout: 0.1, block_size: {network.block_size}, norm_position: {network.norm_position}, "
                  f"embedding_norm: {str(network.embedding_norm).lower()}, norm_eps: {network.norm_eps:.6e}}}")
        tuned = fit("sst2_bert.yaml", folder, "pretrained", data,
                    [f"--model.init_args.pretrained={pretrained}", *steps(args.fine_tune_steps)])
        rows.append(fine_tune_row(f"BERT-mini, MLM-pre-trained ({mlm_note}; MLM val loss {mlm_loss:.3f}), fine-tuned",
                                  *tuned))
        scratch_run = fit("sst2_bert.yaml", folder, "scratch", data, [
            "--model.init_args.pretrained=null", "--model.init_args.network=bert-mini",
            f"--model.init_args.network_overrides={layout}",
            f"--data.init_args.tokenizer={tokenizer}", *steps(args.fine_tune_steps)])
        rows.append(fine_tune_row("BERT-mini, random init, fine-tuned (same tokenizer and steps)", *scratch_run))
        if args.few_labels:
            few = [f"--data.init_args.train_subset={args.few_labels}", *steps(args.few_label_steps)]
            tuned = fit("sst2_bert.yaml", folder, "pretrained-few", data, [f"--model.init_args.pretrained={pretrained}", *few])
            rows.append(fine_tune_row(f"BERT-mini, MLM-pre-trained, fine-tuned on {args.few_labels:,} labels", *tuned))
            scratch_run = fit("sst2_bert.yaml", folder, "scratch-few", data, [
                "--model.init_args.pretrained=null", "--model.init_args.network=bert-mini",
                f"--model.init_args.network_overrides={layout}",
                f"--data.init_args.tokenizer={tokenizer}", *few])
            rows.append(fine_tune_row(f"BERT-mini, random init, fine-tuned on {args.few_labels:,} labels", *scratch_run))
        if args.gpt_checkpoint:
            gpt_ckpt, gpt_note = Path(args.gpt_checkpoint).resolve(), "trained by the config"
        else:
            gpt, _, gpt_seconds = fit("sst2_gpt.yaml", folder, "gpt", data, steps(args.gpt_steps))
            gpt_ckpt, gpt_note = gpt.run_dir / "checkpoints" / "best.ckpt", f"trained {gpt_seconds:.0f} s"
        prompted = prompting_rows(gpt_ckpt, data, [int(k) for k in args.shots.split(",")])
        for row in prompted:
            row[0] = row[0].replace("GPT", f"GPT-nano ({gpt_note}, val loss {best_validation_loss(gpt_ckpt):.3f})", 1)
        rows += prompted
        rows.append(bag_of_words_row(data))
    table = markdown_table(["SST-2 dev (872 sentences)", "accuracy", "macro-F1", "train examples/s", "seconds"], rows)
    command = command_line("benchmarks/bench_sst2.py", parser, args, "--data ../shared/data/sst2")
    publish("SST-2: pre-training, fine-tuning, prompting and a bag-of-words baseline", command, table, not args.no_write)

if __name__ == "__main__":
    main()
