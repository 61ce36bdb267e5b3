"""Run every benchmark one after the other and append all their tables to BENCHMARKS.md.

    python benchmarks/run_all.py --source ../shared/data/tinyshakespeare.txt [--quick]

In order: matrix-product peaks, training throughput (plain loop / lmexp / Hugging Face, fp32
and bf16, compile off and on, two sizes), GPT-2-small memory (AdamW, 8-bit AdamW, activation
checkpointing), time to val loss 1.90, what MLflow tracking costs per training step,
tokenization and cache building, and generation with and without the KV cache. About 25
minutes on 2 CPU cores; ``--quick`` skips compilation and the GPT-2-small runs and measures
tracking on 2 pairs of runs instead of 5 (about 8 minutes). Each script can also be run on its
own: the commands it runs are printed first.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True, help="path of tinyshakespeare.txt")
    parser.add_argument("--quick", action="store_true", help="no torch.compile and no GPT-2-small runs")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--output", default=str(ROOT / "BENCHMARKS.md"))
    args = parser.parse_args()

    train = [sys.executable, "benchmarks/bench_train.py", "--source", args.source, "--device", args.device,
             "--output", args.output]
    commands = [
        [sys.executable, "benchmarks/bench_matmul.py", "--size", "1024", "--output", args.output],
        train + ["--compile", "off"] + ([] if args.quick else ["on"]),
    ]
    if not args.quick:
        commands.append(train + [
            "--sizes", "gpt2-small", "--modes", "lmexp", "--precisions", "32-true", "bf16-mixed", "--compile", "off",
            "--optimizers", "adamw", "adamw8bit", "--steps", "2", "--warmup", "1", "--title", "GPT-2 small memory",
        ])
        commands.append(train + [
            "--sizes", "gpt2-small", "--modes", "lmexp", "--precisions", "32-true", "--compile", "off",
            "--activation-checkpointing", "--steps", "2", "--warmup", "1",
            "--title", "GPT-2 small memory, activation checkpointing",
        ])
    commands += [
        [sys.executable, "benchmarks/bench_time_to_loss.py", "--source", args.source, "--output", args.output],
        [sys.executable, "benchmarks/bench_tracking.py", "--source", args.source, "--device", args.device,
         "--output", args.output] + (["--repeats", "2"] if args.quick else []),
        [sys.executable, "benchmarks/bench_data.py", "--source", args.source, "--output", args.output],
        [sys.executable, "benchmarks/bench_generate.py", "--output", args.output],
    ]
    failed = []
    for command in commands:
        shown = " ".join(str(part) for part in command[1:])
        print(f"\n$ python {shown}", flush=True)
        started = time.perf_counter()
        if subprocess.run(command, cwd=ROOT).returncode != 0:
            failed.append(shown)
        print(f"({time.perf_counter() - started:.0f} s)", flush=True)
    if failed:
        raise SystemExit("failed:\n" + "\n".join(failed))


if __name__ == "__main__":
    main()
