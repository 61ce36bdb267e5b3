"""Framework overhead per training step: lmexp's Lightning path against the plain loop, with a profile.

    python benchmarks/bench_overhead.py --source ../shared/data/tinyshakespeare.txt

For each precision, ``bench_train.py``'s ``plain`` and ``lmexp`` jobs (the recipe model: 4 layers,
4 heads, 128 dims, block 64, batch 12) run alternately for ``--rounds`` rounds, each a fresh
process in a pseudo-terminal, so the Rich progress bar draws as it does for users; lmexp tracks
into a fresh MLflow store as a user's run does. The table gives each mode's median ms/step over
the rounds, the fastest and slowest round, and lmexp's speed as a fraction of the plain loop's
(the ratio of the medians). Alternating rounds spread a slow spell of a shared machine over both.

Then one more lmexp job runs with Lightning's ``SimpleProfiler``, which times every hook and
loop action of the run: the profile's heaviest training-time actions follow the table, per step.
On a CPU without bf16 units bf16 is emulated (about 20x slower), so only fp32 is measured there
unless ``--precisions`` names bf16.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_train import Job, run_in_terminal

PROFILE_LINE = re.compile(r"^\|\s*(?P<action>[^|]+?)\s*\|\s*(?P<mean>[\d.e+-]+)\s*\|\s*(?P<calls>\d+)\s*\|\s*(?P<total>[\d.e+-]+)")


def profile_rows(report: str, steps: int, top: int) -> list[list[str]]:
    """The heaviest actions of a SimpleProfiler report that run every training step."""
    rows = []
    for line in report.splitlines():
        match = PROFILE_LINE.match(line)
        if not match or match["action"] in ("Action", "Total"):
            continue
        calls, total = int(match["calls"]), float(match["total"])
        if calls >= steps:  # per-step actions only (not set-up, validation or checkpoint saving)
            rows.append((total / steps * 1000, match["action"], calls))
    rows.sort(reverse=True)
    return [[action, f"{ms:.3f}", str(calls)] for ms, action, calls in rows[:top]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True, help="path of tinyshakespeare.txt")
    parser.add_argument("--precisions", nargs="+", default=None, choices=["32-true", "bf16-mixed"],
                        help="default: 32-true, and bf16-mixed where the CPU has bf16 units")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300, help="timed steps per job")
    parser.add_argument("--warmup", type=int, default=150, help="untimed steps first (past MLflow's start-up)")
    parser.add_argument("--lmexp-args", nargs="*", default=[], help="extra CLI overrides for the lmexp jobs")
    parser.add_argument("--top", type=int, default=12, help="profile rows shown")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per job")
    parser.add_argument("--title", default="Framework overhead per step on the recipe model")
    parser.add_argument("--output", default=None, help="markdown file to append to (default BENCHMARKS.md)")
    args = parser.parse_args()

    from benchmarks.report import BENCHMARKS_FILE, append_entry, markdown_table
    from lmexp.hardware import cpu_has_bf16_units

    precisions = args.precisions or (["32-true", "bf16-mixed"] if cpu_has_bf16_units() else ["32-true"])
    rows, profiles = [], []
    for precision in precisions:
        times: dict[str, list[float]] = {"plain": [], "lmexp": []}
        for round_ in range(args.rounds):
            for mode in ("plain", "lmexp"):
                job = Job(mode, "recipe", precision, False, args.steps, args.warmup, args.source, "cpu",
                          lmexp_args=tuple(args.lmexp_args))
                result = run_in_terminal(job, args.timeout)
                if "ms_per_step" not in result:
                    raise SystemExit(f"{mode} {precision} failed: {result.get('error')}\n{result.get('log', '')[-2000:]}")
                times[mode].append(result["ms_per_step"])
                print(f"round {round_ + 1} {precision} {mode}: {result['ms_per_step']:.2f} ms/step", flush=True)
        plain, ours = statistics.median(times["plain"]), statistics.median(times["lmexp"])
        for mode, median in (("plain", plain), ("lmexp", ours)):
            spread = f"{min(times[mode]):.1f}-{max(times[mode]):.1f}"
            rows.append([precision, mode, f"{median:.2f}", spread, f"{plain / median:.3f}x"])
        with tempfile.TemporaryDirectory() as folder:
            profiler = [
                "--trainer.profiler=lightning.pytorch.profilers.SimpleProfiler",
                f"--trainer.profiler.init_args.dirpath={folder}", "--trainer.profiler.init_args.filename=profile",
            ]
            job = Job("lmexp", "recipe", precision, False, args.steps, args.warmup, args.source, "cpu",
                      lmexp_args=(*args.lmexp_args, *profiler))
            result = run_in_terminal(job, args.timeout)
            reports = list(Path(folder).glob("*profile*.txt"))
            if "ms_per_step" not in result or not reports:
                raise SystemExit(f"profiled lmexp {precision} failed: {result.get('error')}")
            steps = args.warmup + args.steps
            profiles.append((precision, result["ms_per_step"], profile_rows(reports[0].read_text(), steps, args.top)))

    table = markdown_table(["precision", "mode", f"median ms/step ({args.rounds} rounds)", "fastest-slowest",
                            "speed vs plain"], rows)
    for precision, ms, prof in profiles:
        table += (f"\n\nProfile of one lmexp {precision} run (Lightning's SimpleProfiler, {ms:.2f} ms/step with it on): "
                  "the heaviest actions that run every step, in ms per step (nested actions overlap).\n\n")
        table += markdown_table(["action", "ms/step", "calls"], prof)
    command = "python benchmarks/bench_overhead.py " + " ".join(sys.argv[1:])
    append_entry(args.title, command, table, Path(args.output or BENCHMARKS_FILE))


if __name__ == "__main__":
    main()
