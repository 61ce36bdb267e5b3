"""Matrix-product throughput per dtype: the peak that training speed is measured against.

    python benchmarks/bench_matmul.py [--size 1024]

Prints GFLOP/s for fp32 and bf16 (median of a few repeats after a warm-up) and appends the
table to BENCHMARKS.md. On CPUs without bf16 units a bf16 product is emulated and very slow,
so keep --size moderate there.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import BENCHMARKS_FILE, append_entry, markdown_table  # noqa: E402


def gflops(size: int, dtype: torch.dtype, repeats: int, device: str = "cpu") -> float:
    """Median GFLOP/s of a square product after one warm-up (kernel selection, allocation)."""
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    times = []
    for i in range(repeats + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        if i > 0:
            times.append(time.perf_counter() - started)
    return 2 * size**3 / statistics.median(times) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default=str(BENCHMARKS_FILE))
    args = parser.parse_args()

    results = {name: gflops(args.size, dtype, args.repeats) for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    rows = [[name, f"{value:,.1f}", f"{value / results['fp32']:.4f}x"] for name, value in results.items()]
    append_entry(
        f"Matrix product {args.size}^3",
        f"python benchmarks/bench_matmul.py --size {args.size}",
        markdown_table(["dtype", "GFLOP/s", "vs fp32"], rows),
        Path(args.output),
    )


if __name__ == "__main__":
    main()
