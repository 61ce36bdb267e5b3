"""Time to a target validation loss on Tiny Shakespeare: nanoGPT's own train.py beside lmexp runs.

    python benchmarks/bench_nanogpt.py --nanogpt-dir /tmp/nanoGPT --source ../shared/data/tinyshakespeare.txt \\
        --size recipe --lmexp nanogpt-settings --lmexp shipped=configs/shakespeare_char.yaml \\
        --baseline nanogpt-settings
    python benchmarks/bench_nanogpt.py --nanogpt-dir /tmp/nanoGPT --source ../shared/data/tinyshakespeare.txt \\
        --size medium --lmexp nanogpt-settings --max-seconds 14400

nanoGPT (github.com/karpathy/nanoGPT) is the hand-written reference. Everything trains on the
same characters: nanoGPT's split of the file, the first 90% for training and the last 10% for
validation. When the checkout has no ``data/shakespeare_char/train.bin`` yet, the file is copied
to ``data/shakespeare_char/input.txt`` there and nanoGPT's ``prepare.py`` is run (it downloads
nothing when input.txt exists); an existing ``val.bin`` must decode to the same validation text.

Sizes (``SIZES``; ``--target`` and ``--eval-tokens`` default per size):

- ``recipe``: nanoGPT's CPU recipe from its README (4 layers, 4 heads, 128 dims, block 64,
  batch 12, dropout 0, 2000 iterations), target 1.90, evaluated every 76,800 tokens (100 steps);
- ``medium``: nanoGPT's GPU config on a CPU budget (6 layers, 6 heads, 384 dims, block 256, batch
  16 instead of 64, dropout 0.2, 5000 iterations), target 1.60, every 409,600 tokens (100 steps).

Both use nanoGPT's optimizer settings: lr 1e-3, 100 warmup iterations, cosine to 1e-4, AdamW
betas 0.9/0.99, weight decay 0.1, gradient clipping at 1.0.

**nanoGPT** runs ``train.py config/train_shakespeare_char.py`` with the size's flags and
``--device=cpu --compile=False --dtype=float32 --always_save_checkpoint=False
--eval_interval=<steps per --eval-tokens> --eval_iters=<200 recipe, 40 medium>``; its val loss
is its own estimate (``eval_iters`` batches of random windows of val.bin: about 150,000 val
characters at either size). Its time to target is the sum of its printed per-iteration times
(``iter N: ... time Tms``) of the iterations before the first evaluation at or below the target
(``step N: ... val loss Y``: the model after N iterations). An iteration during which an
evaluation ran (N a multiple of the interval, iteration 0 included) also holds that evaluation
and the checkpoint it may write, so it is counted at the median time of the other iterations.
nanoGPT is stopped as soon as it prints that evaluation.

**lmexp** runs are given as ``--lmexp NAME=CONFIG.yaml[::--key=value::--key2=value]``: a name, a
config file, and command-line overrides each introduced by ``::`` (exactly as ``lmexp fit``
would take them). ``--lmexp nanogpt-settings`` (with no ``=CONFIG``, optionally followed by more
``::--key=value``) is built in: ``configs/shakespeare_char.yaml`` with nanoGPT's settings for the
size (lr 1e-3, 100 warmup steps, ``min_lr_ratio`` 0.1, 2000 or 5000 steps; for medium also
``network=gpt-mini``, batch 16), the default when no ``--lmexp`` is given. Each lmexp run is built by
``lmexp.runs.build`` as ``lmexp fit`` would build it (progress display into a pipe, MLflow
tracking into a fresh SQLite store in a temporary folder, checkpoints) in a fresh process, with
``--data.source=<the first 90% of the characters as a file> --data.val_fraction=0
--data.dedupe=none --trainer.limit_val_batches=0``, and without the config's EarlyStopping and
SampleText callbacks. lmexp splits text into paragraphs on blank lines and joins them back with
one blank line, which gives back the training text (the file has two triple newlines).
Every ``--eval-tokens`` training tokens (so runs of any batch size are evaluated at the same
token counts, and as nanoGPT is) and once before the first step, the network (in eval mode,
under ``torch.no_grad``, fp32) is scored on the last 10% of the characters encoded with the
run's own tokenizer: the mean token cross entropy of every next-token prediction over all
disjoint windows of the run's block size (1,742 windows at block 64, 435 at 256;
``--val-windows N`` takes N evenly spaced ones instead), the window's first token with no
context. The run stops at the first evaluation at or below the target. Its time to target is
the wall time from the start of training to the end of that evaluation minus all evaluation
time. With a tokenizer other than ``char`` the loss is per token, not per character, and does
not compare with nanoGPT's (a warning says so).

Runs go one at a time, nanoGPT first, then the lmexp runs in the order given, in one invocation,
so they share the machine's state. ``--max-iters`` stops every run after that many optimizer
steps without changing its learning-rate schedule (nanoGPT's ``lr_decay_iters`` stays the
size's), ``--max-seconds`` after that much wall time from its process start; a run that stops
without reaching the target says "no". The table gives per run: whether it reached the target,
its steps and tokens at the final evaluation (the first at or below the target, else its last),
that evaluation's val loss, training seconds without evaluations, ms per step, process seconds
(from process start to that evaluation, imports and data preparation included), and the ratio
of its training time to nanoGPT's and to the ``--baseline`` lmexp run's ("<" or ">" where only
one of the two reached the target: a bound). It is printed and appended to BENCHMARKS.md
(``--output`` elsewhere), with a plot of every run's val loss against training seconds and
against tokens (``benchmarks/results/nanogpt_<size>.png``) and all results and curves in
``benchmarks/results/nanogpt_<size>.json`` (``--results-dir`` elsewhere).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROCESS_START = time.perf_counter()
SEPARATOR = "::"  # between an lmexp run's config and each of its overrides
BUILTIN_RUN = "nanogpt-settings"
LMEXP_CONFIG = "configs/shakespeare_char.yaml"
NANOGPT_SCHEDULE = [
    "--learning_rate=1e-3",
    "--min_lr=1e-4",
    "--warmup_iters=100",
    "--beta2=0.99",
    "--weight_decay=0.1",
    "--grad_clip=1.0",
]
SIZES: dict[str, dict[str, Any]] = {
    "recipe": {
        "n_layer": 4,
        "n_head": 4,
        "n_embd": 128,
        "block_size": 64,
        "batch_size": 12,
        "dropout": 0.0,
        "max_iters": 2000,
        "target": 1.90,
        "eval_iters": 200,
        "lmexp": [
            "--model.init_args.lr=1e-3",
            "--model.init_args.warmup_steps=100",
            "--model.init_args.min_lr_ratio=0.1",
            "--trainer.max_steps=2000",
        ],
    },
    "medium": {
        "n_layer": 6,
        "n_head": 6,
        "n_embd": 384,
        "block_size": 256,
        "batch_size": 16,
        "dropout": 0.2,
        "max_iters": 5000,
        "target": 1.60,
        "eval_iters": 40,
        "lmexp": [
            "--model.init_args.network=gpt-mini",
            "--data.batch_size=16",
            "--model.init_args.lr=1e-3",
            "--model.init_args.warmup_steps=100",
            "--model.init_args.min_lr_ratio=0.1",
            "--trainer.max_steps=5000",
        ],
    },
}
EVAL_STEPS = 100  # default --eval-tokens: this many steps of the size's batch
EVAL_BATCH = 64  # windows per forward pass in lmexp's evaluation
ITERATION = re.compile(r"^iter (\d+): loss (\S+), time ([\d.]+)ms")
EVALUATION = re.compile(r"^step (\d+): train loss (\S+), val loss (\S+)")


# --------------------------------------------------------------------------- the text
def split_text(source: Path) -> tuple[str, str]:
    """nanoGPT's split: the first 90% of the characters train, the rest validate."""
    text = source.read_text(encoding="utf-8")
    cut = int(len(text) * 0.9)
    return text[:cut], text[cut:]


