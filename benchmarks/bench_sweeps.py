"""What a sweep finds and costs: pruning, workers, and the per-trial overhead of the machinery.

    python benchmarks/bench_sweeps.py --source ../shared/data/tinyshakespeare.txt

Runs ``python -m sweeps run`` on ``configs/sweeps/shakespeare-lr-size.yaml`` (learning rate and
model size, TPE, seed 0) in a temporary folder, as a user would, and reads the results back
from the study's storage:

- ``pruning``: the shipped recipe alone (``configs/shakespeare_char.yaml`` at its own learning
  rate and size: the baseline), then the 16-trial study with its pruner, then the same 16
  trials (the pruned study's parameters, queued in its order) with ``pruner: none``, each
  trained to the end: what pruning saved on the same trials. Wall time of each and the best val
  loss; every run has the same 800-step budget and the same validation batches.
- ``workers``: the same study settings (pruner off, ``--trials`` trials of ``--worker-steps``
  steps) with 1 worker of 2 threads, then 2 workers of 1 thread each: trials per hour.
- Per-trial overhead, from every trial of the runs above: the trial's wall time (process start,
  imports, data, storage, tracking, checkpoints) less its training time (first to last step,
  validations included).

Results are printed and appended to BENCHMARKS.md. On 2 CPU cores: about 30 minutes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import unique_heading  # noqa: E402
from lmexp.hardware import cpu_model  # noqa: E402

SWEEP = ROOT / "configs" / "sweeps" / "shakespeare-lr-size.yaml"


def derived_sweep(folder: Path, name: str, source: str, **changes: Any) -> Path:
    """The shipped sweep file with absolute config paths, the data file, and ``changes``."""
    sweep = yaml.safe_load(SWEEP.read_text())
    sweep["study"] = name
    sweep["fit"]["config"] = [str(ROOT / c) for c in sweep["fit"]["config"]]
    sweep["fit"]["overrides"] = {**sweep["fit"].get("overrides", {}), "data.init_args.source": source,
                                 **changes.pop("fit_overrides", {})}
    sweep.update(changes)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def run_study(folder: Path, sweep: Path, *args: str) -> float:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    started = time.perf_counter()
    log = folder / f"{sweep.stem}.out"
    with open(log, "w") as out:
        code = subprocess.run([sys.executable, "-m", "sweeps", "run", "--config", str(sweep), *args], cwd=folder,
                              env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
    seconds = time.perf_counter() - started
    if code != 0:
        raise SystemExit(f"study {sweep.stem} failed ({code}); see {log}:\n{log.read_text()[-3000:]}")
    print(f"{sweep.stem}: {seconds:.0f} s", flush=True)
    return seconds


def check_trials(name: str, result: dict[str, Any], folder: Path) -> None:
    if result["failed"]:
        raise SystemExit(f"study {name}: {result['failed']} trial(s) failed; see {folder / 'runs' / name / 'logs'}")


def summary(folder: Path, name: str) -> dict[str, Any]:
    import optuna
    from optuna.trial import TrialState

    from sweeps.study import open_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=name, storage=open_storage(f"sqlite:///{folder / 'optuna.db'}", None))
    trials = study.trials
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = min(complete, key=lambda t: t.value) if complete else None
    overheads = [(t.datetime_complete - t.datetime_start).total_seconds() - t.user_attrs["train_seconds"]
                 for t in trials if t.datetime_complete and t.user_attrs.get("train_seconds")]
    trial_seconds = [(t.datetime_complete - t.datetime_start).total_seconds() for t in trials if t.datetime_complete]
    return {
        "trials": len(trials), "complete": len(complete),
        "pruned": sum(1 for t in trials if t.state == TrialState.PRUNED),
        "failed": sum(1 for t in trials if t.state == TrialState.FAIL),
        "best": best.value if best else float("nan"), "best_params": best.params if best else {},
        "overheads": overheads, "trial_seconds": trial_seconds,
    }


def queue_trials(folder: Path, sweep: Path, source_study: str) -> None:
    """Create the study of ``sweep`` with the trials of ``source_study`` queued, same parameters, same order."""
    import optuna

    from sweeps.spec import load_spec
    from sweeps.study import create_or_resume, open_storage

    url = f"sqlite:///{folder / 'optuna.db'}"
    storage = open_storage(url, None)
    source = optuna.load_study(study_name=source_study, storage=storage)
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        study = create_or_resume(load_spec(sweep), storage, url, resume=False)
    finally:
        os.chdir(cwd)
    for trial in sorted(source.trials, key=lambda t: t.number):
        study.enqueue_trial(trial.params)


def pruning_part(folder: Path, source: str, rows: list[str], overheads: list[float], trial_times: list[float]) -> None:
    nano = yaml.safe_load(SWEEP.read_text())["space"]["size"]["choices"]["nano"]
    baseline = derived_sweep(folder, "baseline", source, n_trials=1, pruner={"name": "none"},
                             space={"model.init_args.lr": {"choices": [5.0e-3]}, "size": {"choices": {"nano": nano}}})
    results = {}
    for name, sweep in (("baseline", baseline),
                        ("pruned", derived_sweep(folder, "pruned", source)),
                        ("unpruned", derived_sweep(folder, "unpruned", source, pruner={"name": "none"}))):
        resume = []
        if name == "unpruned":  # the pruned study's 16 trials, in its order, each trained to the end
            queue_trials(folder, sweep, "pruned")
            resume = ["--resume"]
        seconds = run_study(folder, sweep, *resume)
        results[name] = {**summary(folder, name), "seconds": seconds}
        check_trials(name, results[name], folder)
        overheads += results[name]["overheads"]
        trial_times += results[name]["trial_seconds"]
    unpruned = results["unpruned"]["seconds"]
    rows += ["| run | trials (complete / pruned / failed) | wall time | time vs unpruned | best val/loss | best trial |",
             "| --- | --- | --- | --- | --- | --- |"]
    pruner = yaml.safe_load(SWEEP.read_text())["pruner"]["name"]
    for name, label in (("baseline", "shipped recipe (lr 5e-3, nano), 1 run"),
                        ("unpruned", "the same 16 trials, no pruning"), ("pruned", f"16 trials, {pruner} pruner")):
        r = results[name]
        params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r["best_params"].items())
        rows.append(f"| {label} | {r['trials']} ({r['complete']} / {r['pruned']} / {r['failed']}) | {r['seconds']:.0f} s "
                    f"| {r['seconds'] / unpruned:.2f}x | {r['best']:.4f} | {params} |")
    saved = 1 - results["pruned"]["seconds"] / unpruned
    rows.append("")
    rows.append(f"Pruning saved {saved:.0%} of the unpruned study's time (target: at least 33%). Best val loss: pruned "
                f"{results['pruned']['best']:.4f}, unpruned {results['unpruned']['best']:.4f}, shipped recipe "
                f"{results['baseline']['best']:.4f} (target: the pruned study at least as good as the recipe).")


def workers_part(folder: Path, source: str, trials: int, steps: int, rows: list[str], overheads: list[float],
                 trial_times: list[float]) -> None:
    results = {}
    for name, args in (("one-worker", ["--workers", "1", "--threads", "2"]), ("two-workers", ["--workers", "2"])):
        sweep = derived_sweep(folder, name, source, n_trials=trials, pruner={"name": "none"},
                              fit_overrides={"trainer.max_steps": steps})
        seconds = run_study(folder, sweep, *args)
        results[name] = {**summary(folder, name), "seconds": seconds}
        check_trials(name, results[name], folder)
        overheads += results[name]["overheads"]
        trial_times += results[name]["trial_seconds"]
    rows += ["", f"{trials} trials of {steps} steps each, pruner off, TPE seed 0:", "",
             "| workers | threads per trial | wall time | trials per hour | vs 1 worker | best val/loss |",
             "| --- | --- | --- | --- | --- | --- |"]
    base = results["one-worker"]["seconds"]
    for name, workers, threads in (("one-worker", 1, 2), ("two-workers", 2, 1)):
        r = results[name]
        rows.append(f"| {workers} | {threads} | {r['seconds']:.0f} s | {3600 * r['trials'] / r['seconds']:.0f} "
                    f"| {base / r['seconds']:.2f}x | {r['best']:.4f} |")


def replay(storage: str, study_name: str, pruners: list[dict[str, Any]]) -> list[str]:
    """Replay recorded learning curves through Optuna's pruners: which trials each would stop, when.

    Every trial of ``study_name`` must have been trained to the end with its validations
    reported (a study with ``pruner: none``). The trials are fed in their order to a fresh
    in-memory study with each pruner; a trial's time is estimated as its measured overhead plus
    its training time scaled by the steps it would have run. The sampler's reaction to pruning
    is not replayed: a real study with the chosen pruner is the measurement.
    """
    import optuna
    from optuna.trial import TrialState

    from sweeps.spec import parse_spec
    from sweeps.study import make_pruner, open_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    recorded = [t for t in optuna.load_study(study_name=study_name, storage=open_storage(storage, None)).trials
                if t.state == TrialState.COMPLETE and t.intermediate_values]
    best = min(recorded, key=lambda t: t.value)
    full_time = sum((t.datetime_complete - t.datetime_start).total_seconds() for t in recorded)
    rows = [f"Replay of {len(recorded)} fully trained trials (best {best.value:.4f}, trial {best.number}):", "",
            "| pruner | trials stopped | estimated time vs no pruning | best kept | best of the kept |",
            "| --- | --- | --- | --- | --- |"]
    for options in pruners:
        spec = parse_spec({"fit": {"config": ["x"]}, "space": {"x": {"choices": [0]}}, "pruner": options})
        study = optuna.create_study(study_name="replay", pruner=make_pruner(spec))  # hyperband brackets hash the name
        seconds, stopped, kept = 0.0, 0, []
        for record in recorded:
            trial = study.ask()
            steps = sorted(record.intermediate_values)
            last = steps[-1]
            for step in steps:
                trial.report(record.intermediate_values[step], step)
                if step < steps[-1] and trial.should_prune():  # as sweeps.trial: never at the last step
                    last = step
                    break
            wall = (record.datetime_complete - record.datetime_start).total_seconds()
            train = record.user_attrs["train_seconds"]
            seconds += wall - train + train * last / steps[-1]
            if last < steps[-1]:
                stopped += 1
                study.tell(trial, state=TrialState.PRUNED)
            else:
                kept.append(record)
                study.tell(trial, record.value)
        best_kept = min(t.value for t in kept)
        rows.append(f"| {options} | {stopped} | {seconds / full_time:.2f}x | {'yes' if best in kept else 'no'} "
                    f"| {best_kept:.4f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", default=str(ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"))
    parser.add_argument("--parts", default="pruning,workers")
    parser.add_argument("--trials", type=int, default=8, help="trials of the workers part")
    parser.add_argument("--worker-steps", type=int, default=300, help="steps per trial in the workers part")
    parser.add_argument("--keep", help="run in this folder and keep it (default: a temporary one)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    parser.add_argument("--replay", help="STORAGE:STUDY: replay this unpruned study's curves through several pruners")
    args = parser.parse_args()
    if args.replay:
        storage, study = args.replay.rsplit(":", 1)
        pruners = [{"name": "median", "n_startup_trials": 4, "n_warmup_steps": 100},
                   {"name": "median", "n_startup_trials": 4, "n_warmup_steps": 300},
                   {"name": "successive_halving", "min_resource": 100, "reduction_factor": 3},
                   {"name": "successive_halving", "min_resource": 200, "reduction_factor": 2},
                   {"name": "successive_halving", "min_resource": 300, "reduction_factor": 2},
                   {"name": "hyperband", "min_resource": 100, "max_resource": 800, "reduction_factor": 3},
                   {"name": "hyperband", "min_resource": 200, "max_resource": 800, "reduction_factor": 2}]
        print("\n".join(replay(storage, study, pruners)))
        return
    source = str(Path(args.source).resolve())
    if not Path(source).is_file():
        raise SystemExit(f"--source {source} does not exist: pass the Tiny Shakespeare text file")
    parts = args.parts.split(",")
    rows: list[str] = []
    overheads: list[float] = []
    trial_times: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench-sweeps-") as scratch:
        folder = Path(args.keep or scratch).resolve()
        folder.mkdir(parents=True, exist_ok=True)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder / 'mlflow.db'}"
        if "pruning" in parts:
            pruning_part(folder, source, rows, overheads, trial_times)
        if "workers" in parts:
            workers_part(folder, source, args.trials, args.worker_steps, rows, overheads, trial_times)
    if overheads:
        median_overhead, median_trial = statistics.median(overheads), statistics.median(trial_times)
        rows += ["", f"Per-trial overhead of the sweep machinery (trial wall time less its training time, "
                     f"{len(overheads)} trials): median {median_overhead:.1f} s (min {min(overheads):.1f}, max "
                     f"{max(overheads):.1f}) against a median trial of {median_trial:.1f} s "
                     f"({median_overhead / median_trial:.0%})."]
    heading = unique_heading(f"Sweeps: pruning, workers and overhead, Tiny Shakespeare, {time.strftime('%Y-%m-%d')}",
                             ROOT / "BENCHMARKS.md")
    header = [f"### {heading}", "",
              f"CPU: {cpu_model()}, {os.cpu_count()} cores. Command: `python benchmarks/bench_sweeps.py "
              f"--source ../shared/data/tinyshakespeare.txt --parts {args.parts}`.", ""]
    text = "\n".join(header + rows) + "\n"
    print(text)
    if not args.no_write:
        with open(ROOT / "BENCHMARKS.md", "a") as out:
            out.write("\n" + text)


if __name__ == "__main__":
    main()
