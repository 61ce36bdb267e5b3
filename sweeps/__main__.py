"""``python -m sweeps run|worker|report``: Optuna studies over lmexp fit configs.

    python -m sweeps run --config configs/sweeps/shakespeare-lr-size.yaml     # start (or --resume) a study
    python -m sweeps worker --study NAME --storage URL                        # join it from another shell or host
    python -m sweeps report --study NAME                                      # table and plots
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from lmexp.arguments import OneLineArgumentParser
from lmexp.errors import LmexpError, find_user_error

INCOMPLETE = 3  # exit status of a run or worker that left its study short of n_trials


def parser() -> argparse.ArgumentParser:
    main = OneLineArgumentParser(prog="python -m sweeps", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = main.add_subparsers(dest="verb", required=True, parser_class=OneLineArgumentParser)
    run = verbs.add_parser("run", help="start a study from a sweep file (or continue it with --resume)")
    run.add_argument("--config", required=True, help="sweep YAML file")
    run.add_argument("--resume", action="store_true", help="continue the study of this name")
    run.add_argument("--study", help="study name (default: the file's 'study', else its name)")
    _common(run)
    run.add_argument("--n_trials", type=int, help="trials in all, over every worker (default: the file's)")
    run.add_argument("--timeout", type=float, help="start no trial after this many seconds (default: the file's)")
    run.add_argument("--workers", type=int, help="worker processes on this machine (default: the file's, else 1)")
    worker = verbs.add_parser("worker", help="join a running study (another shell, or another machine)")
    worker.add_argument("--study", required=True)
    _common(worker)
    worker.add_argument("--index", type=int, default=None,
                        help="this worker's number: its sampler seed is the study's seed + index (default: from its pid)")
    report = verbs.add_parser("report", help="print a study's trials and write its plots")
    report.add_argument("--study", required=True)
    report.add_argument("--storage", help="Optuna storage URL (default: sqlite:///optuna.db here)")
    report.add_argument("--out", help="folder for the plots (default: runs/<study>/report)")
    return main


def _common(verb: argparse.ArgumentParser) -> None:
    verb.add_argument("--storage", help="Optuna storage: sqlite:///optuna.db (default), journal:PATH, postgresql://...")
    verb.add_argument("--threads", type=int, help="CPU threads per trial (default: cores / workers)")
    verb.add_argument("--heartbeat", type=int, default=30,
                      help="seconds between heartbeats of a running trial; after 4 missed ones it is run again (0: off)")


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        {"run": run_command, "worker": worker_command, "report": report_command}[args.verb](args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as err:
        user_error = err if isinstance(err, LmexpError) else find_user_error(err)
        if user_error is None:
            raise
        print(f"error: {user_error}", file=sys.stderr)
        raise SystemExit(2) from None


# ---------------------------------------------------------------------------------- verbs
def run_command(args: argparse.Namespace) -> None:
    from sweeps.spec import load_spec
    from sweeps.study import (
        PARENT_RUN_ATTR, ROOT_ATTR, check_space, create_or_resume, default_storage, open_storage, shown_url,
    )
    from sweeps.samplers import describe_sampler
    from sweeps.tracking import StudyRun

    spec = load_spec(args.config)
    for name in ("study", "n_trials", "timeout", "workers", "threads", "storage"):
        if getattr(args, name, None) is not None:
            setattr(spec, name, getattr(args, name))
    started = time.perf_counter()
    config = check_space(spec)
    print(f"sweep {spec.study}: search space checked against {', '.join(spec.configs)} "
          f"({len(spec.params)} options, {len(spec.groups)} groups)", flush=True)
    storage_url = spec.storage or default_storage()
    storage = open_storage(storage_url, heartbeat_seconds=args.heartbeat)
    study = create_or_resume(spec, storage, storage_url, args.resume)
    parent = StudyRun.start(spec, shown_url(storage_url), run_id=study.user_attrs.get(PARENT_RUN_ATTR))
    if parent.run_id and study.user_attrs.get(PARENT_RUN_ATTR) != parent.run_id:
        study.set_user_attr(PARENT_RUN_ATTR, parent.run_id)
    root = study_root(config, spec.study)
    study.set_user_attr(ROOT_ATTR, str(root))
    threads = spec.threads or max(1, (os.cpu_count() or 1) // spec.workers)
    print(f"study {spec.study} in {shown_url(storage_url)}: {spec.workers} worker(s), {threads} thread(s) per trial; "
          f"trials in {root}, progress in {root / 'sweep.log'}", flush=True)
    print(describe_sampler(spec), flush=True)
    if spec.workers == 1:
        stopped = _work(spec, study, storage, storage_url, root, threads, config, index=0, heartbeat=args.heartbeat)
    else:
        stopped = _spawn_workers(spec, storage_url, threads, args.heartbeat)
    elapsed = time.perf_counter() - started
    out = root / "report"
    from sweeps.report import report

    report(study, spec, out)
    parent.log_artifacts(out)
    short = incomplete(study, spec, f"python -m sweeps run --config {args.config} --resume")
    parent.end("KILLED" if stopped else "FAILED" if short else "FINISHED")
    print(f"study {spec.study}: {len(study.trials)} trials in {elapsed:.0f} s; report in {out}; "
          f"dashboard: optuna-dashboard {shown_url(storage_url)}", flush=True)
    print(disk_use(root, spec.keep_checkpoints), flush=True)
    if stopped:
        print(f"interrupted: continue with python -m sweeps run --config {args.config} --resume", file=sys.stderr)
        raise SystemExit(130)
    if short:
        print(short, file=sys.stderr)
        raise SystemExit(INCOMPLETE)


def worker_command(args: argparse.Namespace) -> None:
    from sweeps.study import check_space, default_storage, load, open_storage, shown_url, stored_spec

    storage_url = args.storage or default_storage()
    storage = open_storage(storage_url, heartbeat_seconds=args.heartbeat)
    index = args.index if args.index is not None else os.getpid() % 10_000
    study = load(args.study, storage, worker_index=index)  # a missing study: one line naming those there
    spec = stored_spec(study)
    config = check_space(spec)
    threads = args.threads or spec.threads or (os.cpu_count() or 1)
    root = study_root(config, spec.study)
    if _work(spec, study, storage, storage_url, root, threads, config, index=index, heartbeat=args.heartbeat):
        raise SystemExit(130)
    short = incomplete(study, spec, f"python -m sweeps run --config FILE --resume, or python -m sweeps worker "
                                    f"--study {spec.study} --storage {shown_url(storage_url)}")
    if short:
        print(short, file=sys.stderr)
        raise SystemExit(INCOMPLETE)


def report_command(args: argparse.Namespace) -> None:
    from sweeps.report import report
    from sweeps.study import ROOT_ATTR, default_storage, load, open_storage, stored_spec

    storage_url = args.storage or default_storage()
    storage = open_storage(storage_url, heartbeat_seconds=None)
    study = load(args.study, storage)
    spec = stored_spec(study)
    out = Path(args.out) if args.out else Path(study.user_attrs.get(ROOT_ATTR, Path("runs") / spec.study)) / "report"
    _, files = report(study, spec, out)
    print(f"wrote {len(files)} files to {out}")


# ------------------------------------------------------------------------------- helpers
def incomplete(study: Any, spec: Any, resume: str) -> str:
    """One line saying how many trials a study lacks and how to continue it; empty when none."""
    from optuna.trial import TrialState

    from sweeps.study import missing_trials

    missing = missing_trials(study, spec)
    if not missing:
        return ""
    from sweeps.study import INTERRUPTED_ATTR

    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    interrupted = [str(t.number) for t in running if t.user_attrs.get(INTERRUPTED_ATTR)]
    others = [str(t.number) for t in running if not t.user_attrs.get(INTERRUPTED_ATTR)]
    still = "".join([f" (trial {', '.join(others)} still running)" if others else "",
                     f" (trial {', '.join(interrupted)} interrupted: it resumes from its checkpoint)" if interrupted
                     else ""])
    return (f"error: study {spec.study} is incomplete: {missing} of its {spec.n_trials} trials are missing{still}; "
            f"continue it with {resume}")


def disk_use(root: Path, keep_checkpoints: bool = False) -> str:
    """One line: what the study's folder holds on disk, in all and in checkpoints."""
    total = checkpoints = 0
    for path in root.rglob("*"):
        with contextlib.suppress(OSError):
            if path.is_file() and not path.is_symlink():
                size = path.stat().st_size
                total += size
                checkpoints += size if "checkpoints" in path.relative_to(root).parts else 0
    kept = "every trial keeps its own: keep_checkpoints" if keep_checkpoints else \
        "only complete, feasible trials keep theirs"
    return f"disk: {total / 1e6:.1f} MB in {root} ({checkpoints / 1e6:.1f} MB of checkpoints and exports; {kept})"


