"""Which sampler finds the better model in N trials: TPE, GP, random and ``auto`` on two spaces.

    python benchmarks/bench_samplers.py --source ../shared/data/tinyshakespeare.txt

Runs ``python -m sweeps run`` (as a user would) on two spaces over the shipped recipe, each study
in its own temporary folder with its own SQLite storage and tracking off, for every sampler and
seed, and reports the best val loss after ``--trials`` trials (mean, standard deviation, worst
and best over the seeds) and the study's wall time:

- ``shipped``: ``configs/sweeps/shakespeare-lr-size.yaml`` (learning rate and a model-size
  group): ``auto`` picks TPE there (a group).
- ``continuous``: the shipped recipe's learning rate and warmup steps, two numeric options:
  ``auto`` picks GP there.

Every trial is scaled down to ``--steps`` training steps (validations every third of them, 20
validation batches) so that it takes about 10 s on 2 cores; the pruner is off (a pruner would
stop trials at steps sized for 800, and GP does not learn from pruned trials), and every
sampler but random starts from ``--startup`` random trials (the shipped sweep's 5). Results are
printed and appended to BENCHMARKS.md. With the defaults (12 trials, 3 seeds, 4 samplers, 2
spaces: 288 trials) about 60-70 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import unique_heading  # noqa: E402
from lmexp.hardware import cpu_model  # noqa: E402

SWEEP = ROOT / "configs" / "sweeps" / "shakespeare-lr-size.yaml"
SAMPLERS = ("tpe", "gp", "random", "auto")
SPACES = ("shipped", "continuous")


def sweep_file(folder: Path, space: str, sampler: str, seed: int, args: argparse.Namespace) -> Path:
    """The sweep a study of the benchmark runs: the shipped one, scaled down, with this sampler."""
    sweep = yaml.safe_load(Path(args.sweep).read_text())
    sweep["study"] = f"{space}-{sampler}-{seed}"
    sweep["fit"]["config"] = [str((ROOT / c).resolve()) for c in sweep["fit"]["config"]]
    sweep["fit"]["overrides"] = {
        **sweep["fit"].get("overrides", {}), "data.init_args.source": args.source,
        "trainer.max_steps": args.steps, "trainer.val_check_interval": max(1, args.steps // 3),
        "trainer.limit_val_batches": args.val_batches,
    }
    if space == "continuous":
        sweep["space"] = {
            "model.init_args.lr": sweep["space"]["model.init_args.lr"],
            "model.init_args.warmup_steps": {"low": 0, "high": max(10, args.steps // 20 * 10), "step": 10},
        }
    sweep["n_trials"] = args.trials
    sweep["pruner"] = {"name": "none"}
    sweep["sampler"] = {"name": sampler, "seed": seed, **({"n_startup_trials": args.startup} if sampler != "random" else {})}
    sweep["tracking_uri"] = False
    sweep.pop("timeout", None)
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def run_study(folder: Path, sweep: Path) -> float:
    """``python -m sweeps run`` in ``folder`` (its own optuna.db); the wall time in seconds."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = folder / "sweep.out"
    started = time.perf_counter()
    with open(log, "w") as out:
        code = subprocess.run([sys.executable, "-m", "sweeps", "run", "--config", str(sweep)], cwd=folder, env=env,
                              stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, check=False).returncode
    if code != 0:
        raise SystemExit(f"study in {folder} failed ({code}):\n{log.read_text()[-3000:]}")
    return time.perf_counter() - started


def best_value(folder: Path, name: str) -> tuple[float, int]:
    """The study's best feasible value and its count of complete trials."""
    import optuna
    from optuna.trial import TrialState

    from sweeps.samplers import best_trials
    from sweeps.study import open_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=name, storage=open_storage(f"sqlite:///{folder / 'optuna.db'}", None))
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    best = best_trials(study)
    return (best[0].value if best else float("nan")), len(complete)


