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
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CONFIG = ROOT / "configs" / "shakespeare_char.yaml"
RECIPE_STEPS = next(int(line.split(":")[1]) for line in CONFIG.read_text().splitlines() if line.strip().startswith("max_steps:"))

from benchmarks.report import BENCHMARKS_FILE, append_entry, markdown_table  # noqa: E402


def run(source: str, precision: str, steps: int, workdir: Path) -> dict:
    root = workdir / precision
    command = [
        sys.executable, "-m", "lmexp", "fit", "--config", str(CONFIG),
        f"--data.source={source}", f"--trainer.precision={precision}", f"--trainer.max_steps={steps}",
        f"--trainer.default_root_dir={root}", "--trainer.callbacks.init_args.every_n_steps=0",
    ]
    if steps < RECIPE_STEPS:  # same LR schedule as the full recipe, fewer steps
        command += [f"--trainer.val_check_interval={steps}", f"--model.max_steps={RECIPE_STEPS}"]
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
    parser.add_argument("--output", default=str(BENCHMARKS_FILE))
    args = parser.parse_args()

    from lmexp.hardware import cpu_has_bf16_units

    os.environ.setdefault("LMEXP_CACHE_DIR", tempfile.mkdtemp(prefix="lmexp-bench-cache-"))
    fast_bf16 = cpu_has_bf16_units()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for precision in args.precisions:
            full = precision == "32-true" or fast_bf16
            results.append(run(args.source, precision, RECIPE_STEPS if full else args.short_steps, Path(tmp)))
    base = results[0]["tokens_per_s"]
    rows = [
        [
            r["precision"], str(r["steps"]), f"{r['wall_s']:.0f}", f"{r['tokens_per_s']:,.0f}", f"{r['ms_per_step']:.1f}",
            f"{r['tokens_per_s'] / base:.3f}x", f"{r['val_loss']:.3f}", f"{r['best_val_loss']:.3f}",
        ]
        for r in results
    ]
    header = ["precision", "steps run", "wall time (s)", "tokens/s", "ms/step", "vs 32-true", "final val loss", "best val loss"]
    append_entry(
        "Tiny Shakespeare character recipe",
        f"python benchmarks/bench_recipe.py --source {args.source}",
        markdown_table(header, rows),
        Path(args.output),
    )


if __name__ == "__main__":
    main()
