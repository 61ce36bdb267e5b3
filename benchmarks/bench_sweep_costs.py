"""What a sweep costs beyond training, and what a killed worker costs: this version against an earlier one.

    git worktree add /tmp/lmexp-before <earlier commit>
    python benchmarks/bench_sweep_costs.py --baseline /tmp/lmexp-before --source ../shared/data/tinyshakespeare.txt

Both versions run with the same Python environment, each from its own checkout (``PYTHONPATH``),
in folders of their own, one after the other, as a user runs ``python -m sweeps run``:

- ``costs``: the shipped sweep (``configs/sweeps/shakespeare-lr-size.yaml``: learning rate and
  model size, TPE seed 0, successive halving) scaled down to ``--trials`` trials of ``--steps``
  steps (validation every 50 steps, halving from step 100). Per-trial overhead: a trial's wall
  time in the study (asked to told) less its training time (first to last step, validations
  included); the first trial of a study also pays the worker's start-up, so it is shown apart.
  Disk: the study's folder (``runs/<study>``) and MLflow's artifacts after the study.
- ``resume``: one trial of the shipped recipe (``--resume-steps`` steps, validation and a
  checkpoint every 100); the worker is killed with SIGKILL once the trial has validated at
  ``--kill-at``, then ``python -m sweeps run --resume`` finishes the study. The earlier version
  runs the trial again from its first step; this one resumes it from its checkpoint.

Results are printed and appended to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
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


def sweep_file(folder: Path, name: str, source: str, code: Path, **changes: Any) -> Path:
    """The shipped sweep with the checkout's config paths, the data file, and ``changes``."""
    sweep = yaml.safe_load(SWEEP.read_text())
    sweep["study"] = name
    sweep["fit"]["config"] = [str(code / c) for c in sweep["fit"]["config"]]
    sweep["fit"]["overrides"] = {**sweep["fit"].get("overrides", {}), "data.init_args.source": source,
                                 **changes.pop("fit_overrides", {})}
    sweep.update(changes)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def environment(code: Path, folder: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(code), "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}"}


def sweeps(code: Path, folder: Path, *args: str, log: str) -> subprocess.Popen:
    out = open(folder / log, "a")
    return subprocess.Popen([sys.executable, "-m", "sweeps", *args], cwd=folder, env=environment(code, folder),
                            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)


def finish(process: subprocess.Popen, folder: Path, log: str) -> None:
    code = process.wait()
    if code != 0:
        raise SystemExit(f"python -m sweeps exited {code}; see {folder / log}:\n{(folder / log).read_text()[-3000:]}")


def trials(folder: Path, study: str) -> list[Any]:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name=study, storage=f"sqlite:///{folder / 'optuna.db'}").trials


def folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink()) / 1e6 \
        if path.is_dir() else 0.0


def costs(code: Path, folder: Path, source: str, n_trials: int, steps: int) -> dict[str, Any]:
    sweep = sweep_file(folder, "costs", source, code, n_trials=n_trials,
                       pruner={"name": "successive_halving", "min_resource": 100, "reduction_factor": 2},
                       fit_overrides={"trainer.max_steps": steps, "trainer.val_check_interval": 50})
    started = time.perf_counter()
    finish(sweeps(code, folder, "run", "--config", str(sweep), log="costs.out"), folder, "costs.out")
    seconds = time.perf_counter() - started
    done = sorted((t for t in trials(folder, "costs") if t.datetime_complete), key=lambda t: t.number)
    overheads = [(t.datetime_complete - t.datetime_start).total_seconds() - t.user_attrs["train_seconds"]
                 for t in done if t.user_attrs.get("train_seconds")]
    return {
        "seconds": seconds, "first": overheads[0], "rest": overheads[1:],
        "complete": sum(t.state.name == "COMPLETE" for t in done), "pruned": sum(t.state.name == "PRUNED" for t in done),
        "runs_mb": folder_mb(folder / "runs" / "costs"), "mlflow_mb": folder_mb(folder / "mlartifacts"),
    }


def resume(code: Path, folder: Path, source: str, steps: int, kill_at: int) -> dict[str, Any]:
    nano = yaml.safe_load(SWEEP.read_text())["space"]["size"]["choices"]["nano"]
    sweep = sweep_file(folder, "resume", source, code, n_trials=1, pruner={"name": "none"},
                       space={"model.init_args.lr": {"choices": [5.0e-3]}, "size": {"choices": {"nano": nano}}},
                       fit_overrides={"trainer.max_steps": steps, "trainer.val_check_interval": 100})
    args = ["run", "--config", str(sweep), "--heartbeat", "1"]
    started = time.perf_counter()
    first = sweeps(code, folder, *args, log="resume.out")
    logs = folder / "runs" / "resume" / "logs"
    mark = f"validation at step {kill_at}:"
    while not any(mark in p.read_text() for p in logs.glob("*.log")) if logs.is_dir() else True:
        if first.poll() is not None:
            raise SystemExit(f"the study ended before step {kill_at}; see {folder / 'resume.out'}")
        time.sleep(0.2)
    os.kill(first.pid, signal.SIGKILL)  # the worker dies without a word; its trial stops itself
    first.wait()
    killed = time.perf_counter() - started
    restarted = time.perf_counter()
    finish(sweeps(code, folder, *args, "--resume", log="resume.out"), folder, "resume.out")
    after = time.perf_counter() - restarted
    text = (folder / "resume.out").read_text()
    resumed_at = re.findall(r"resumed at step (\d+)", text)
    return {"killed_after": killed, "after_kill": after, "total": killed + after,
            "resumed_at": int(resumed_at[-1]) if resumed_at else None}