def prepare_nanogpt_data(nanogpt: Path, source: Path, val_text: str) -> None:
    """Run nanoGPT's prepare.py on the source if its data is missing; check val.bin is our val text."""
    import numpy as np

    folder = nanogpt / "data" / "shakespeare_char"
    if not (folder / "train.bin").is_file():
        inputs = folder / "input.txt"
        if not inputs.is_file() or inputs.read_bytes() != source.read_bytes():
            shutil.copyfile(source, inputs)  # prepare.py downloads nothing when input.txt exists
        print(f"preparing nanoGPT's data: python data/shakespeare_char/prepare.py in {nanogpt}", flush=True)
        subprocess.run(
            [sys.executable, "data/shakespeare_char/prepare.py"], cwd=nanogpt, check=True, stdout=subprocess.DEVNULL
        )
    itos = pickle.loads((folder / "meta.pkl").read_bytes())["itos"]
    val_ids = np.fromfile(folder / "val.bin", dtype=np.uint16)
    if "".join(itos[int(i)] for i in val_ids) != val_text:
        raise SystemExit(
            f"{folder / 'val.bin'} is not the last 10% of {source}: delete {folder}/*.bin and "
            "input.txt there to let this benchmark prepare it again"
        )


# --------------------------------------------------------------------------- subprocesses
def stream(command: list[str], cwd: Path, log: Path, max_seconds: float | None, on_line) -> tuple[int, float]:
    """Run a command, passing each output line and the seconds since its start to ``on_line``
    (which returns True to stop it there); kill it past ``max_seconds`` plus a grace period.
    Returns the exit code and the seconds it ran."""
    started = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "a", encoding="utf-8", buffering=1) as out:  # line by line, to follow it
        out.write(f"$ {shlex.join(command)}\n")
        out.flush()
        proc = subprocess.Popen(
            command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
        watchdog = threading.Timer(max_seconds * 1.1 + 120, proc.kill) if max_seconds else None
        if watchdog:
            watchdog.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                out.write(line)
                if on_line(line.rstrip("\n"), time.perf_counter() - started):
                    proc.terminate()
                    break
            proc.stdout.close()
            code = proc.wait()
        finally:
            if watchdog:
                watchdog.cancel()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return code, time.perf_counter() - started


def run_nanogpt(args: argparse.Namespace, size: dict, eval_interval: int, work: Path) -> dict:
    max_iters = args.max_iters or size["max_iters"]
    eval_iters = args.nanogpt_eval_iters or size["eval_iters"]
    command = [
        sys.executable,
        "-u",
        "train.py",
        "config/train_shakespeare_char.py",
        "--device=cpu",
        "--compile=False",
        "--dtype=float32",
        "--log_interval=1",
        f"--eval_interval={eval_interval}",
        f"--eval_iters={eval_iters}",
        "--always_save_checkpoint=False",
        f"--out_dir={work / 'nanogpt-out'}",
        "--gradient_accumulation_steps=1",
        *(f"--{key}={size[key]}" for key in ("block_size", "batch_size", "n_layer", "n_head", "n_embd", "dropout")),
        f"--max_iters={max_iters}",
        f"--lr_decay_iters={size['max_iters']}",
        *NANOGPT_SCHEDULE,
    ]
    iterations: dict[int, float] = {}  # iteration -> its printed time in ms
    train_losses: dict[int, float] = {}
    evaluations: list[tuple[int, float, float]] = []  # (step, val loss, seconds since process start)

    def on_line(line: str, seconds: float) -> bool:
        if m := ITERATION.match(line):
            iterations[int(m.group(1))] = float(m.group(3))
            train_losses[int(m.group(1))] = float(m.group(2))
        elif m := EVALUATION.match(line):
            step, loss = int(m.group(1)), float(m.group(3))
            evaluations.append((step, loss, seconds))
            print(f"  nanoGPT step {step}: val loss {loss:.4f} ({seconds:.0f} s)", flush=True)
            if step > 0 and loss <= args.target:
                return True
        return seconds > args.max_seconds if args.max_seconds else False

    print(f"running nanoGPT train.py ({shlex.join(command[2:])}) ...", flush=True)
    code, ran = stream(command, args.nanogpt_dir, work / "nanogpt.log", args.max_seconds, on_line)
    if not evaluations or code not in (0, -15, -9):  # -15, -9: stopped here at the target or a cap
        raise SystemExit(f"nanoGPT failed (exit code {code}): see {work / 'nanogpt.log'}")
    final = next((e for e in evaluations if e[0] > 0 and e[1] <= args.target), evaluations[-1])
    step = final[0]
    evaluated = {s for s in range(step) if s % eval_interval == 0}  # iterations that also held an evaluation
    plain = [iterations[i] for i in range(step) if i not in evaluated and i in iterations]
    median = statistics.median(plain) if plain else statistics.median(iterations.values())

    def train_seconds(upto: int) -> float:
        return sum(median if i in evaluated or i not in iterations else iterations[i] for i in range(upto)) / 1000

    tokens_per_step = size["batch_size"] * size["block_size"]
    curve = [
        {"step": s, "tokens": s * tokens_per_step, "train_s": train_seconds(s), "val_loss": loss, "process_s": t}
        for s, loss, t in evaluations
        if s <= step
    ]
    return {
        "name": "nanoGPT",
        "kind": "nanogpt",
        "command": shlex.join(["python", *command[2:]]),
        "reached": final[1] <= args.target,
        "steps": step,
        "tokens": step * tokens_per_step,
        "tokens_per_step": tokens_per_step,
        "val_loss": final[1],
        "train_s": train_seconds(step),
        "process_s": final[2],
        "exit_s": ran,
        "median_iter_ms": median,
        "mean_iter_ms": statistics.fmean(plain) if plain else median,
        "eval_iterations": len(evaluated),
        "curve": curve,
        "train_loss": [[i, train_losses[i]] for i in sorted(train_losses)],
        "eval_seconds": sum(iterations.get(i, median) - median for i in evaluated) / 1000,
    }


def parse_lmexp_spec(spec: str, size: dict) -> dict:
    """``NAME=CONFIG.yaml[::--key=value...]``, or the built-in ``nanogpt-settings``."""
    if "=" not in spec.split(SEPARATOR)[0]:
        name, *overrides = spec.split(SEPARATOR)
        if name != BUILTIN_RUN:
            raise SystemExit(f"--lmexp {spec!r}: give NAME=CONFIG.yaml[{SEPARATOR}--key=value...] or {BUILTIN_RUN}")
        return {"name": name, "config": str(ROOT / LMEXP_CONFIG), "overrides": [*size["lmexp"], *overrides]}
    name, rest = spec.split("=", 1)
    config, *overrides = rest.split(SEPARATOR)
    path = Path(config)
    if not path.is_file() and (ROOT / config).is_file():
        path = ROOT / config
    if not path.is_file():
        raise SystemExit(f"--lmexp {spec!r}: config file {config!r} does not exist")
    bad = [o for o in overrides if not o.startswith("--")]
    if bad:
        raise SystemExit(
            f"--lmexp {spec!r}: each override after {SEPARATOR} must look like --key=value, not {bad[0]!r}"
        )
    return {"name": name, "config": str(path.resolve()), "overrides": overrides}


def run_lmexp(args: argparse.Namespace, spec: dict, files: dict, eval_tokens: int, work: Path) -> dict:
    job = dict(
        spec,
        **files,
        target=args.target,
        eval_tokens=eval_tokens,
        max_iters=args.max_iters,
        max_seconds=args.max_seconds,
        val_windows=args.val_windows,
        workdir=str(work / f"lmexp-{spec['name']}"),
    )
    job_file = work / f"lmexp-{spec['name']}.json"
    job_file.write_text(json.dumps(job))
    evaluations: list[tuple[dict, float]] = []
    result: dict = {}

    def on_line(line: str, seconds: float) -> bool:
        if line.startswith("EVAL "):
            point = json.loads(line[5:])
            evaluations.append((point, seconds))
            print(
                f"  {spec['name']} step {point['step']}: val loss {point['val_loss']:.4f} "
                f"({point['train_s']:.0f} s training, {seconds:.0f} s)",
                flush=True,
            )
        elif line.startswith("RESULT "):
            result.update(json.loads(line[7:]))
        return False

    print(f"running lmexp {spec['name']} ({Path(spec['config']).name} {' '.join(spec['overrides'])}) ...", flush=True)
    log = work / f"lmexp-{spec['name']}.log"
    code, ran = stream(
        [sys.executable, "-u", __file__, "--worker", str(job_file)], ROOT, log, args.max_seconds, on_line
    )
    if code != 0 or not result:
        tail = "".join(log.read_text(encoding="utf-8").splitlines(keepends=True)[-30:])
        raise SystemExit(f"lmexp run {spec['name']} failed (exit code {code}); the end of {log}:\n{tail}")
    arrival = {point["step"]: seconds for point, seconds in evaluations}
    for point in result["curve"]:
        point["process_s"] = arrival.get(point["step"])
    return dict(
        result,
        name=spec["name"],
        kind="lmexp",
        config=spec["config"],
        overrides=spec["overrides"],
        process_s=arrival.get(result["steps"], ran),
        exit_s=ran,
    )


# --------------------------------------------------------------------------- the lmexp worker
def worker(job_file: str) -> None:
    """One lmexp run in this fresh process: prints EVAL lines as it goes and a RESULT line."""
    import lightning.pytorch as pl
    import torch
    import torch.nn.functional as F

    from lmexp.runs import build

    job = json.loads(Path(job_file).read_text())
    workdir = Path(job["workdir"])
    workdir.mkdir(parents=True, exist_ok=True)
    state: dict[str, Any] = {"curve": [], "eval_s": 0.0, "last_step": 0}

    def evaluate(module) -> float:
        started = time.perf_counter()
        network, windows = module.model, state["windows"]
        training = network.training
        network.eval()
        total = 0.0
        with torch.no_grad():
            for i in range(0, len(windows), EVAL_BATCH):
                batch = windows[i : i + EVAL_BATCH].to(module.device)
                logits = network(batch[:, :-1])
                total += float(F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum"))
        network.train(training)
        state["eval_s"] += time.perf_counter() - started
        return total / (windows.shape[0] * (windows.shape[1] - 1))

    def record(trainer, module, step: int) -> float:
        loss = evaluate(module)
        point = {
            "step": step,
            "tokens": step * state["tokens_per_step"],
            "val_loss": loss,
            "train_s": time.perf_counter() - state["train_start"] - state["eval_s"] if step else 0.0,
        }
        state["curve"].append(point)
        print("EVAL " + json.dumps(point), flush=True)
        return loss

    class TargetWatch(pl.Callback):
        """Scores the val text every ``eval_tokens`` training tokens; stops at the target or a cap."""

        def on_train_start(self, trainer, pl_module) -> None:
            data = trainer.datamodule
            block = data.resolved_block_size()
            ids = torch.tensor(data.tokenizer.encode(Path(job["val_file"]).read_text(encoding="utf-8")).ids)
            count = (len(ids) - 1) // block
            starts = [i * block for i in range(count)]
            if job["val_windows"] and job["val_windows"] < count:
                n = job["val_windows"]
                starts = [starts[round(i * (count - 1) / max(n - 1, 1))] for i in range(n)]
            state["windows"] = torch.stack([ids[s : s + block + 1] for s in starts])
            state["val_tokens"], state["block_size"] = len(ids), block
            state["tokens_per_step"] = data.batch_size * block * trainer.accumulate_grad_batches * trainer.world_size
            state["train_start"] = time.perf_counter()
            record(trainer, pl_module, 0)
            state["train_start"] = time.perf_counter()
            state["eval_s"] = 0.0

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            step, last = trainer.global_step, state["last_step"]
            if step == last:  # a micro-batch of gradient accumulation
                return
            state["last_step"] = step
            tokens, every = state["tokens_per_step"], job["eval_tokens"]
            capped = bool(job["max_iters"] and step >= job["max_iters"]) or bool(
                job["max_seconds"] and time.perf_counter() - PROCESS_START > job["max_seconds"]
            )
            if step * tokens // every == last * tokens // every and step != trainer.max_steps and not capped:
                return
            if record(trainer, pl_module, step) <= job["target"] or capped:
                trainer.should_stop = True

    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir / 'mlflow.db'}"
    args = [
        *job["overrides"],
        f"--data.source={job['train_file']}",
        "--data.val_fraction=0",
        "--data.dedupe=none",
        f"--trainer.default_root_dir={workdir}",
        "--trainer.limit_val_batches=0",
    ]
    run = build("fit", configs=[job["config"]], args=args, callbacks=[TargetWatch()])
    # The config's early stopping and samples would change what is timed: TargetWatch decides when to stop.
    run.trainer.callbacks[:] = [
        c for c in run.trainer.callbacks if type(c).__name__ not in ("EarlyStopping", "SampleText")
    ]
    run.execute()
    curve = state["curve"]
    final = next((p for p in curve if p["step"] > 0 and p["val_loss"] <= job["target"]), curve[-1])
    data = run.trainer.datamodule
    result = {
        "reached": final["val_loss"] <= job["target"],
        "steps": final["step"],
        "tokens": final["tokens"],
        "tokens_per_step": state["tokens_per_step"],
        "val_loss": final["val_loss"],
        "train_s": final["train_s"],
        "eval_seconds": state["eval_s"],
        "curve": [p for p in curve if p["step"] <= final["step"]],
        "block_size": state["block_size"],
        "val_windows": int(state["windows"].shape[0]),
        "val_tokens": state["val_tokens"],
        "val_chars": len(Path(job["val_file"]).read_text(encoding="utf-8")),
        "vocab_size": data.vocab_size,
        "train_tokens": int(data.cache.meta["splits"]["train"]["tokens"]),
        "run_dir": str(run.run_dir),
        "schedule_steps": run.trainer.max_steps,
    }
    print("RESULT " + json.dumps(result), flush=True)


# --------------------------------------------------------------------------- report
def ratio(run: dict, reference: dict | None) -> str:
    """Training time against a reference's, a bound where only one of them reached the target."""
    if reference is None or run is reference:
        return "-" if reference is None else "1.00x"
    value = run["train_s"] / reference["train_s"] if reference["train_s"] else float("inf")
    if run["reached"] and reference["reached"]:
        return f"{value:.2f}x"
    if run["reached"]:
        return f"< {value:.2f}x"
    if reference["reached"]:
        return f"> {value:.2f}x"
    return "-"


def plot(runs: list[dict], size: str, target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lmexp.hardware import cpu_model

    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    for run in runs:
        style = {"color": "black", "linewidth": 2} if run["kind"] == "nanogpt" else {}
        label = f"{run['name']} ({'reached' if run['reached'] else 'not reached'})"
        for ax, key in zip(axes, ("train_s", "tokens")):
            ax.plot(
                [p[key] for p in run["curve"]], [p["val_loss"] for p in run["curve"]], marker=".", label=label, **style
            )
    lowest = min(p["val_loss"] for run in runs for p in run["curve"])
    for ax, xlabel in zip(axes, ("training seconds (evaluations excluded)", "training tokens")):
        ax.axhline(target, color="red", linestyle="--", linewidth=1, label=f"target {target}")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("val loss (mean cross entropy per token, = character)")
    axes[0].set_ylim(min(lowest, target) - 0.05, max(target + 1.0, min(lowest + 1.5, 4.5)))
    axes[1].legend()
    fig.suptitle(f"Tiny Shakespeare, {size}: val loss against time and tokens ({cpu_model()}, {os.cpu_count()} cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nanogpt-dir", type=Path, help="a checkout of karpathy/nanoGPT")
    parser.add_argument("--source", type=Path, help="path of tinyshakespeare.txt")
    parser.add_argument("--size", choices=list(SIZES), default="recipe")
    parser.add_argument(
        "--lmexp",
        action="append",
        default=None,
        metavar="NAME=CONFIG.yaml[::--key=value...]",
        help=f"an lmexp run (repeatable); '{BUILTIN_RUN}' alone: {LMEXP_CONFIG} with nanoGPT's "
        f"settings for the size (the default when none is given)",
    )
    parser.add_argument(
        "--baseline",
        default=None,
        help=f"the lmexp run the others are compared with (default: {BUILTIN_RUN} if it runs)",
    )
    parser.add_argument("--target", type=float, default=None, help="val loss to reach (default: the size's)")
    parser.add_argument(
        "--eval-tokens",
        type=int,
        default=None,
        help=f"training tokens between evaluations (default: {EVAL_STEPS} steps of the size's batch)",
    )
    parser.add_argument(
        "--max-iters",
        type=int,
        default=None,
        help="stop every run after this many steps (learning-rate schedules unchanged)",
    )
    parser.add_argument("--max-seconds", type=float, default=None, help="stop every run after this much wall time")
    parser.add_argument(
        "--nanogpt-eval-iters", type=int, default=None, help="nanoGPT's eval_iters (default: 200 recipe, 40 medium)"
    )
    parser.add_argument(
        "--val-windows", type=int, default=0, help="lmexp: score this many evenly spaced val windows (default 0: all)"
    )
    parser.add_argument("--output", default=None, help="the markdown file to append to (default: BENCHMARKS.md)")
    parser.add_argument(
        "--results-dir", type=Path, default=ROOT / "benchmarks" / "results", help="where the plot and the JSON go"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, checkpoints)")
    parser.add_argument("--no-nanogpt", action="store_true",
                        help="lmexp runs only (comparing lmexp options with each other on the same evaluation)")
    parser.add_argument("--title", default=None, help="title of the BENCHMARKS.md entry")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        worker(args.worker)
        return
    if args.source is None or (args.nanogpt_dir is None and not args.no_nanogpt):
        parser.error("--source and (unless --no-nanogpt) --nanogpt-dir are required")

    from benchmarks.report import BENCHMARKS_FILE, append_entry, markdown_table

    size = SIZES[args.size]
    args.target = size["target"] if args.target is None else args.target
    tokens_per_iter = size["batch_size"] * size["block_size"]
    eval_tokens = args.eval_tokens or EVAL_STEPS * tokens_per_iter
    eval_interval = max(1, round(eval_tokens / tokens_per_iter))
    specs = [parse_lmexp_spec(s, size) for s in (args.lmexp or [BUILTIN_RUN])]
    names = [s["name"] for s in specs]
    if any(not re.fullmatch(r"[\w.-]+", n) for n in names):
        raise SystemExit(f"lmexp run names may hold letters, digits, '_', '.' and '-' only: {names}")
    if len(set(names)) != len(names) or "nanoGPT" in names:
        raise SystemExit(f"lmexp run names must be distinct and not 'nanoGPT': {names}")
    baseline = args.baseline or (BUILTIN_RUN if BUILTIN_RUN in names else None)
    if baseline is not None and baseline not in names:
        raise SystemExit(f"--baseline {baseline!r} is not one of the lmexp runs {names}")

    work = Path(tempfile.mkdtemp(prefix="bench-nanogpt-"))
    print(f"work folder (logs): {work}", flush=True)
    train_text, val_text = split_text(args.source)
    if not args.no_nanogpt:
        prepare_nanogpt_data(args.nanogpt_dir.resolve(), args.source, val_text)
    files = {"train_file": str(work / "train.txt"), "val_file": str(work / "val.txt")}
    Path(files["train_file"]).write_text(train_text, encoding="utf-8")
    Path(files["val_file"]).write_text(val_text, encoding="utf-8")
    os.environ["LMEXP_CACHE_DIR"] = str(work / "cache")

    runs = []
    if not args.no_nanogpt:
        args.nanogpt_dir = args.nanogpt_dir.resolve()
        runs.append(run_nanogpt(args, size, eval_interval, work))
        print({k: v for k, v in runs[0].items() if k not in ("curve", "train_loss")}, flush=True)
    for spec in specs:
        runs.append(run_lmexp(args, spec, files, eval_tokens, work))
        print({k: v for k, v in runs[-1].items() if k != "curve"}, flush=True)
        if runs[-1]["val_tokens"] != runs[-1]["val_chars"]:
            print(
                f"WARNING: {spec['name']}'s tokenizer does not give one token per character: its loss is per token "
                "and does not compare with nanoGPT's",
                flush=True,
            )

    nano = None if args.no_nanogpt else runs[0]
    base = next((r for r in runs if r["name"] == baseline), None)
    rows = [
        [
            args.size,
            r["name"],
            "yes" if r["reached"] else "no",
            f"{r['steps']:,}",
            f"{r['tokens']:,}",
            f"{r['val_loss']:.3f}",
            f"{r['train_s']:.1f}",
            f"{1000 * r['train_s'] / max(r['steps'], 1):.1f}",
            f"{r['process_s']:.1f}",
            *([] if nano is None else [ratio(r, nano)]),
            ratio(r, base) if r["kind"] == "lmexp" else "",
        ]
        for r in runs
    ]
    table = markdown_table(
        [
            "size",
            "run",
            f"reached {args.target}",
            "steps",
            "tokens",
            "val loss",
            "train s (no eval)",
            "ms/step",
            "process s",
            *([] if nano is None else ["time vs nanoGPT"]),
            f"time vs {baseline}" if baseline else "time vs baseline",
        ],
        rows,
    )
    args.results_dir.mkdir(parents=True, exist_ok=True)
    stem = f"nanogpt_{args.size}" if nano is not None else f"lmexp_options_{args.size}"
    image = args.results_dir / f"{stem}.png"
    plot(runs, args.size, args.target, image)
    command = "python benchmarks/bench_nanogpt.py " + shlex.join(sys.argv[1:])
    from lmexp.hardware import cpu_model

    results_file = args.results_dir / f"{stem}.json"
    results_file.write_text(
        json.dumps(
            {
                "size": args.size,
                "settings": {k: v for k, v in size.items() if k != "lmexp"},
                "target": args.target,
                "eval_tokens": eval_tokens,
                "nanogpt_eval_interval": eval_interval,
                "command": command,
                "cpu": cpu_model(),
                "cores": os.cpu_count(),
                "date": time.strftime("%Y-%m-%d"),
                "runs": runs,
            },
            indent=1,
        )
    )
    shown = image.resolve().relative_to(ROOT) if image.resolve().is_relative_to(ROOT) else image.resolve()
    lmexp_runs = [r for r in runs if r["kind"] == "lmexp"]
    nano_note = "" if nano is None else (
        f"nanoGPT: median iteration {nano['median_iter_ms']:.1f} ms; its val loss is its own estimate "
        f"({args.nanogpt_eval_iters or size['eval_iters']} batches of {size['batch_size']} random {size['block_size']}"
        f"-character windows of val.bin), every {eval_interval} steps. "
    )
    notes = (
        f"\n\n{nano_note}lmexp: mean cross entropy over "
        + ", ".join(f"{r['name']} {r['val_windows']:,} windows of {r['block_size']}" for r in lmexp_runs)
        + f" of the same val text, every {eval_tokens:,} training tokens. Train s excludes evaluations; process s "
        f"runs from process start to the final evaluation. Curves: ![val loss, {args.size}]({shown})"
    )
    title = f"Time to val loss {args.target} against nanoGPT's train.py, Tiny Shakespeare {args.size}"
    append_entry(
        args.title or (title if nano is not None else f"Time to val loss {args.target}, lmexp options, {args.size}"),
        command,
        table + notes,
        Path(args.output or BENCHMARKS_FILE),
    )
    print(f"plot: {image}\nresults: {results_file}", flush=True)
    if args.keep:
        print(f"kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
