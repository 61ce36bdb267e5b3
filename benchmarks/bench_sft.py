"""SST-2 as instructions: does supervised fine-tuning (SFT) make a small GPT a classifier?

    python benchmarks/bench_sft.py --data ../shared/data/sst2

Every row is scored on SST-2's dev set (872 sentences, never trained on):

1. A GPT pre-trained on SST-2's training sentences (``configs/sst2_gpt.yaml``, labels unused),
   or the checkpoint given with ``--gpt-checkpoint``.
2. That GPT fine-tuned on the training pairs as instructions (``configs/sst2_sft.yaml``: the user
   says "Review: <sentence>\\nSentiment:", the assistant answers " positive" or " negative"),
   with the loss on the answer only; scored by its greedy answer (exact match) and by the more
   likely of the two answers.
3. The same pre-trained GPT prompted zero-shot, with and without calibration, as
   ``benchmarks/bench_sst2.py`` prompts it: the same-run baseline SFT must beat.
4. The BERT-mini classifier: the published number of BENCHMARKS.md's SST-2 entry (MLM
   pre-training on the same sentences, then fine-tuning; 0.8337), quoted, not re-run; with
   ``--classifier`` both are run here (about an hour on 2 CPU cores).

Seconds are wall-clock: training for the fit rows, scoring the 872 sentences for the others.
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

from benchmarks.bench_sst2 import best_validation_loss, fine_tune_row, fit, prompting_rows, sst2_folder
from benchmarks.report import command_line, markdown_table, publish

PUBLISHED_ENTRY = "SST-2: pre-training, fine-tuning, prompting and a bag-of-words baseline, 2026-12-03, second run"
PUBLISHED_CLASSIFIER = (f"BERT-mini, MLM-pre-trained, fine-tuned (published: BENCHMARKS.md, {PUBLISHED_ENTRY}; not re-run)",
                        "0.8337", "0.8337")


def steps(n: int | None) -> list[str]:
    """Trainer overrides for n steps, validating (and keeping a best checkpoint) at least twice; a
    short run (a smoke test) warms up over a tenth of its steps, whatever the config's warmup."""
    if not n:
        return []
    short = ["--model.init_args.warmup_steps=null", "--model.init_args.warmup_fraction=0.1"] if n < 500 else []
    return [f"--trainer.max_steps={n}", f"--trainer.val_check_interval={max(1, min(250, n // 2))}", *short]


def sft_rows(gpt_ckpt: Path, folder: Path, data: Path, sft_steps: int | None, extra: list[str],
             config: str = "sst2_sft.yaml") -> list[list[str]]:
    """Fine-tune the GPT with configs/sst2_sft.yaml; score dev by generated and by chosen answers."""
    run, clock, seconds = fit(config, folder, "sft", data,
                              [f"--model.init_args.pretrained={gpt_ckpt}", *steps(sft_steps), *extra])
    best = run.run_dir / "checkpoints" / "best.ckpt"
    started = time.perf_counter()
    result = run.trainer.test(run.model, datamodule=run.datamodule, ckpt_path=str(best), verbose=False)[0]
    scoring = time.perf_counter() - started
    examples_per_second = f"{clock.examples / clock.seconds:,.0f}" if clock.seconds else "-"
    cut = run.datamodule.truncation.get("train")
    note = f", {cut.pairs} training pairs cut to fit" if cut is not None and cut.pairs else ""
    label = f"GPT-nano + SFT ({clock.examples:,} pairs seen in {seconds:.0f} s{note}; response loss {result['test/loss']:.3f})"
    rows = []
    if "test/answer_acc" in result:
        rows.append([f"{label}, generated answer (greedy, exact match)", f"{result['test/answer_acc']:.4f}",
                     f"{result.get('test/answer_f1', float('nan')):.4f}", examples_per_second, f"{scoring:.0f}"])
    if "test/choice_acc" in result:
        rows.append([f"{label}, likelier of the two answers", f"{result['test/choice_acc']:.4f}",
                     f"{result['test/choice_f1']:.4f}", examples_per_second, f"{scoring:.0f}"])
    answers = run.run_dir / "answers.csv"
    if answers.is_file():
        print(f"the fine-tuned model's answers: {answers}")
    return rows


def classifier_row(folder: Path, data: Path) -> list[str]:
    """The BERT-mini classifier as BENCHMARKS.md's SST-2 entry made it: MLM pre-training, fine-tuning."""
    mlm, _, mlm_seconds = fit("sst2_bert_mlm.yaml", folder, "mlm", data, [])
    pretrained = mlm.run_dir / "checkpoints" / "best.ckpt"
    tuned = fit("sst2_bert.yaml", folder, "classifier", data, [f"--model.init_args.pretrained={pretrained}"])
    return fine_tune_row(f"BERT-mini, MLM-pre-trained ({mlm_seconds:.0f} s), fine-tuned (run here)", *tuned)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "sst2"), help="folder with train.tsv, dev.tsv")
    parser.add_argument("--gpt-checkpoint", help="skip the GPT's pre-training: fine-tune and prompt this checkpoint")
    parser.add_argument("--gpt-steps", type=int, default=None, help="GPT pre-training steps (default: the config's)")
    parser.add_argument("--sft-steps", type=int, default=None, help="SFT steps (default: the config's)")
    parser.add_argument("--sft-lr", type=float, default=None, help="SFT peak learning rate (default: the config's)")
    parser.add_argument("--sft-config", default="sst2_sft.yaml", help="the SFT config, in configs/ or a path")
    parser.add_argument("--classifier", action="store_true", help="also run the BERT-mini classifier (default: quote it)")
    parser.add_argument("--keep", help="run in this folder and keep it (default: a temporary one)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args()
    data = sst2_folder(args.data)
    rows: list[list[str]] = []
    with tempfile.TemporaryDirectory(prefix="bench-sft-") as scratch:
        folder = Path(args.keep or scratch).resolve()
        os.environ["LMEXP_CACHE_DIR"] = str(folder / "cache")
        if args.gpt_checkpoint:
            gpt_ckpt, gpt_note = Path(args.gpt_checkpoint).resolve(), "pre-trained separately"
        else:
            gpt, _, gpt_seconds = fit("sst2_gpt.yaml", folder, "gpt", data, steps(args.gpt_steps))
            gpt_ckpt, gpt_note = gpt.run_dir / "checkpoints" / "best.ckpt", f"pre-trained {gpt_seconds:.0f} s"
        gpt_note += f", val loss {best_validation_loss(gpt_ckpt):.3f}"
        lr = [f"--model.init_args.lr={args.sft_lr}"] if args.sft_lr else []
        rows += [[row[0].replace("GPT-nano", f"GPT-nano ({gpt_note})", 1), *row[1:]]
                 for row in sft_rows(gpt_ckpt, folder, data, args.sft_steps, lr, args.sft_config)]
        prompted = prompting_rows(gpt_ckpt, data, [0])
        rows += [[row[0].replace("GPT", "the same GPT-nano", 1), *row[1:]] for row in prompted]
        rows.append(classifier_row(folder, data) if args.classifier else [*PUBLISHED_CLASSIFIER, "-", "-"])
    table = markdown_table(["SST-2 dev (872 sentences)", "accuracy", "macro-F1", "train examples/s", "seconds"], rows)
    command = command_line("benchmarks/bench_sft.py", parser, args, "--data ../shared/data/sst2")
    publish("SST-2 as instructions: SFT of a GPT against prompting and a classifier", command, table, not args.no_write)


if __name__ == "__main__":
    main()
