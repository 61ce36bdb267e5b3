"""Run folders: where each run's files go, which checkpoint ``--ckpt_path last|best`` names, and
what state a run is in.

Every run gets its own folder, ``<root>/<run name>/`` (root: ``trainer.default_root_dir``, else
``runs/<experiment>``), so two runs never overwrite each other; ``root/latest`` points at the newest
training run. A fit that resumes a run's newest checkpoint continues that run's folder.
"""

from __future__ import annotations

import json
import os
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lmexp.atomic import write_text
from lmexp.checkpoints import RESUMABLE, latest_checkpoint, read_checkpoint
from lmexp.errors import CheckpointError, ConfigError
from lmexp.hardware import process_rank

__all__ = [
    "RUN_DIR_VARIABLE", "RUN_MARK", "continued_run_dir", "default_experiment", "latest_checkpoints_folder",
    "mark_run", "new_run_dir", "point_latest", "read_run_mark", "resolve_named_checkpoint", "resume_checkpoint",
    "run_folders", "run_of_checkpoint", "saved_run_config", "shown_path",
]

RUN_DIR_VARIABLE = "LMEXP_RUN_DIR"  # tells the other ranks of a DDP run which folder rank 0 chose


def default_experiment(config_files: Sequence[Any]) -> str:
    """The first config file's name without its suffix (``quickstart``), else ``default``."""
    for path in config_files or ():
        name = Path(str(getattr(path, "relative", path))).stem
        if name:
            return name
    return "default"


def new_run_dir(root: Path, run_name: str | None, verb: str) -> Path:
    """Create ``root/<run name>``: the given name, or the start time (``20261203-101500``).

    Evaluations add ``-validate``/``-test`` (``--run_name X`` then names the run whose
    checkpoint is evaluated, and the folder is ``X-test``), and a taken name gets ``-2``,
    ``-3``... except a fit's explicit ``--run_name``, which is refused. Under DDP only rank 0
    creates the folder: the other ranks take its path from the environment Lightning's launcher
    passes on, or (torchrun, SLURM) a path they never write to, since checkpoints, config and
    tracking are rank 0's and Lightning broadcasts rank 0's folders to the others.
    """
    if run_name is not None and (not run_name.strip() or Path(run_name).name != run_name or run_name in (".", "..")):
        raise ConfigError(f"--run_name {run_name!r} is not a folder name: use letters, digits, '-', '_' or '.'")
    root = Path(os.path.expanduser(root)).resolve()
    suffix = "" if verb == "fit" else f"-{verb}"
    base = (run_name or time.strftime("%Y%m%d-%H%M%S")) + suffix
    if process_rank() != 0:
        return Path(os.environ.get(RUN_DIR_VARIABLE) or root / base)
    root.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, 1000):
        path = root / (base if attempt == 1 else f"{base}-{attempt}")
        try:
            path.mkdir()  # atomic: two runs started in the same second get different folders
            break
        except FileExistsError:
            if run_name is not None and verb == "fit":
                raise ConfigError(f"run folder {str(path)!r} exists: pick another --run_name, or continue that "
                                  "run with --ckpt_path last") from None
    os.environ[RUN_DIR_VARIABLE] = str(path)
    return path


def continued_run_dir(ckpt_path: str | None, requested: str | None, root: Path, run_name: str | None) -> Path | None:
    """The run folder a fit continues, or None for a new one.

    A fit continues a run when it resumes that run's newest checkpoint (``--ckpt_path last``,
    or the path of its ``last.ckpt``/``interrupted.ckpt``), under the run's own name if one is
    given. Starting from an older or a best checkpoint branches into a new run, so the run it
    came from keeps its files and its MLflow record.
    """
    root = Path(os.path.expanduser(root)).resolve()
    if ckpt_path is None:
        named = root / run_name if run_name else None
        return named if requested == "last" and named is not None and named.is_dir() else None
    path = Path(ckpt_path).resolve()
    folder = path.parent.parent
    if path.parent.name != "checkpoints" or folder.parent != root or (run_name and folder.name != run_name):
        return None
    # --ckpt_path last resumes the run's newest readable checkpoint, whichever file holds it.
    return folder if requested == "last" or latest_checkpoint(path.parent) == path else None


def point_latest(run_dir: Path) -> None:
    """``root/latest`` -> the newest training run's folder, so ``runs/quickstart/latest/checkpoints/best.ckpt``
    names the latest model (evaluation runs do not move it). Rank 0 only."""
    if process_rank() != 0:
        return
    root = run_dir.parent
    link = root / "latest"
    if link.exists() and not link.is_symlink():
        return  # a run called "latest": leave it
    temporary = root / f".latest-{os.getpid()}"
    try:
        temporary.unlink(missing_ok=True)
        temporary.symlink_to(run_dir.name, target_is_directory=True)
        os.replace(temporary, link)
    except OSError:  # a file system without symlinks: the link is a convenience
        temporary.unlink(missing_ok=True)


def run_folders(root: Path) -> list[Path]:
    """The run folders under ``root``: those holding a run's config or checkpoints (not ``latest``)."""
    if not root.is_dir():
        return []
    return [p for p in root.iterdir() if p.is_dir() and not p.is_symlink()
            and ((p / "config.yaml").is_file() or (p / "checkpoints").is_dir())]


