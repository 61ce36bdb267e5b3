"""What MLflow tracking costs per training step: the Tiny Shakespeare recipe tracked and untracked.

    python benchmarks/bench_tracking.py --source ../shared/data/tinyshakespeare.txt

Trains ``lmexp fit --config configs/shakespeare_char.yaml`` as ``lmexp.runs.build`` makes it,
in two modes that differ in tracking alone:

- ``untracked``: ``--trainer.logger false``;
- ``tracked``: the default MLflow tracker, into a fresh SQLite store in the run's temporary
  folder (what a user's first run does with ``./mlflow.db``), system metrics on (the default);
- ``no-system``: the same tracker with ``--trainer.logger.system_metrics false``: the ratio
  tracked / no-system is what sampling system metrics costs the step (``--system-interval S``
  samples every S seconds instead of the tracker's default 10 s, to bound that cost from above).

Everything else is the config's, in both modes: its callbacks (early stopping, samples), its
validation every 100 steps (on ``--val-batches`` batches, 8 by default; -1 keeps the config's
whole val split), checkpoints with their export, the progress bar (each run is a fresh process in
a pseudo-terminal, as in ``bench_train.py``). ``--steps`` optimizer steps are timed after
``--warmup`` steps (host clock, as ``bench_train.StepTimer`` does). MLflow's one-time start
(import, creating the store's schema) runs in a background thread from the first step; the
tracked run waits for it at the end of the warm-up (if it is still going), so the timed steps are
the steady state. The table gives that wait and the warm-up's own time in both modes, where
whatever the one-time start costs the training thread shows.

Runs alternate (untracked, tracked, no-system, untracked, ...) for ``--repeats`` rounds, so slow drift of a
shared machine hits both modes alike. The table gives each pair's ms/step and ratio, the medians,
the ratio of the medians, the time from the last timed step until ``fit`` returned (the
validation Lightning runs when a run is stopped, the final sample, the last checkpoint and, when
tracked, the last uploads and the flush) and, for the tracked runs, how many loss points reached
the store. Target: tracking adds at most 2% to the training step. Results are printed and
appended to BENCHMARKS.md. Each run takes about 25 s on 2 CPU cores: the defaults, about 4 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_train import StepTimer, _threads, add_worker_arguments, answer_worker, run_in_terminal

CONFIG = ROOT / "configs" / "shakespeare_char.yaml"
MODES = ("untracked", "tracked", "no-system")
TARGET = 1.02  # tracked / untracked ms per step


@dataclass
class Job:
    mode: str  # untracked | tracked
    source: str
    steps: int
    warmup: int
    val_batches: int  # -1: the config's
    device: str  # auto | cpu | cuda
    lmexp_args: tuple[str, ...] = ()
    system_interval: float | None = None  # seconds between system-metrics samples (None: the tracker's default)


# ----------------------------------------------------------------------------- worker side
def _config_max_steps() -> int:
    import yaml

    return int(yaml.safe_load(CONFIG.read_text())["trainer"]["max_steps"])


def worker(job: Job) -> dict:
    _threads()
    import lightning.pytorch as pl

    from lmexp.runs import build

    timer = StepTimer(job.warmup, job.steps, "cpu")
    marks: dict[str, float] = {}
    holder: dict = {}

    class Timer(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            step = trainer.global_step
            if step == job.warmup and "warmup_s" not in marks:
                marks["warmup_s"] = time.perf_counter() - timer.started
                tracker = holder["run"].tracker
                if tracker is not None:
                    waited = time.perf_counter()
                    marks["connected"] = tracker.wait_for_run(timeout=60) is not None
                    marks["wait_s"] = time.perf_counter() - waited
            if timer.step_done(step) and "end" not in marks:
                trainer.should_stop = True
                marks["end"] = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="lmexp-bench-tracking-") as folder:
        workdir = Path(folder).resolve()
        # Never ./mlflow.db: a fresh store for this run (set in both modes, used by the tracked one).
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir / 'mlflow.db'}"
        args = [f"--data.source={job.source}", f"--trainer.default_root_dir={workdir}"]
        if job.val_batches >= 0:
            args.append(f"--trainer.limit_val_batches={job.val_batches}")
        if job.warmup + job.steps >= _config_max_steps():
            args.append(f"--trainer.max_steps={job.warmup + job.steps + 1}")
        if job.device != "auto":
            args.append(f"--trainer.accelerator={job.device}")
        if job.mode == "untracked":
            args.append("--trainer.logger=false")
        else:  # the same tracker in both tracked modes, system metrics on or off
            args += ["--trainer.logger=lmexp.MLflowTracker",
                     f"--trainer.logger.system_metrics={'false' if job.mode == 'no-system' else 'true'}"]
            if job.system_interval is not None:
                args.append(f"--trainer.logger.system_metrics_interval={job.system_interval}")
        run = build("fit", configs=[CONFIG], args=[*args, *job.lmexp_args], callbacks=[Timer()])
        holder["run"] = run
        timer.device = run.trainer.strategy.root_device.type
        timer.started = time.perf_counter()
        run.execute()
        if "end" not in marks:
            raise SystemExit(f"training stopped at step {run.trainer.global_step}, before the {job.warmup + job.steps} "
                             "steps timed (early stopping?)")
        fit_end_s = time.perf_counter() - marks["end"]
        result = timer.result()
        result.update(warmup_s=marks.get("warmup_s"), wait_s=marks.get("wait_s"), fit_end_s=fit_end_s,
                      steps_run=run.trainer.global_step, device=timer.device)
        tracker = run.tracker
        if tracker is not None:
            # Did the records reach the store? Loss points logged here against those stored (read
            # with a client of our own: the tracker's would reopen its finished run).
            from mlflow import MlflowClient

            logged = {key: len(points) for key, points in tracker.history.items()}
            client, run_id = MlflowClient(tracker.tracking_uri), tracker.run_id
            stored = {key: len(client.get_metric_history(run_id, key)) for key in logged} if run_id else {}
            system = len(client.get_metric_history(run_id, "system/cpu_utilization_percentage")) if run_id else 0
            result.update(connected=marks.get("connected"), loss_points_logged=sum(logged.values()),
                          loss_points_stored=sum(stored.values()), journal_left=tracker.journal_path.exists(),
                          system_samples=system)
    return result


# ----------------------------------------------------------------------------- driver side
def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _fmt(value: float | None, digits: int = 1) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", help="path of tinyshakespeare.txt (required)")
    parser.add_argument("--repeats", type=int, default=5, help="rounds of runs (untracked, tracked, no-system)")
    parser.add_argument("--system-interval", type=float, default=None,
                        help="seconds between system-metrics samples in the tracked mode (default: the tracker's, 10)")
    parser.add_argument("--steps", type=int, default=300, help="timed optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=30, help="untimed steps first")
    parser.add_argument("--val-batches", type=int, default=8,
                        help="--trainer.limit_val_batches in both modes (-1: the config's, the whole val split)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--lmexp-args", nargs="*", default=[],
                        help="extra CLI overrides for both modes (a single one: --lmexp-args=--KEY=VALUE)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per run")
    parser.add_argument("--title", default="MLflow tracking cost per training step, Tiny Shakespeare recipe")
    parser.add_argument("--output", default=None, help="markdown file to append to (default BENCHMARKS.md)")
    parser.add_argument("--json", default=None, help="also write all results here")
    add_worker_arguments(parser)
    args = parser.parse_args()
    if answer_worker(args, worker, Job):
        return
    if not args.source:
        parser.error("--source is required")
    if args.repeats < 1 or args.steps < 1 or args.warmup < 1:
        parser.error("--repeats, --steps and --warmup must be at least 1")

    from benchmarks.report import BENCHMARKS_FILE, append_entry, cpu_model, markdown_table

    if "LMEXP_CACHE_DIR" not in os.environ:  # a token cache of our own, removed at the end
        cache = tempfile.TemporaryDirectory(prefix="lmexp-bench-cache-")
        os.environ["LMEXP_CACHE_DIR"] = cache.name
    source = str(Path(args.source).resolve())
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores", flush=True)

    results: list[dict] = []
    pairs: list[dict[str, dict]] = []
    started = time.perf_counter()
    for pair in range(1, args.repeats + 1):
        pairs.append({})
        for mode in MODES:
            job = Job(mode, source, args.steps, args.warmup, args.val_batches, args.device, tuple(args.lmexp_args),
                      args.system_interval)
            print(f"pair {pair}/{args.repeats}: {mode} ...", flush=True)
            load = os.getloadavg()[0]  # another process busy on a shared machine shows here
            row = {"pair": pair, "load": load, "job": asdict(job),
                   **run_in_terminal(job, args.timeout, script=__file__)}
            if "error" in row:
                print(row.get("log", ""), flush=True)
            print(f"pair {pair} {mode}", {k: v for k, v in row.items() if k not in ("job", "log", "pair")}, flush=True)
            results.append(row)
            pairs[-1][mode] = row
    print(f"({time.perf_counter() - started:.0f} s)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))

    def ms(row: dict) -> float | None:
        return row.get("ms_per_step")

    rows, ratios, system_ratios = [], [], []
    for number, pair in enumerate(pairs, start=1):
        plain, tracked = ms(pair["untracked"]), ms(pair["tracked"])
        ratio = tracked / plain if plain and tracked else None
        if ratio is not None:
            ratios.append(ratio)
        stored = pair["tracked"].get("loss_points_stored")
        points = f"{stored}/{pair['tracked']['loss_points_logged']}" if stored is not None else ""
        quiet = ms(pair["no-system"])
        system = tracked / quiet if tracked and quiet else None
        if system is not None:
            system_ratios.append(system)
        rows.append([
            str(number), _cell(pair["untracked"]), _cell(pair["tracked"]), _fmt(ratio, 3),
            _fmt(pair["tracked"].get("wait_s"), 2),
            f"{_fmt(pair['untracked'].get('warmup_s'), 2)} / {_fmt(pair['tracked'].get('warmup_s'), 2)}",
            f"{_fmt(pair['untracked'].get('fit_end_s'), 2)} / {_fmt(pair['tracked'].get('fit_end_s'), 2)}",
            points, _fmt(system, 3), str(pair["tracked"].get("system_samples", "")),
        ])
    medians = {mode: _median([ms(p[mode]) for p in pairs if ms(p[mode])]) for mode in MODES}
    of_medians = medians["tracked"] / medians["untracked"] if medians["tracked"] and medians["untracked"] else None
    of_pairs = _median(ratios)

    def median_of(mode: str, key: str) -> float | None:
        return _median([p[mode][key] for p in pairs if p[mode].get(key) is not None])

    rows.append([
        "median", _fmt(medians["untracked"]), _fmt(medians["tracked"]), _fmt(of_pairs, 3),
        _fmt(median_of("tracked", "wait_s"), 2),
        f"{_fmt(median_of('untracked', 'warmup_s'), 2)} / {_fmt(median_of('tracked', 'warmup_s'), 2)}",
        f"{_fmt(median_of('untracked', 'fit_end_s'), 2)} / {_fmt(median_of('tracked', 'fit_end_s'), 2)}", "",
        _fmt(_median(system_ratios), 3), "",
    ])
    header = ["pair", "untracked ms/step", "tracked ms/step", "tracked / untracked", "tracked: wait for MLflow s",
              f"{args.warmup} warm-up steps s (untracked / tracked)", "fit end s (untracked / tracked)",
              "tracked: loss points stored/logged", "system metrics on / off", "system samples stored"]
    table = markdown_table(header, rows)
    if of_medians is not None and of_pairs is not None:
        worst = max(of_medians, of_pairs)
        verdict = "met" if worst <= TARGET else "not met"
        if len(ratios) < 3:
            verdict = f"{verdict} on {len(ratios)} pair(s), too few to judge"
        table += (
            f"\n\nTracked / untracked: {of_medians:.3f} (ratio of the medians), {of_pairs:.3f} (median of the "
            f"{len(ratios)} pairs' ratios; range {min(ratios):.3f} to {max(ratios):.3f}). Target: tracking adds "
            f"at most {100 * (TARGET - 1):.0f}% to the step: {verdict}."
        )
    else:
        table += "\n\nNo complete pair: no ratio."
    if system_ratios:
        interval = f"every {args.system_interval:g} s" if args.system_interval else "every 10 s (the default)"
        table += (f"\nSystem metrics sampled {interval}: tracked with / without them {_median(system_ratios):.3f} "
                  f"(median of {len(system_ratios)} rounds; range {min(system_ratios):.3f} to {max(system_ratios):.3f}).")
    devices = sorted({r["device"] for r in results if "device" in r})
    loads = [r["load"] for r in results]
    table += (
        f"\n{args.steps} timed steps after {args.warmup} warm-up steps, {args.repeats} pairs on "
        f"{', '.join(devices) or args.device}; CPU: {cpu_model()}, {os.cpu_count()} cores; 1-minute load average "
        f"before each run: {min(loads):.1f} to {max(loads):.1f}."
    )
    command = "python benchmarks/bench_tracking.py " + " ".join(sys.argv[1:])
    append_entry(args.title, command, table, Path(args.output or BENCHMARKS_FILE))


def _cell(row: dict) -> str:
    if "ms_per_step" in row:
        return f"{row['ms_per_step']:.1f}"
    return (row.get("error") or "failed")[:60].replace("|", "/")


if __name__ == "__main__":
    main()
