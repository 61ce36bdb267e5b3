"""Train the Tiny Shakespeare character recipe per precision and record speed and quality.

    python benchmarks/bench_recipe.py --source ../shared/data/tinyshakespeare.txt

Each precision runs the shipped ``configs/shakespeare_char.yaml`` through the real CLI (progress
bar on, as users run it) in a fresh process, one after the other in the same invocation, so
the ratios compare like with like on a shared machine. Where a precision is too slow to finish
the recipe (bf16 on CPUs without bf16 units), ``--short-steps`` measures its throughput on
that many steps instead, and the table says so. Results are printed and appended to
BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def run(source: str, precision: str, steps: int, workdir: Path) -> dict:
    root = workdir / precision
    command = [
        sys.executable, "-m", "lmexp", "fit", "--config", str(ROOT / "configs" / "shakespeare_char.yaml"),
        f"--data.source={source}", f"--trainer.precision={precision}", f"--trainer.max_steps={steps}",
        f"--trainer.default_root_dir={root}", "--trainer.callbacks.init_args.every_n_steps=0",
    ]
    if steps < 2000:  # same LR schedule as the full recipe, fewer steps
        command += [f"--trainer.val_check_interval={steps}", "--model.max_steps=2000"]
    started = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{precision} run failed:\n{result.stderr[-3000:]}")
    metrics = next(root.glob("lightning_logs/*/metrics.csv"))
    rows = list(csv.DictReader(metrics.open()))
    throughput = [float(r["train/tokens_per_sec"]) for r in rows if r.get("train/tokens_per_sec")]
    val = [float(r["val/loss"]) for r in rows if r.get("val/loss")]
    tokens_per_step = 12 * 64
    mean_tps = sum(throughput) / len(throughput)
    return {
        "precision": precision, "steps": steps, "wall_s": wall, "tokens_per_s": mean_tps,
        "ms_per_step": 1000 * tokens_per_step / mean_tps, "val_loss": val[-1] if val else float("nan"),
        "best_val_loss": min(val) if val else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True, help="path of tinyshakespeare.txt")
    parser.add_argument("--precisions", nargs="+", default=["32-true", "bf16-mixed"])
    parser.add_argument("--short-steps", type=int, default=100, help="steps for precisions without fast kernels")
    parser.add_argument("--output", default=str(ROOT / "BENCHMARKS.md"))
    args = parser.parse_args()

    from lmexp.hardware import cpu_has_bf16_units

    os.environ.setdefault("LMEXP_CACHE_DIR", tempfile.mkdtemp(prefix="lmexp-bench-cache-"))
    fast_bf16 = cpu_has_bf16_units()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for precision in args.precisions:
            full = precision == "32-true" or fast_bf16
            results.append(run(args.source, precision, 2000 if full else args.short_steps, Path(tmp)))
    base = results[0]["tokens_per_s"]
    header = "| precision | steps run | wall time (s) | tokens/s | ms/step | vs 32-true | final val loss | best val loss |"
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(
            f"| {r['precision']} | {r['steps']} | {r['wall_s']:.0f} | {r['tokens_per_s']:,.0f} | {r['ms_per_step']:.1f} "
            f"| {r['tokens_per_s'] / base:.3f}x | {r['val_loss']:.3f} | {r['best_val_loss']:.3f} |"
        )
    table = "\n".join(lines)
    print(table)
    import torch

    entry = (
        f"\n### Tiny Shakespeare character recipe, {dt.date.today().isoformat()}\n\n"
        f"Machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__} (CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}, bf16 units: {'yes' if fast_bf16 else 'no'}).\n"
        f"Command: `python benchmarks/bench_recipe.py --source {args.source}`\n\n{table}\n"
    )
    with open(args.output, "a") as f:
        f.write(entry)


if __name__ == "__main__":
    main()