def describe(values: list[float]) -> str:
    mean = statistics.fmean(values)
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.4f} ± {spread:.4f} | {max(values):.4f} | {min(values):.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sweep", default=str(SWEEP), help="the sweep file whose space is 'shipped'")
    parser.add_argument("--source", default=str(ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"))
    parser.add_argument("--samplers", default=",".join(SAMPLERS))
    parser.add_argument("--spaces", default=",".join(SPACES))
    parser.add_argument("--trials", type=int, default=12, help="trials per study")
    parser.add_argument("--seeds", type=int, default=3, help="studies per sampler and space (seeds 0..S-1)")
    parser.add_argument("--steps", type=int, default=150, help="training steps per trial")
    parser.add_argument("--val-batches", type=int, default=20, help="validation batches per validation")
    parser.add_argument("--startup", type=int, default=5, help="random trials before TPE or GP model the space")
    parser.add_argument("--keep", help="run in this folder and keep it (default: a temporary one)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args()
    args.source = str(Path(args.source).resolve())
    if not Path(args.source).is_file():
        raise SystemExit(f"--source {args.source} does not exist: pass the Tiny Shakespeare text file")
    samplers = args.samplers.split(",")
    spaces = args.spaces.split(",")
    unknown = sorted(set(samplers) - set(SAMPLERS)) + sorted(set(spaces) - set(SPACES))
    if unknown:
        raise SystemExit(f"unknown sampler or space {', '.join(unknown)}: choose from {SAMPLERS} and {SPACES}")

    from sweeps.samplers import describe_sampler
    from sweeps.spec import load_spec

    rows: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-samplers-") as scratch:
        root = Path(args.keep or scratch).resolve()
        for space in spaces:
            rows += ["", f"**{space}** space", "",
                     (f"| sampler | best val/loss after {args.trials} trials: mean ± sd | worst | best | "
                      "complete trials | study wall time (mean) |"),
                     "|---|---|---|---|---|---|"]
            for sampler in samplers:
                bests: list[float] = []
                seconds: list[float] = []
                complete: list[int] = []
                picked = ""
                for seed in range(args.seeds):
                    folder = root / f"{space}-{sampler}-{seed}"
                    folder.mkdir(parents=True, exist_ok=True)
                    sweep = sweep_file(folder, space, sampler, seed, args)
                    picked = describe_sampler(load_spec(sweep))
                    seconds.append(run_study(folder, sweep))
                    value, done = best_value(folder, f"{space}-{sampler}-{seed}")
                    bests.append(value)
                    complete.append(done)
                    print(f"{space} {sampler} seed {seed}: best {value:.4f} ({done} complete, {seconds[-1]:.0f} s); "
                          f"{picked}", flush=True)
                label = f"auto ({picked.split()[1]})" if sampler == "auto" else sampler
                rows.append(f"| {label} | {describe(bests)} | {min(complete)}-{max(complete)} | "
                            f"{statistics.fmean(seconds):.0f} s |")
    command = "python benchmarks/bench_samplers.py " + shlex.join(
        arg for arg in sys.argv[1:] if arg != "--no-write")
    heading = unique_heading(f"Samplers: best value after {args.trials} trials, Tiny Shakespeare, "
                             f"{time.strftime('%Y-%m-%d')}", ROOT / "BENCHMARKS.md")
    header = [f"### {heading}", "",
              (f"CPU: {cpu_model()}, {os.cpu_count()} cores. Command: `{command.strip()}`. {args.seeds} seeds per "
               f"sampler, {args.trials} trials of {args.steps} steps each (pruner off, {args.startup} random "
               "startup trials for TPE and GP); lower is better.")]
    text = "\n".join(header + rows) + "\n"
    print(text)
    if not args.no_write:
        with open(ROOT / "BENCHMARKS.md", "a") as out:
            out.write("\n" + text)


if __name__ == "__main__":
    main()
