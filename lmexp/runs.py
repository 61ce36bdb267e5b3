"""Build a run (trainer, objective, data) exactly as ``lmexp fit|validate|test`` would.

``build`` is the one way runs are made: the command line, sweeps, benchmarks and tests all
come through it, so each gets the same config validation, one-line errors, run folder,
tracking and callbacks::

    from lmexp.runs import build

    run = build("fit", configs=["configs/quickstart.yaml"], overrides={"model.init_args.lr": 3e-3})
    run.execute()
    print(run.run_dir, run.trainer.callback_metrics["val/loss"])

Every run gets its own folder, ``<root>/<run name>/`` (root: ``trainer.default_root_dir``, else
``runs/<experiment>``), holding its checkpoints, config, samples and export, so two runs never
overwrite each other. A ``fit`` resumed with ``--ckpt_path last`` continues the run folder (and
the MLflow run) whose checkpoint is the newest.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import platform
import subprocess
import time
import warnings
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lmexp.atomic import write_text
from lmexp.checkpoints import CHECKPOINT_KEY, RESUMABLE, latest_checkpoint, read_checkpoint
from lmexp.data.tokenizer import tokenizer_from_json
from lmexp.errors import CheckpointError, ConfigError, find_user_error
from lmexp.faults import fault_point
from lmexp.hardware import cpu_model, process_rank
from lmexp.mlflow_store import flatten
from lmexp.models import count_parameters
from lmexp.tracking import MLflowTracker, tracker_of

VERBS = ("fit", "validate", "test")
RUN_DIR_VARIABLE = "LMEXP_RUN_DIR"  # tells the other ranks of a DDP run which folder rank 0 chose
TRACKING_KEY = "lmexp_run"  # checkpoint entry: the MLflow run a resumed fit continues
# Longest wait, before the first training step, for MLflow's start to finish: beside the first
# steps it took 20-30% of their speed on 2 cores (BENCHMARKS.md, bench_overhead.py).
SETTLE_SECONDS = 30.0


@dataclass
class Run:
    """A built run, ready to execute: what ``lmexp VERB`` would run, as objects."""

    verb: str
    trainer: pl.Trainer
    model: pl.LightningModule
    datamodule: pl.LightningDataModule | None
    run_dir: Path
    experiment: str
    ckpt_path: str | None
    config: dict[str, Any]
    new_folder: bool = True  # False when a fit continues an earlier run's folder
    weights_only: bool | None = None

    @property
    def tracker(self) -> MLflowTracker | None:
        return tracker_of(self.trainer)

    def execute(self) -> Any:
        """Run the verb: ``trainer.fit/validate/test(model, datamodule, ckpt_path)``.

        The config's seed is set here, where the weights are made (the model is built from the
        data's vocabulary as the verb starts), so a run gives the same result whatever was built
        or run before it in the same process.
        """
        seed = self.config.get("seed_everything")
        if isinstance(seed, int) and not isinstance(seed, bool):
            pl.seed_everything(seed, workers=True, verbose=False)
        if getattr(self.datamodule, "tokenizer_from_model", False) and self.ckpt_path and Path(self.ckpt_path).is_file():
            saved = read_checkpoint(self.ckpt_path, mmap=True).get(CHECKPOINT_KEY, {}).get("tokenizer")
            if saved is not None:
                self.model.adopt_tokenizer(tokenizer_from_json(saved))
        if hasattr(self.datamodule, "accept") and hasattr(self.model, "data_contract"):
            self.datamodule.accept(self.model.data_contract())  # task, context, a pretrained tokenizer
        method = getattr(self.trainer, self.verb)
        try:
            return method(self.model, datamodule=self.datamodule, ckpt_path=self.ckpt_path,
                          weights_only=self.weights_only)
        except BaseException:
            # Stopped before it wrote anything (bad data, say): no empty run folder stays behind.
            if self.new_folder and self.run_dir.is_dir() and not any(self.run_dir.iterdir()):
                self.run_dir.rmdir()
            raise


def build(
    verb: str = "fit",
    configs: Sequence[str | Path] = (),
    overrides: Mapping[str, Any] | None = None,
    args: Sequence[str] = (),
    callbacks: Iterable[pl.Callback] = (),
    logger: Logger | bool | None = None,
    experiment: str | None = None,
    run_name: str | None = None,
    ckpt_path: str | None = None,
) -> Run:
    """Build a run as ``lmexp VERB --config C1 --config C2 --KEY=VALUE ... ARGS`` would.

    Args:
        verb: ``fit``, ``validate`` or ``test``.
        configs: YAML config files, later ones overriding earlier ones.
        overrides: Dotted keys as the flags spell them (``model.init_args.lr``,
            ``trainer.max_steps``), with Python values.
        args: Further command-line arguments, as typed.
        callbacks: Callbacks added to the configured ones.
        logger: A Lightning logger to use instead of the default MLflow tracker; False: none.
        experiment: MLflow experiment and run-folder group; default: the first config's name.
        run_name: Name of the run and its folder; default: the start time.
        ckpt_path: A checkpoint to resume or evaluate, or ``last``/``best``.

    Raises:
        ConfigError, DataError, CheckpointError: bad input, with a one-line message.
    """
    from lmexp.lightning_cli import LmexpCLI

    named = [f"--{flag}={value}" for flag, value in
             (("experiment", experiment), ("run_name", run_name), ("ckpt_path", ckpt_path)) if value is not None]
    cli = _parse(LmexpCLI, verb, configs, overrides, [*named, *args], callbacks=list(callbacks), logger=logger)
    return cli.built


def check(
    verb: str = "fit",
    configs: Sequence[str | Path] = (),
    overrides: Mapping[str, Any] | None = None,
    args: Sequence[str] = (),
) -> dict[str, Any]:
    """Validate a run's settings as ``build`` would, without making the run; return its config.

    Every key and value is checked against the schema and the model, data and callbacks are
    constructed (cheap: weights and data come when a run starts), so a sweep can check its whole
    search space before its first trial. Nothing is written.

    Raises:
        ConfigError: a bad key or value, with the one line the command line would print.
    """
    from lmexp.lightning_cli import LmexpCLI

    seed_log = logging.getLogger("lightning.fabric.utilities.seed")  # "Seed set to": no run is started
    level = seed_log.level
    seed_log.setLevel(logging.WARNING)
    try:
        cli = _parse(LmexpCLI, verb, configs, overrides, args, check_only=True)
    except ConfigError:
        raise
    except Exception as err:  # a class's own check, wrapped by jsonargparse
        user_error = find_user_error(err)
        if user_error is None:
            raise
        raise ConfigError(str(user_error)) from None
    finally:
        seed_log.setLevel(level)
    return cli.config_dict


def _command_line(verb: str, configs: Sequence[str | Path], overrides: Mapping[str, Any] | None) -> list[str]:
    if verb not in VERBS:
        raise ConfigError(f"verb {verb!r} is not one of {', '.join(VERBS)}")
    argv = [verb] + [f"--config={path}" for path in configs]
    return argv + [f"--{key}={_flag_value(value)}" for key, value in (overrides or {}).items()]


def _parse(cli_class: type, verb: str, configs: Sequence[str | Path], overrides: Mapping[str, Any] | None,
           args: Sequence[str], **kwargs: Any) -> Any:
    from jsonargparse import ArgumentError

    from lmexp.cli import summarize_parse_error

    argv = _command_line(verb, configs, overrides) + list(args)
    try:
        with warnings.catch_warnings():
            # Building from Python inside another program (a sweep, a benchmark) is what `args` is for.
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
            return cli_class(argv, exit_on_error=False, **kwargs)
    except ArgumentError as err:  # a bad key or value: the one line the command line would print
        raise ConfigError(f"{summarize_parse_error(str(err))} (see lmexp {verb} --help)") from None


def _flag_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


# ----------------------------------------------------------------------- run folders
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
        raise CheckpointError(f"--ckpt_path last: none of the checkpoints in {_shown(folder)} can be resumed "
                              f"({reasons}): pass the path of another checkpoint, or train anew without --ckpt_path")
    step, _, chosen = max(found)
    for path, why in skipped.items():
        rank_zero_warn(f"{_shown(path)} {why}: resuming from {_shown(chosen)} at step {step}")
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


# ------------------------------------------------------------------- what a run records
def git_state(folder: Path) -> dict[str, str]:
    """Commit and dirty flag of the git checkout ``folder`` is in (empty outside one)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return {}
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=folder,
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return {"mlflow.source.git.commit": commit.stdout.strip(), "git.dirty": str(bool(status.stdout.strip())).lower()}


