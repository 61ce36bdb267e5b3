"""Hugging Face interop on SST-2: a BERT trained and saved by transformers, imported into lmexp,
fine-tuned, and exported back.

    python benchmarks/bench_hf.py --data ../shared/data/sst2

1. transformers pre-trains a BERT-mini (``BertForMaskedLM``: 4 layers, 256 dims, 64-token
   windows) on SST-2's training sentences (labels unused) with its own model code, its own
   masking collator (40% masked) and an uncased ``BertTokenizer``, then ``save_pretrained``.
   lmexp plays no part in it.
2. lmexp imports the folder; hidden states and masked-LM logits on 256 padded dev sentences
   are compared with transformers' forward.
3. ``configs/sst2_bert.yaml`` fine-tunes it (``--model.init_args.pretrained FOLDER``), and the
   same network from random initialization (same tokenizer, config and steps) is the baseline
   of the same run, each once per ``--seeds`` seed. Every run is scored once on dev (872
   sentences, never trained or selected on).
4. ``lmexp export`` writes the fine-tuned classifier back; transformers' own forward of the
   export, with transformers' tokenizer, labels dev again, and its accuracy and the predictions
   that differ from lmexp's are reported.

Results are printed and appended to BENCHMARKS.md; progress goes to the terminal and to
``bench_hf.log`` in the work folder.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.bench_sst2 import fine_tune_row, fit, sst2_folder  # noqa: E402
from benchmarks.report import command_line, markdown_table, publish  # noqa: E402
from lmexp.checkpoints import load_checkpoint  # noqa: E402
from lmexp.hardware import cpu_has_bf16_units  # noqa: E402

log = logging.getLogger("bench_hf")
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def read_column(path: Path, candidates: tuple[str, ...]) -> tuple[list[str], list[int]]:
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    column = next(c for c in candidates if c in rows[0])
    return [row[column] for row in rows], [int(row["label"]) for row in rows]


def pretrain_with_transformers(train: Path, out: Path, steps: int, batch_size: int, block: int, lr: float,
                               bf16: bool) -> dict[str, float]:
    """A BertForMaskedLM pre-trained by transformers alone, saved with save_pretrained into ``out``."""
    import transformers
    from tokenizers import BertWordPieceTokenizer

    sentences, _ = read_column(train, ("sentence", "content"))
    wordpiece = BertWordPieceTokenizer(lowercase=True)
    wordpiece.train_from_iterator(sentences, vocab_size=8192, special_tokens=SPECIALS, show_progress=False)
    out.mkdir(parents=True, exist_ok=True)
    wordpiece.save_model(str(out))  # vocab.txt
    tokenizer = transformers.BertTokenizer(str(out / "vocab.txt"), do_lower_case=True)
    # Sentences joined by [SEP] and cut into windows of [CLS] + block - 2 tokens + [SEP].
    stream: list[int] = []
    for ids in tokenizer(sentences, add_special_tokens=False)["input_ids"]:
        stream += [*ids, tokenizer.sep_token_id]
    width = block - 2
    windows = [[tokenizer.cls_token_id, *stream[i : i + width], tokenizer.sep_token_id]
               for i in range(0, len(stream) - width + 1, width)]
    random.Random(0).shuffle(windows)
    n_val = max(1, len(windows) // 50)
    val, train_windows = torch.tensor(windows[:n_val]), torch.tensor(windows[n_val:])
    config = transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=256, num_hidden_layers=4,
                                     num_attention_heads=4, intermediate_size=1024, max_position_embeddings=block)
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(config)
    collator = transformers.DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.4, return_tensors="pt")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=lr, betas=(0.9, 0.98))
    schedule = transformers.get_cosine_schedule_with_warmup(optimizer, min(200, steps // 10), steps)
    generator = torch.Generator().manual_seed(0)

    def val_loss() -> float:
        model.eval()
        torch.manual_seed(1)  # the same masks at every evaluation
        total = 0.0
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            chunks = val.split(batch_size)
            for chunk in chunks:
                total += model(**collator([{"input_ids": row} for row in chunk])).loss.item()
        model.train()
        return total / len(chunks)

    log.info("transformers pre-training: %d train windows of %d tokens, vocabulary %d, %d steps of %d (bf16: %s)",
             len(train_windows), block, len(tokenizer), steps, batch_size, bf16)
    started, losses = time.perf_counter(), []
    model.train()
    for step in range(1, steps + 1):
        rows = train_windows[torch.randint(len(train_windows), (batch_size,), generator=generator)]
        batch = collator([{"input_ids": row} for row in rows])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 100 == 0 or step == steps:
            elapsed = time.perf_counter() - started
            log.info("step %d/%d  train loss %.3f  %.2f s/step  about %.0f s left", step, steps,
                     sum(losses[-100:]) / len(losses[-100:]), elapsed / step, elapsed / step * (steps - step))
        if step % 500 == 0 or step == steps:
            log.info("step %d  MLM val loss %.3f", step, val_loss())
    seconds = time.perf_counter() - started
    final = val_loss()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"seconds": seconds, "val_loss": final}


def parity(folder: Path, dev: list[str]) -> tuple[float, float]:
    """Largest |lmexp - transformers| of hidden states and masked-LM logits over real tokens."""
    import transformers

    theirs = transformers.BertForMaskedLM.from_pretrained(folder).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    ours = load_checkpoint(folder).model
    batch = tokenizer(dev, padding=True, truncation=True, max_length=64, return_tensors="pt")
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        out = theirs(**batch, output_hidden_states=True)
        hidden = ours(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        hidden_diff = (hidden - out.hidden_states[-1]).abs()[real].max().item()
        logit_diff = (ours.mlm_logits(hidden) - out.logits).abs()[real].max().item()
    return hidden_diff, logit_diff


def transformers_accuracy(folder: Path, dev: list[str], labels: list[int], lmexp_predictions: list[int]) -> tuple[float, int]:
    """Dev accuracy of an export by transformers' forward and tokenizer; predictions unlike lmexp's."""
    import transformers

    model = transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    predicted: list[int] = []
    with torch.no_grad():
        for start in range(0, len(dev), 64):
            batch = tokenizer(dev[start : start + 64], padding=True, truncation=True, max_length=64, return_tensors="pt")
            predicted += model(**batch).logits.argmax(-1).tolist()
    names = [model.config.id2label[i] for i in predicted]
    accuracy = sum(int(name) == label for name, label in zip(names, labels)) / len(labels)
    return accuracy, sum(int(name) != ours for name, ours in zip(names, lmexp_predictions))


def lmexp_predictions(checkpoint: Path, dev_file: Path, output: Path) -> list[int]:
    """lmexp's labels for dev, by ``lmexp predict`` (the framing lmexp test uses)."""
    from lmexp.verbs.predict import predict_file

    predict_file(str(checkpoint), str(dev_file), output=str(output))
    with open(output, encoding="utf-8", newline="") as f:
        return [int(row["prediction"]) for row in csv.DictReader(f)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "sst2"), help="folder with train.tsv, dev.tsv")
    parser.add_argument("--pretrain-steps", type=int, default=4000, help="transformers pre-training steps")
    parser.add_argument("--batch-size", type=int, default=64, help="pre-training windows per step")
    parser.add_argument("--lr", type=float, default=1e-3, help="pre-training peak learning rate")
    parser.add_argument("--fine-tune-steps", type=int, default=None, help="fine-tuning steps (default: the config's)")
    parser.add_argument("--seeds", default="1337", help="fine-tuning seeds, comma-separated (1337: the config's)")
    parser.add_argument("--hf-folder", help="skip pre-training: import this transformers folder instead")
    parser.add_argument("--precision", choices=["auto", "32", "bf16"], default="auto",
                        help="pre-training precision (auto: bf16 where the CPU has bf16 units)")
    parser.add_argument("--keep", help="run in this folder and keep it (default: a temporary one)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args()
    data = sst2_folder(args.data)
    bf16 = args.precision == "bf16" or (args.precision == "auto" and cpu_has_bf16_units())
    steps = [f"--trainer.max_steps={args.fine_tune_steps}",
             f"--trainer.val_check_interval={min(250, args.fine_tune_steps // 2)}"] if args.fine_tune_steps else []
    dev, dev_labels = read_column(data / "dev.tsv", ("sentence", "content"))
    rows: list[list[str]] = []
    with tempfile.TemporaryDirectory(prefix="bench-hf-") as scratch:
        folder = Path(args.keep or scratch).resolve()
        folder.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(folder / "bench_hf.log")
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", handlers=[logging.StreamHandler(), handler])
        os.environ["LMEXP_CACHE_DIR"] = str(folder / "cache")
        if args.hf_folder:
            hf_folder, note = Path(args.hf_folder).resolve(), "given folder"
        else:
            hf_folder = folder / "hf-bert-mini"
            made = pretrain_with_transformers(data / "train.tsv", hf_folder, args.pretrain_steps, args.batch_size, 64,
                                              args.lr, bf16)
            note = (f"{args.pretrain_steps} steps of {args.batch_size} windows, {made['seconds']:.0f} s, "
                    f"MLM val loss {made['val_loss']:.3f}")
        hidden_diff, logit_diff = parity(hf_folder, dev[:256])
        log.info("parity on 256 dev sentences: hidden states %.2e, MLM logits %.2e", hidden_diff, logit_diff)
        block_size = load_checkpoint(hf_folder).config.block_size
        starts = {
            f"BERT-mini pre-trained by transformers ({note}), imported, fine-tuned": (
                "imported", [f"--model.init_args.pretrained={hf_folder}"]),
            "BERT-mini, random init, fine-tuned (same tokenizer, config and steps)": ("scratch", [
                "--model.init_args.pretrained=null", "--model.init_args.network=bert-mini",
                f"--model.init_args.network_overrides={{dropout: 0.1, block_size: {block_size}}}",
                f"--data.init_args.tokenizer={hf_folder / 'tokenizer.json'}"]),
        }
        seeds = [int(seed) for seed in args.seeds.split(",")]
        tuned = None
        for label, (name, start) in starts.items():
            accuracies = []
            for seed in seeds:
                run = fit("sst2_bert.yaml", folder, f"{name}-{seed}", data, [*start, f"--seed_everything={seed}", *steps])
                row = fine_tune_row(f"{label}, seed {seed}", *run)
                rows.append(row)
                accuracies.append(float(row[1]))
                tuned = tuned or run
            if len(seeds) > 1:
                mean = sum(accuracies) / len(accuracies)
                spread = (sum((a - mean) ** 2 for a in accuracies) / (len(accuracies) - 1)) ** 0.5
                rows.append([f"{label}: mean of {len(seeds)} seeds (standard deviation)", f"{mean:.4f} ({spread:.4f})",
                             "-", "-", "-"])
        best = tuned[0].run_dir / "checkpoints" / "best.ckpt"
        exported = folder / "exported"
        from lmexp.checkpoints import export_checkpoint

        export_checkpoint(str(best), str(exported), overwrite=True)
        ours = lmexp_predictions(best, data / "dev.tsv", folder / "dev.predictions.csv")
        accuracy, differ = transformers_accuracy(exported, dev, dev_labels, ours)
        rows.append([f"the fine-tuned classifier exported (lmexp export), run by transformers: {differ} of {len(dev)} "
                     "predictions differ from lmexp's", f"{accuracy:.4f}", "-", "-", "-"])
    table = markdown_table(["SST-2 dev (872 sentences)", "accuracy", "macro-F1", "train examples/s", "seconds"], rows)
    table += (f"\n\nImport parity on 256 padded dev sentences, lmexp against transformers (fp32): hidden states "
              f"{hidden_diff:.1e}, masked-LM logits {logit_diff:.1e} (largest absolute difference).")
    command = command_line("benchmarks/bench_hf.py", parser, args, "--data ../shared/data/sst2")
    publish("Hugging Face interop: SST-2 with a BERT pre-trained by transformers", command, table, not args.no_write)

if __name__ == "__main__":
    main()
