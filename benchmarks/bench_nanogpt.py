"""nanoGPT's own training script beside lmexp, on the same machine in the same run.

    python benchmarks/bench_nanogpt.py --nanogpt-dir PATH/nanoGPT --source ../shared/data/tinyshakespeare.txt

nanoGPT (github.com/karpathy/nanoGPT) is the usual hand-written reference. Its
``data/shakespeare_char/prepare.py`` must have been run in that checkout (put the text at
``data/shakespeare_char/input.txt`` first to avoid its download). For each size this runs
nanoGPT's ``train.py`` with its CPU recipe flags (fp32, no compile) and reads its per-iteration
times, then times lmexp's CLI path and the plain loop on the same shape with
``bench_train.py``. nanoGPT samples random windows each step while lmexp tiles the text, so
only speed compares, not the loss.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {
    "recipe": ["--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128", "--dropout=0.0"],
    "medium": ["--block_size=256", "--batch_size=16", "--n_layer=6", "--n_head=6", "--n_embd=384", "--dropout=0.2"],
}
ITERATION = re.compile(r"^iter (\d+): loss [\d.]+, time ([\d.]+)ms")


def nanogpt_ms_per_iter(nanogpt: Path, size: str, iters: int) -> float:
    """Median of nanoGPT's own per-iteration times, leaving out the first few and evaluations."""
    command = [
        sys.executable, "train.py", "config/train_shakespeare_char.py", "--device=cpu", "--compile=False",
        "--dtype=float32", "--eval_iters=1", "--eval_interval=100000", "--log_interval=1", "--always_save_checkpoint=False",
        f"--max_iters={iters}", f"--lr_decay_iters={iters}", f"--out_dir={tempfile.mkdtemp(prefix='nanogpt-')}",
        *SHAPES[size],
    ]
    finished = subprocess.run(command, cwd=nanogpt, capture_output=True, text=True)
    if finished.returncode != 0:
        raise SystemExit(f"nanoGPT failed:\n{finished.stderr[-2000:]}")
    times = [float(m.group(2)) for line in finished.stdout.splitlines() if (m := ITERATION.match(line)) and int(m.group(1)) >= 3]
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nanogpt-dir", required=True, type=Path)
    parser.add_argument("--source", required=True, help="path of tinyshakespeare.txt (for lmexp)")
    parser.add_argument("--sizes", nargs="+", default=["recipe", "medium"], choices=list(SHAPES))
    parser.add_argument("--output", default=None)
    args = parser.parse_args()

    from benchmarks.report import BENCHMARKS_FILE, append_entry, markdown_table

    rows = []
    for size in args.sizes:
        iters, steps, warmup = (150, 150, 10) if size == "recipe" else (12, 10, 2)
        nano = nanogpt_ms_per_iter(args.nanogpt_dir, size, iters)
        with tempfile.NamedTemporaryFile(suffix=".json") as results, tempfile.NamedTemporaryFile(suffix=".md") as table:
            subprocess.run(
                [sys.executable, str(ROOT / "benchmarks" / "bench_train.py"), "--source", args.source, "--sizes", size,
                 "--modes", "plain", "lmexp", "--precisions", "32-true", "--compile", "off", "--steps", str(steps),
                 "--warmup", str(warmup), "--json", results.name, "--output", table.name],
                check=True, cwd=ROOT, capture_output=True,
            )
            ours = {r["job"]["mode"]: r["ms_per_step"] for r in json.loads(Path(results.name).read_text())["results"]}
        for name, ms in (("nanoGPT train.py", nano), ("plain loop", ours["plain"]), ("lmexp", ours["lmexp"])):
            rows.append([size, name, f"{ms:.1f}", f"{nano / ms:.3f}x"])
        print(rows[-3:], flush=True)
    append_entry(
        "nanoGPT beside lmexp, fp32",
        f"python benchmarks/bench_nanogpt.py --nanogpt-dir PATH/nanoGPT --source {args.source} --sizes {' '.join(args.sizes)}",
        markdown_table(["size", "trainer", "ms/step", "speed vs nanoGPT"], rows),
        Path(args.output or BENCHMARKS_FILE),
    )


if __name__ == "__main__":
    main()
