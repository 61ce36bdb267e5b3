"""Time to reach a validation loss on Tiny Shakespeare: lmexp's shipped config vs a plain fp32 loop.

    python benchmarks/bench_time_to_loss.py --source ../shared/data/tinyshakespeare.txt

Both train the nanoGPT CPU recipe's model (4 layers, 4 heads, 128 dims, block 64, dropout 0) on
the same character-level data, and both evaluate on the same held-out windows (the first
``--val-batches`` batches of 64 windows of the val split) every ``--eval-tokens`` training
tokens, stopping at the first evaluation at or below ``--target``:

- ``plain``: a hand-written fp32 loop with nanoGPT's settings (batch 12, lr 1e-3, 100 warmup
  steps, cosine to 1e-4 over 2000 steps, AdamW betas 0.9/0.99, weight decay 0.1, clip 1.0);
- ``lmexp``: ``lmexp fit --config configs/shakespeare_char.yaml`` as ``lmexp.runs.build`` makes
  it (its batch size, learning rate, schedule and precision; its progress display runs, though
  into a pipe, where it prints plain lines; MLflow tracking on, into a fresh SQLite store in the
  run's temporary folder, never ``./mlflow.db``), without the config's early stopping and
  samples, stopping at the target instead.

Each run is a fresh process; the table gives the wall time from process start and from the
first training step to the evaluation that reached the target, the steps and tokens it took,
and the lmexp/plain ratio. Results are printed and appended to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROCESS_START = time.perf_counter()
EVAL_SECONDS = [0.0]  # time spent in the shared evaluations, the same work for both runs
RECIPE = dict(batch_size=12, lr=1e-3, warmup=100, steps=2000, min_lr_ratio=0.1, betas=(0.9, 0.99), weight_decay=0.1)
VAL_BATCH = 64


def _val_batches(data, count: int) -> list:
    """The first ``count`` batches of 64 val windows: identical for both runs."""
    from lmexp.data.batches import TokenBatches

    assert data.cache is not None
    window, stride = data._window()
    batches = TokenBatches(data.cache.tokens("val"), window, stride, VAL_BATCH, shuffle=False)
    return [b for _, b in zip(range(count), batches)]


def _evaluate(model, batches) -> float:
    import torch
    import torch.nn.functional as F

    started = time.perf_counter()
    model.eval()
    with torch.no_grad():
        losses = [F.cross_entropy(model(b["input_ids"]).flatten(0, 1), b["labels"].flatten()) for b in batches]
    model.train()
    loss = float(torch.stack(losses).mean())
    EVAL_SECONDS[0] += time.perf_counter() - started
    return loss


def run_plain(source: str, target: float, val_batches: int, eval_tokens: int) -> dict:
    import torch

    from benchmarks.plain_loop import endless_batches, plain_optimizer, plain_step
    from lmexp.data import TextDataModule
    from lmexp.models import build_model, from_name

    torch.manual_seed(1337)
    data = TextDataModule(source, tokenizer="char", batch_size=RECIPE["batch_size"], block_size=64,
                          task="causal_lm", dedupe="none")
    data.prepare_data()
    data.setup("fit")
    val = _val_batches(data, val_batches)
    model = build_model(from_name("gpt-nano", vocab_size=data.vocab_size, dropout=0.0))
    total = RECIPE["steps"]
    optimizer, scheduler = plain_optimizer(
        model, RECIPE["lr"], RECIPE["betas"], RECIPE["weight_decay"], RECIPE["warmup"], total, RECIPE["min_lr_ratio"]
    )
    every = max(1, eval_tokens // (RECIPE["batch_size"] * 64))
    train_start = time.perf_counter()
    curve = []
    for step, batch in enumerate(endless_batches(data), start=1):
        plain_step(model, model, batch, optimizer, scheduler, 1.0)
        if step % every == 0 or step == total:
            val_loss = _evaluate(model, val)
            curve.append((step, val_loss))
            if val_loss <= target or step == total:
                return _result(step, RECIPE["batch_size"] * 64, val_loss, train_start, curve, target)
    raise AssertionError("unreachable")


def run_lmexp(source: str, target: float, val_batches: int, eval_tokens: int, extra: list[str]) -> dict:
    import lightning.pytorch as pl

    from lmexp.runs import build

    state: dict = {"curve": []}

    class TargetWatch(pl.Callback):
        """Evaluates the shared windows every ``eval_tokens`` tokens and stops at the target."""

        def on_train_start(self, trainer, pl_module) -> None:
            state["train_start"] = time.perf_counter()
            state["val"] = _val_batches(trainer.datamodule, val_batches)
            state["tokens_per_step"] = trainer.datamodule.batch_size * pl_module.block_size * trainer.accumulate_grad_batches
            state["every"] = max(1, eval_tokens // state["tokens_per_step"])

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            step = trainer.global_step
            if step % state["every"] and step != trainer.max_steps:
                return
            val_loss = _evaluate(pl_module.model, state["val"])
            state["curve"].append((step, val_loss))
            if val_loss <= target:
                trainer.should_stop = True
                state["done"] = (step, val_loss, time.perf_counter())

    workdir = Path(tempfile.mkdtemp(prefix="lmexp-ttl-"))
    # Tracked as a user's run is, into a fresh store beside the run rather than ./mlflow.db.
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir / 'mlflow.db'}"
    args = [f"--data.source={source}", f"--trainer.default_root_dir={workdir}", "--trainer.limit_val_batches=0",
            *extra]
    run = build("fit", configs=[ROOT / "configs" / "shakespeare_char.yaml"], args=args, callbacks=[TargetWatch()])
    # The config's own early stopping and samples would change what is timed: keep the bar,
    # tracking and checkpoints, drop those two, and let TargetWatch decide when to stop.
    run.trainer.callbacks[:] = [c for c in run.trainer.callbacks
                                if type(c).__name__ not in ("EarlyStopping", "SampleText")]
    run.execute()
    step, val_loss, ended = state.get("done") or (run.trainer.global_step, state["curve"][-1][1], time.perf_counter())
    return _result(step, state["tokens_per_step"], val_loss, state["train_start"], state["curve"], target, ended)


def _result(step, tokens_per_step, val_loss, train_start, curve, target, ended=None) -> dict:
    ended = ended or time.perf_counter()
    return {
        "reached": val_loss <= target, "steps": step, "tokens": step * tokens_per_step, "val_loss": val_loss,
        "train_s": ended - train_start, "process_s": ended - PROCESS_START, "eval_s": EVAL_SECONDS[0],
        "ms_per_step": 1000 * (ended - train_start - EVAL_SECONDS[0]) / step, "curve": curve,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True, help="path of tinyshakespeare.txt")
    parser.add_argument("--target", type=float, default=1.90)
    parser.add_argument("--val-batches", type=int, default=8, help="batches of 64 val windows per evaluation")
    parser.add_argument("--eval-tokens", type=int, default=38_400, help="training tokens between evaluations")
    parser.add_argument("--runs", nargs="+", default=["plain", "lmexp"], choices=["plain", "lmexp"])
    parser.add_argument("--lmexp-args", nargs="*", default=[], help="extra CLI overrides for the lmexp run")
    parser.add_argument("--output", default=None)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        if args.worker == "plain":
            result = run_plain(args.source, args.target, args.val_batches, args.eval_tokens)
        else:
            result = run_lmexp(args.source, args.target, args.val_batches, args.eval_tokens, args.lmexp_args)
        print("RESULT " + json.dumps(result))
        return

    from benchmarks.report import BENCHMARKS_FILE, append_entry, markdown_table

    os.environ.setdefault("LMEXP_CACHE_DIR", tempfile.mkdtemp(prefix="lmexp-bench-cache-"))
    results = {}
    for run in args.runs:
        command = [sys.executable, __file__, "--worker", run, "--source", args.source, "--target", str(args.target),
                   "--val-batches", str(args.val_batches), "--eval-tokens", str(args.eval_tokens)]
        if args.lmexp_args:
            command += ["--lmexp-args", *args.lmexp_args]
        print(f"running {run} ...", flush=True)
        finished = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        line = next((l for l in finished.stdout.splitlines() if l.startswith("RESULT ")), None)
        if finished.returncode != 0 or line is None:
            raise SystemExit(f"{run} failed:\n{finished.stderr[-3000:]}")
        results[run] = json.loads(line[len("RESULT "):])
        print(run, {k: v for k, v in results[run].items() if k != "curve"}, flush=True)
    base = results.get("plain")
    rows = []
    for run, r in results.items():
        ratio = f"{r['train_s'] / base['train_s']:.2f}x" if base else ""
        rows.append([run, "yes" if r["reached"] else "no", str(r["steps"]), f"{r['tokens']:,}", f"{r['val_loss']:.3f}",
                     f"{r['train_s']:.1f}", f"{r['eval_s']:.1f}", f"{r['ms_per_step']:.1f}", f"{r['process_s']:.1f}", ratio])
    table = markdown_table(
        ["run", f"reached {args.target}", "steps", "tokens", "val loss", "train s", "of which eval s",
         "ms/step (no eval)", "process s", "train time vs plain"],
        rows,
    )
    command = "python benchmarks/bench_time_to_loss.py " + " ".join(sys.argv[1:])
    append_entry(f"Time to val loss {args.target}, Tiny Shakespeare recipe", command, table,
                 Path(args.output or BENCHMARKS_FILE))


if __name__ == "__main__":
    main()