def spread(values: list[float]) -> str:
    return (f"{statistics.median(values):.2f} s (min {min(values):.2f}, max {max(values):.2f}, {len(values)} trials)"
            if values else "-")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", required=True, help="a checkout of the earlier version (git worktree add DIR REV)")
    parser.add_argument("--baseline-name", help="how the table names it (default: its git commit)")
    parser.add_argument("--source", default=str(ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"))
    parser.add_argument("--parts", default="costs,resume")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--resume-steps", type=int, default=800)
    parser.add_argument("--kill-at", type=int, default=600)
    parser.add_argument("--keep", help="run in this folder and keep it (default: a temporary one)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args()
    source = str(Path(args.source).resolve())
    baseline = Path(args.baseline).resolve()
    if not (baseline / "sweeps" / "__main__.py").is_file():
        raise SystemExit(f"--baseline {baseline} is not an lmexp checkout")
    name = args.baseline_name or subprocess.run(["git", "-C", str(baseline), "rev-parse", "--short", "HEAD"],
                                                capture_output=True, text=True).stdout.strip() or str(baseline)
    versions = {"before": baseline, "after": ROOT}
    parts = args.parts.split(",")
    results: dict[str, dict[str, Any]] = {"before": {}, "after": {}}
    with tempfile.TemporaryDirectory(prefix="bench-sweep-costs-") as scratch:
        top = Path(args.keep or scratch).resolve()
        for part in ("costs", "resume"):
            if part not in parts:
                continue
            for version, code in versions.items():
                folder = top / f"{part}-{version}"
                folder.mkdir(parents=True, exist_ok=True)
                print(f"{part}, {version} ({code})", flush=True)
                results[version][part] = (costs(code, folder, source, args.trials, args.steps) if part == "costs"
                                          else resume(code, folder, source, args.resume_steps, args.kill_at))
                print(f"  {results[version][part]}", flush=True)
    command = ("python benchmarks/bench_sweep_costs.py --baseline BEFORE --source ../shared/data/tinyshakespeare.txt"
               + (f" --parts {args.parts}" if args.parts != "costs,resume" else ""))
    rows = [f"CPU: {cpu_model()}, {os.cpu_count()} cores. Before: commit {name}; after: this commit. "
            f"Command: `{command}` (BEFORE: `git worktree add BEFORE {name}`).", ""]
    if "costs" in parts:
        before, after = results["before"]["costs"], results["after"]["costs"]
        rows += [f"The shipped sweep scaled down: {args.trials} trials of {args.steps} steps, validation every 50, "
                 "successive halving from step 100, tracked in MLflow (SQLite):", "",
                 "| | before | after | after / before |", "| --- | --- | --- | --- |",
                 f"| per-trial overhead, trials 2-{args.trials}: median (spread) | {spread(before['rest'])} "
                 f"| {spread(after['rest'])} | {statistics.median(after['rest']) / statistics.median(before['rest']):.2f}x |",
                 f"| first trial's overhead (with the worker's start) | {before['first']:.2f} s | {after['first']:.2f} s "
                 f"| {after['first'] / before['first']:.2f}x |",
                 f"| trials complete / pruned | {before['complete']} / {before['pruned']} "
                 f"| {after['complete']} / {after['pruned']} | |",
                 f"| study wall time | {before['seconds']:.0f} s | {after['seconds']:.0f} s "
                 f"| {after['seconds'] / before['seconds']:.2f}x |",
                 f"| disk: runs/<study> | {before['runs_mb']:.1f} MB | {after['runs_mb']:.1f} MB "
                 f"| {after['runs_mb'] / before['runs_mb']:.2f}x |",
                 f"| disk: MLflow artifacts | {before['mlflow_mb']:.1f} MB | {after['mlflow_mb']:.1f} MB "
                 f"| {after['mlflow_mb'] / max(before['mlflow_mb'], 1e-9):.2f}x |", ""]
    if "resume" in parts:
        before, after = results["before"]["resume"], results["after"]["resume"]
        rows += [f"One trial of {args.resume_steps} steps (the shipped recipe, checkpoint every 100 steps); its worker "
                 f"killed with SIGKILL after the validation at step {args.kill_at}, then `--resume`:", "",
                 "| | before | after | after / before |", "| --- | --- | --- | --- |",
                 f"| the resumed study's wall time, after the kill | {before['after_kill']:.1f} s "
                 f"| {after['after_kill']:.1f} s | {after['after_kill'] / before['after_kill']:.2f}x |",
                 f"| the trial went on from step | {before['resumed_at'] or 0} (run again) | {after['resumed_at'] or 0} | |",
                 f"| whole study, kill included | {before['total']:.1f} s | {after['total']:.1f} s "
                 f"| {after['total'] / before['total']:.2f}x |", ""]
    heading = unique_heading(f"Sweeps: per-trial overhead, disk and resumed trials, {time.strftime('%Y-%m-%d')}",
                             ROOT / "BENCHMARKS.md")
    text = "\n".join([f"### {heading}", "", *rows])
    print(text)
    if not args.no_write:
        with open(ROOT / "BENCHMARKS.md", "a") as out:
            out.write("\n" + text)


if __name__ == "__main__":
    main()