def study_root(config: dict[str, Any], study: str) -> Path:
    """Where a study's trial folders go: the fit config's default_root_dir, else runs/<study>."""
    root = (config.get("trainer") or {}).get("default_root_dir") or Path("runs") / study
    path = Path(os.path.expanduser(str(root))).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _devices(config: dict[str, Any]) -> int:
    devices = (config.get("trainer") or {}).get("devices")
    return devices if isinstance(devices, int) and devices > 0 else 1


def _work(spec: Any, study: Any, storage: Any, storage_url: str, root: Path, threads: int, config: dict[str, Any],
          index: int, heartbeat: int | None) -> bool:
    """Run trials in this process until the study is done; True if stopped by Ctrl-C or SIGTERM."""
    from sweeps.worker import Worker

    name = f"worker {index}"
    with open(root / "sweep.log", "a", encoding="utf-8") as log:
        worker = Worker(study, spec, storage, storage_url, root, threads, devices=_devices(config), name=name, log=log,
                        heartbeat_seconds=heartbeat)
        worker.say(f"{name}: joined study {spec.study} (pid {os.getpid()}, {threads} thread(s) per trial)")
        outcomes = worker.run()
        worker.say(f"{name}: {'stopped' if worker.stopped else 'done'} after {len(outcomes)} trial(s)")
    return worker.stopped


def _spawn_workers(spec: Any, storage_url: str, threads: int, heartbeat: int) -> bool:
    """Run ``spec.workers`` worker processes until they end; True if stopped by Ctrl-C or SIGTERM."""
    command = [sys.executable, "-m", "sweeps", "worker", "--study", spec.study, "--storage", storage_url,
               "--threads", str(threads), "--heartbeat", str(heartbeat)]
    workers = [subprocess.Popen([*command, "--index", str(i)]) for i in range(spec.workers)]
    stopped = []

    def stop(signum: int, frame: Any) -> None:
        stopped.append(signum)
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signal.SIGTERM)  # each stops its trial cleanly

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        codes = [worker.wait() for worker in workers]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    failed = [code for code in codes if code not in (0, 130, INCOMPLETE)]  # the run says what is missing
    if failed:
        print(f"warning: {len(failed)} worker(s) ended with status {failed}", file=sys.stderr)
    return bool(stopped) or 130 in codes


if __name__ == "__main__":
    main()