def system_info(trainer: pl.Trainer) -> dict[str, str]:
    versions = {f"system.{name}": _version(name) for name in ("torch", "lightning", "lmexp", "mlflow")}
    device = trainer.strategy.root_device
    return {
        **versions,
        "system.python": platform.python_version(),
        "system.cpu": cpu_model(),
        "system.device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "system.accelerator": device.type,
        "system.devices": str(trainer.num_devices * trainer.num_nodes),
        "system.strategy": type(trainer.strategy).__name__,
        "system.precision": str(trainer.precision),
        "system.threads": str(torch.get_num_threads()),
    }


def _shown(path: Path) -> str:
    """A path as the user would type it: relative to the working directory when inside it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


class RunRecorder(pl.Callback):
    """Writes the run's ``config.yaml`` into its folder and records the run in the trackers.

    Every logger gets the flattened config as hyperparameters; an ``MLflowTracker`` also gets
    tags (objective, preset, dataset, tokenizer, git), system info, data statistics, the model's
    resolved config and size, the tokenizer, samples, the best export and a loss-curve PNG.
    ``run_params`` are further params of the run (what ``trainer.precision=auto`` measured and chose).
    """

    def __init__(self, run_dir: Path, experiment: str, config: dict[str, Any], config_yaml: str,
                 ckpt_path: str | None = None, source_run_id: str | None = None,
                 run_params: Mapping[str, str] | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.experiment = experiment
        self.config = config
        self.config_yaml = config_yaml
        self.ckpt_path = ckpt_path
        self.source_run_id = source_run_id
        self.run_params = dict(run_params or {})
        self._model_recorded = False
        self._recording = False

    @rank_zero_only
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Reached once the data is ready (the data module's setup comes first): from here on
        # the run exists, so it gets its folder's files, its tracking and, if it trains, `latest`.
        self._recording = True
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_text(self.run_dir / "config.yaml", self.config_yaml)
        mark_run(self.run_dir, stage, "running")
        if stage == "fit":
            point_latest(self.run_dir)
        for logger in trainer.loggers:
            logger.log_hyperparams(self.config)
        tracker = tracker_of(trainer)
        where = f"; tracked in {tracker.tracking_uri}, experiment {self.experiment!r}" if tracker else ""
        rank_zero_info(f"run folder: {_shown(self.run_dir)}{where}")
        if tracker is None:
            return
        datamodule = trainer.datamodule
        hparams = pl_module.hparams
        tags = {
            "objective": type(pl_module).__name__,
            "preset": hparams.get("network") if isinstance(hparams.get("network"), str) else "custom",
            "dataset": str(getattr(datamodule, "source", "")),
            "tokenizer": str(getattr(datamodule, "tokenizer_kind", "")),
            "verb": trainer.state.fn.value if trainer.state.fn else stage,
            "run_dir": str(self.run_dir.resolve()),
            **git_state(Path.cwd()),
        }
        if self.ckpt_path:
            tags["checkpoint_loaded"] = str(Path(self.ckpt_path).resolve())
        if self.source_run_id and self.source_run_id != tracker.resume_run_id:
            tags["evaluated_run_id" if stage != "fit" else "started_from_run_id"] = self.source_run_id
        tracker.set_tags(tags)
        params = {**system_info(trainer), **self.run_params}
        cache = getattr(datamodule, "cache", None)
        if cache is not None:
            cleaning = cache.meta.get("cleaning", {})
            params.update({f"data_stats.cleaning.{k}": str(v) for k, v in flatten(cleaning).items()})
            for split, stats in cache.meta.get("splits", {}).items():
                params[f"data_stats.{split}_tokens"] = str(stats.get("tokens"))
            params["data_stats.vocab_size"] = str(datamodule.vocab_size)
            tracker.log_text(datamodule.tokenizer.to_str(), "tokenizer.json")
        tracker.log_hyperparams(params)
        tracker.log_artifact(self.run_dir / "config.yaml")

    def _record_model(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        tracker = tracker_of(trainer)
        if self._model_recorded or tracker is None or not trainer.is_global_zero:
            return
        self._model_recorded = True
        network = getattr(pl_module, "network_config", None)
        params = {f"network.{k}": v for k, v in network.to_dict().items()} if network is not None else {}
        model = getattr(pl_module, "model", None) or pl_module
        params["n_parameters"] = count_parameters(model)
        tracker.log_hyperparams(params)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._record_model(trainer, pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        tracker = tracker_of(trainer)
        if tracker is not None and trainer.is_global_zero and not tracker.settle(SETTLE_SECONDS) and not tracker.offline:
            rank_zero_info(f"MLflow is still starting after {SETTLE_SECONDS} s: training starts beside it")

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._record_model(trainer, pl_module)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._record_model(trainer, pl_module)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        tracker = tracker_of(trainer)
        if tracker is not None and trainer.is_global_zero:
            checkpoint[TRACKING_KEY] = {
                "run_id": tracker.wait_for_run(), "tracking_uri": tracker.tracking_uri, "experiment": self.experiment,
                "run_dir": str(self.run_dir.resolve()),
            }

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        fault_point("train.step", step=trainer.global_step)  # LMEXP_FAULT=train.step@N:kill (lmexp.faults)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if trainer.is_global_zero and self._recording:
            stopped = isinstance(exception, (KeyboardInterrupt, SIGTERMException))
            mark_run(self.run_dir, trainer.state.fn.value if trainer.state.fn else "fit", "stopped" if stopped else "failed")
        tracker = tracker_of(trainer)
        if tracker is None or not trainer.is_global_zero or not self._recording:
            return  # failed before the run began (bad data): nothing to record
        if isinstance(exception, (KeyboardInterrupt, SIGTERMException)):
            tracker.stop_reason = "killed"
        self._upload_results(trainer, tracker)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Called before Lightning finalizes the loggers (only when the verb succeeded).
        if trainer.is_global_zero and self._recording and read_run_mark(self.run_dir).get("status") == "running":
            mark_run(self.run_dir, stage, "finished")
        tracker = tracker_of(trainer)
        if tracker is not None and trainer.is_global_zero:
            self._upload_results(trainer, tracker)

    def _upload_results(self, trainer: pl.Trainer, tracker: MLflowTracker) -> None:
        samples = self.run_dir / "samples.txt"
        if samples.is_file():
            tracker.log_artifact(samples)
        if trainer.state.fn != "fit":
            return
        checkpoint = trainer.checkpoint_callback
        best = getattr(checkpoint, "best_model_path", "") if checkpoint is not None else ""
        tags = {"global_step": str(trainer.global_step)}
        if best:
            tags["checkpoint.best"] = best
        last = getattr(checkpoint, "last_model_path", "") if checkpoint is not None else ""
        if last:
            tags["checkpoint.last"] = last
        tracker.set_tags(tags)
        export = Path(best).with_suffix("") if best else None
        if export is not None and export.is_dir():
            size_mb = sum(f.stat().st_size for f in export.iterdir() if f.is_file()) / 1e6
            if 0 < size_mb <= tracker.export_max_mb:
                tracker.log_artifact(export, "export")
        tracker.log_loss_curve()
        store = tracker.tracking_uri
        compare = f"tracked at {store}" if store.startswith("http") else f"mlflow ui --backend-store-uri {store}"
        rank_zero_info(f"run {self.run_dir.name} saved in {_shown(self.run_dir)}; compare runs: lmexp runs, {compare}")
