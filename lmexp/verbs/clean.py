"""What killed runs leave behind, found and removed: ``lmexp runs clean``.

A run killed with SIGKILL (an out-of-memory kill, a scheduler's hard stop) cannot tidy up. It can
leave a run folder with no checkpoint (killed before its first save), temporary files of a write
that never finished (``.lmexp-tmp-*``, see lmexp.atomic), and a ``latest`` link to a folder that
is gone. A killed run that saved checkpoints is not stale: it is resumable (``--ckpt_path last``),
so only its temporary files are removed. Runs whose process is still alive are never touched.
"""

from __future__ import annotations

import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

from lmexp.arguments import OneLineArgumentParser
from lmexp.atomic import TEMPORARY_PREFIX, process_alive, remove_stale_temporaries, stale_temporary
from lmexp.checkpoints import read_checkpoint
from lmexp.errors import CheckpointError, ConfigError
from lmexp.run_folders import read_run_mark

__all__ = ["Leftover", "find_leftovers", "remove", "run", "run_clean", "run_state"]


@dataclass
class Leftover:
    path: Path
    reason: str

    @property
    def size(self) -> int:
        if self.path.is_file() or self.path.is_symlink():
            return self.path.lstat().st_size
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file() and not f.is_symlink())


def run_state(run_dir: Path) -> str:
    """``running`` (its process is alive), ``killed`` (marked running, process gone), or the
    recorded ``finished``/``failed``/``stopped``; ``unknown`` for folders with no record."""
    mark = read_run_mark(run_dir)
    status = mark.get("status")
    if status != "running":
        return status or "unknown"
    if mark.get("host") != socket.gethostname():
        return "running"  # another machine's process: assume alive
    return "running" if process_alive(int(mark.get("pid", 0))) else "killed"


def _readable_checkpoints(run_dir: Path) -> list[Path]:
    found = []
    for path in sorted((run_dir / "checkpoints").glob("*.ckpt")):
        try:
            read_checkpoint(path, mmap=True)
        except CheckpointError:
            continue
        found.append(path)
    return found


def find_leftovers(root: Path) -> list[Leftover]:
    """Stale run folders and temporary files under ``root`` (a folder of experiments, such as
    ``runs/``, or one experiment's folder)."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"{str(root)!r} is not a folder: pass the folder of your runs, e.g. --root runs")
    leftovers: list[Leftover] = []
    for folder in _run_folders(root):
        state = run_state(folder)
        if state == "running":
            continue
        empty = not any(p for p in folder.iterdir() if not p.name.startswith(TEMPORARY_PREFIX))
        marked_fit = read_run_mark(folder).get("verb", "fit") == "fit"
        if empty:
            leftovers.append(Leftover(folder, "empty run folder"))
        elif state in ("killed", "failed", "stopped") and marked_fit and not _readable_checkpoints(folder):
            leftovers.append(Leftover(folder, f"{state} before its first checkpoint"))
        else:
            leftovers += [Leftover(p, "temporary file of an unfinished write") for p in _temporaries(folder)]
    for folder in [root, *(p for p in root.iterdir() if p.is_dir() and not p.is_symlink())]:
        link = folder / "latest"
        if link.is_symlink() and not link.exists():
            leftovers.append(Leftover(link, "link to a run folder that is gone"))
    return leftovers


def _run_folders(root: Path) -> list[Path]:
    """Run folders: those with a run record, a config or checkpoints, and empty ones beside them."""
    candidates = [root, *(p for p in root.iterdir() if p.is_dir() and not p.is_symlink() and not _is_run(p))]
    folders = []
    for experiment in candidates:
        for folder in experiment.iterdir() if experiment.is_dir() else ():
            if not folder.is_dir() or folder.is_symlink() or folder.name.startswith(TEMPORARY_PREFIX):
                continue
            if _is_run(folder) or (experiment is not root and not any(folder.iterdir())):
                folders.append(folder)
    return folders


def _is_run(folder: Path) -> bool:
    return any((folder / name).exists() for name in (".lmexp-run.json", "config.yaml", "checkpoints"))


def _temporaries(run_dir: Path) -> list[Path]:
    found = []
    for folder in (run_dir, run_dir / "checkpoints", *(p for p in (run_dir / "checkpoints").glob("*") if p.is_dir())):
        if folder.is_dir():
            found += [p for p in folder.iterdir() if p.name.startswith(TEMPORARY_PREFIX) and stale_temporary(p)]
    return found


def remove(leftovers: list[Leftover]) -> None:
    """Remove what ``find_leftovers`` found."""
    for item in leftovers:
        if item.reason.startswith("temporary"):
            remove_stale_temporaries(item.path.parent)  # also puts back an old export set aside by a killed swap
        elif item.path.is_symlink() or item.path.is_file():
            item.path.unlink(missing_ok=True)
        else:
            shutil.rmtree(item.path, ignore_errors=True)


def run(argv: list[str]) -> list[Leftover]:
    """``lmexp runs clean [--root runs] [--dry-run]``: list, then remove, what killed runs left, and
    end their MLflow runs as KILLED."""
    parser = OneLineArgumentParser(prog="lmexp runs clean", description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=None, help="folder of the run folders (default: runs)")
    parser.add_argument("--dry-run", "--dry_run", action="store_true", help="only list what would be removed")
    parser.add_argument("--tracking_uri", "--tracking-uri", default=None,
                        help="the tracking store whose dead RUNNING runs are ended as KILLED "
                             "(default: $MLFLOW_TRACKING_URI, else ./mlflow.db)")
    options = parser.parse_args(argv)
    if options.root is None:  # the default folder: none yet means nothing to clean
        options.root = "runs"
        leftovers = find_leftovers(Path(options.root)) if Path(options.root).is_dir() else []
    else:
        leftovers = find_leftovers(Path(options.root))
    sizes = [item.size for item in leftovers]
    verb = "would remove" if options.dry_run else "removing"
    for item, size in zip(leftovers, sizes):
        print(f"{verb} {item.path} ({item.reason}, {size / 1e6:.1f} MB)")
    if not leftovers:
        print(f"nothing to clean under {options.root}")
    elif options.dry_run:
        print(f"{len(leftovers)} leftovers, {sum(sizes) / 1e6:.1f} MB: remove them with lmexp runs clean --root {options.root}")
    else:
        remove(leftovers)
    # The tracking store last: a damaged one is reported (one line) after the folders are done.
    from lmexp.mlflow_store import end_dead_runs

    for name in end_dead_runs(options.tracking_uri, options.dry_run):
        print(f"{'would end' if options.dry_run else 'ended'} MLflow run {name!r} as KILLED (its process is gone)")
    return leftovers


run_clean = run  # the verb's entry point under its descriptive name
