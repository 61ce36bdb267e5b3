"""Fine-tuning recipes for a pretrained encoder: SST-2 with a BERT pre-trained by transformers.

    python benchmarks/bench_encoder_recipes.py --data ../shared/data/sst2 --hf-folder FOLDER

A transformers BERT folder (``--hf-folder``; without it, ``benchmarks/bench_hf.py``'s
transformers pre-training builds one: a BertForMaskedLM, 4 layers, 256 dims, on SST-2's training
sentences) is fine-tuned on SST-2 with two recipes, once per ``--seeds`` seed each:

1. ``configs/sst2_bert.yaml``: the recipe tuned for a BERT-mini that lmexp pre-trained from
   scratch (lr 3e-4, head 1e-3, layer decay 0.9, 100 warmup steps, cosine, 2000 steps, early
   stopping).
2. ``configs/finetune_encoder.yaml``: the field's settings for an encoder pre-trained elsewhere
   (lr 5e-5, warmup over 10% of the steps, linear decay to 0, weight decay 0.01, 3 epochs).

Every run keeps its best checkpoint by validation accuracy (2% of train) and is scored once on
dev (872 sentences, never trained or selected on). Rows per seed, then mean and standard
deviation per recipe. ``--max-steps`` and ``--epochs`` shorten the runs (a smoke test); the table
then says so. Results are printed and appended to BENCHMARKS.md; progress goes to the terminal
and to ``bench_encoder_recipes.log`` in the work folder.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_hf import pretrain_with_transformers  # noqa: E402
from benchmarks.bench_sst2 import fine_tune_row, fit, sst2_folder  # noqa: E402
from benchmarks.report import command_line, markdown_table, publish  # noqa: E402
from lmexp.data.classification import read_examples  # noqa: E402
from lmexp.hardware import cpu_has_bf16_units  # noqa: E402

log = logging.getLogger("bench_encoder_recipes")
RECIPES = {"from-scratch": "sst2_bert.yaml", "pretrained-encoder": "finetune_encoder.yaml"}


def recipe_settings(run) -> str:
    """What the run trained with, read from the run itself (not from this file's prose)."""
    hp = run.model.hparams
    parts = [f"lr {hp.lr:g}"]
    if hp.get("head_lr"):
        parts.append(f"head {hp.head_lr:g}")
    if hp.get("layer_lr_decay", 1.0) != 1.0:
        parts.append(f"layer decay {hp.layer_lr_decay:g}")
    warmup = f"warmup {hp.warmup_fraction:.0%} of the steps" if hp.get("warmup_fraction") is not None else \
        f"{run.model.warmup_steps_for(run.model._schedule_steps or 1)} warmup steps"
    floor = "to 0" if hp.min_lr_ratio == 0 else f"to {hp.min_lr_ratio:g} of lr"
    parts += [warmup, f"{hp.schedule} decay {floor}", f"weight decay {hp.weight_decay:g}",
              f"batch {run.datamodule.batch_size}", f"{run.trainer.global_step} steps"]
    if run.trainer.early_stopping_callback is not None:
        parts.append("early stopping")
    return ", ".join(parts)


def mean_and_spread(values: list[float]) -> str:
    """``mean (sample standard deviation)``; one value has no spread."""
    spread = f"{statistics.stdev(values):.4f}" if len(values) > 1 else "-"
    return f"{statistics.mean(values):.4f} ({spread})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "sst2"), help="folder with train.tsv, dev.tsv")
    parser.add_argument("--hf-folder", help="the transformers encoder folder to fine-tune (default: pre-train one)")
    parser.add_argument("--pretrain-steps", type=int, default=4000, help="transformers pre-training steps (no --hf-folder)")
    parser.add_argument("--seeds", default="1,2,3", help="fine-tuning seeds, comma-separated")
    parser.add_argument("--recipes", default=",".join(RECIPES), help=f"recipes to run, comma-separated: {', '.join(RECIPES)}")
    parser.add_argument("--max-steps", type=int, default=None, help="cap every fine-tuning run at this many steps")
    parser.add_argument("--epochs", type=int, default=None, help="epochs of the pretrained-encoder recipe (default: the config's)")
    parser.add_argument("--keep", help="run in this folder and keep it (default: a temporary one)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args()
    data = sst2_folder(args.data)
    seeds = [int(seed) for seed in args.seeds.split(",")]
    recipes = [name.strip() for name in args.recipes.split(",")]
    unknown = [name for name in recipes if name not in RECIPES]
    if unknown:
        parser.error(f"--recipes {','.join(unknown)}: choose from {', '.join(RECIPES)}")
    # A capped run validates (and keeps its best checkpoint) at least twice, counted in steps.
    capped = [f"--trainer.max_steps={args.max_steps}", f"--trainer.val_check_interval={max(1, min(250, args.max_steps // 2))}",
              "--trainer.check_val_every_n_epoch=null"] if args.max_steps else []
    rows: list[list[str]] = []
    with tempfile.TemporaryDirectory(prefix="bench-encoder-recipes-") as scratch:
        folder = Path(args.keep or scratch).resolve()
        folder.mkdir(parents=True, exist_ok=True)
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s",
                            handlers=[logging.StreamHandler(), logging.FileHandler(folder / "bench_encoder_recipes.log")])
        os.environ["LMEXP_CACHE_DIR"] = str(folder / "cache")
        if args.hf_folder:
            hf_folder, note = Path(args.hf_folder).resolve(), "given folder"
        else:
            hf_folder = folder / "hf-bert-mini"
            made = pretrain_with_transformers(data / "train.tsv", hf_folder, args.pretrain_steps, 64, 64, 1e-3,
                                              cpu_has_bf16_units())
            note = f"{args.pretrain_steps} steps, {made['seconds']:.0f} s, MLM val loss {made['val_loss']:.3f}"
        for recipe in recipes:
            config = RECIPES[recipe]
            extra = [f"--model.init_args.pretrained={hf_folder}", *capped]
            if recipe == "pretrained-encoder" and (args.epochs or args.max_steps):
                # Epochs of the recipe; a cap alone is the run's length (its validations count steps).
                extra.append(f"--trainer.max_epochs={args.epochs or -1}")
            accuracies, f1s, settings = [], [], ""
            for seed in seeds:
                log.info("fine-tuning with configs/%s, seed %d", config, seed)
                run = fit(config, folder, f"{recipe}-{seed}", data, [*extra, f"--seed_everything={seed}"])
                settings = recipe_settings(run[0])
                row = fine_tune_row(f"configs/{config}, seed {seed}", *run)
                log.info("%s: dev accuracy %s (%s)", row[0], row[1], settings)
                rows.append(row)
                accuracies.append(float(row[1]))
                f1s.append(float(row[2]))
            rows.append([f"**configs/{config}** ({settings}): mean of {len(seeds)} seeds (standard deviation)",
                         mean_and_spread(accuracies), mean_and_spread(f1s), "-", "-"])
    dev_size = len(read_examples(data / "dev.tsv", ["sentence", "content"]))
    table = markdown_table([f"SST-2 dev ({dev_size} sentences)", "accuracy", "macro-F1", "train examples/s", "seconds"], rows)
    table += (f"\n\nThe encoder: a BERT-mini pre-trained by transformers ({note}), imported with "
              "`--model.init_args.pretrained`; the same folder for every run.")
    if args.max_steps or args.epochs:
        table += " Runs shortened by --max-steps/--epochs: not the recipes as shipped."
    command = command_line("benchmarks/bench_encoder_recipes.py", parser, args, "--data ../shared/data/sst2",
                           unlisted=("data", "keep", "no_write", "hf_folder"))
    if args.hf_folder:
        command += " --hf-folder FOLDER"
    publish("Fine-tuning recipes for a BERT pre-trained by transformers: SST-2", command, table, not args.no_write)


if __name__ == "__main__":
    main()