def latest_checkpoints_folder(root: Path, names: Sequence[str] = (*RESUMABLE, "best.ckpt")) -> Path | None:
    """The checkpoints folder of the run under ``root`` whose checkpoint files (readable or not)
    were written last: the run that ``--ckpt_path last`` without a run name means."""
    found = [path for run in run_folders(root) for path in (run / "checkpoints" / name for name in names)
             if path.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime).parent if found else None


def resume_checkpoint(folder: Path, verb: str, best_name: str = "best") -> Path | None:
    """The checkpoint ``--ckpt_path last`` takes in a run's checkpoints ``folder``: the readable one
    of ``last.ckpt``, ``interrupted.ckpt`` and the best with the most steps (the newer on a tie).
    Unreadable files passed over are named in a warning; a folder whose checkpoints are all
    unreadable is an error (never a silent start from scratch); None when it has none at all."""
    names = (*RESUMABLE, f"{best_name}.ckpt")
    found: list[tuple[int, float, Path]] = []
    skipped: dict[Path, str] = {}
    for path in (folder / name for name in dict.fromkeys(names)):
        if not path.is_file():
            continue
        try:
            checkpoint = read_checkpoint(path, mmap=True)
        except CheckpointError:
            why = "cut short or not a checkpoint" if not zipfile.is_zipfile(path) else "torch cannot load it"
            skipped[path] = f"is unreadable ({why})"
            continue
        if verb == "fit" and "optimizer_states" not in checkpoint:
            skipped[path] = "holds weights only (nothing to resume training from)"
            continue
        found.append((int(checkpoint.get("global_step", 0)), path.stat().st_mtime, path))
    if not found:
        if not skipped:
            return None
        reasons = "; ".join(f"{path.name} {why}" for path, why in skipped.items())
        raise CheckpointError(f"--ckpt_path last: none of the checkpoints in {shown_path(folder)} can be resumed "
                              f"({reasons}): pass the path of another checkpoint, or train anew without --ckpt_path")
    step, _, chosen = max(found)
    for path, why in skipped.items():
        rank_zero_warn(f"{shown_path(path)} {why}: resuming from {shown_path(chosen)} at step {step}")
    return chosen


def resolve_named_checkpoint(ckpt_path: str | None, root: Path, run_name: str | None, verb: str,
                             best_name: str = "best") -> str | None:
    """The file ``--ckpt_path last`` or ``best`` names: in the named run, else in the run whose
    checkpoints are the newest. ``fit`` with ``last`` and nothing saved yet starts from scratch."""
    if ckpt_path not in ("last", "best"):
        return ckpt_path
    where = root / run_name if run_name else root
    folder = where / "checkpoints" if run_name else latest_checkpoints_folder(root, (*RESUMABLE, f"{best_name}.ckpt"))
    found = None
    if folder is not None and ckpt_path == "best":
        found = folder / f"{best_name}.ckpt"
        read_checkpoint(found, mmap=True)
    elif folder is not None:
        found = resume_checkpoint(folder, verb, best_name)
    if found is None:
        if verb == "fit" and ckpt_path == "last":
            rank_zero_info(f"--ckpt_path last: no checkpoint under {where} yet, training from the start")
            return None
        raise CheckpointError(f"--ckpt_path {ckpt_path}: no run under {where} has a readable checkpoint; "
                              "train first or pass a path")
    return str(found)


def run_of_checkpoint(checkpoint: str | Path) -> Path | None:
    """The run folder a checkpoint belongs to (``<run>/checkpoints/best.ckpt``, or the export
    folder ``<run>/checkpoints/best``), through ``latest`` links; None for a file elsewhere."""
    path = Path(checkpoint).expanduser().resolve()
    folder = path.parent.parent
    if path.parent.name != "checkpoints":
        return None
    return folder if (folder / "config.yaml").is_file() or (folder / RUN_MARK).is_file() else None


def saved_run_config(checkpoint: str | Path) -> dict[str, Any] | None:
    """The saved ``config.yaml`` of the run that wrote ``checkpoint`` (the settings it ran with,
    overrides included); None when the checkpoint is not in a run folder or it has no config."""
    import yaml

    run = run_of_checkpoint(checkpoint)
    if run is None or not (run / "config.yaml").is_file():
        return None
    try:
        config = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        rank_zero_warn(f"{shown_path(run / 'config.yaml')} is unreadable ({err}): the command's settings apply")
        return None
    return config if isinstance(config, dict) else None


RUN_MARK = ".lmexp-run.json"  # in each run folder: what the run is doing, and which process does it


def mark_run(run_dir: Path, verb: str, status: str) -> None:
    """Record the run's state in its folder (``running``, ``finished``, ``failed``, ``stopped``):
    a folder still marked ``running`` whose process is gone was killed (``lmexp runs clean``)."""
    import socket

    record = {"status": status, "verb": verb, "pid": os.getpid(), "host": socket.gethostname(),
              "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    try:
        write_text(run_dir / RUN_MARK, json.dumps(record))
    except OSError:  # a full disk here must not hide the error that stopped the run
        pass


def read_run_mark(run_dir: Path) -> dict[str, Any]:
    """The run's recorded state; empty for folders written before it was recorded, or unreadable."""
    try:
        record = json.loads((Path(run_dir) / RUN_MARK).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def shown_path(path: Path) -> str:
    """A path as the user would type it: relative to the working directory when inside it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)

