"""What a run records: its ``config.yaml``, its state, and in MLflow its settings, system,
data, model, samples, best export and loss curve (``RunRecorder``, a callback every run gets)."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lmexp.atomic import write_text
from lmexp.checkpoints import exported_step
from lmexp.faults import fault_point
from lmexp.hardware import cpu_model
from lmexp.mlflow_store import flatten
from lmexp.models import count_parameters
from lmexp.run_folders import mark_run, point_latest, read_run_mark, shown_path
from lmexp.tracking import MLflowTracker, tracker_of

__all__ = ["SETTLE_SECONDS", "TRACKING_KEY", "RunRecorder", "git_state", "system_info"]

TRACKING_KEY = "lmexp_run"  # checkpoint entry: the MLflow run a resumed fit continues
# Longest wait, before the first training step, for MLflow's start to finish: beside the first
# steps it took 20-30% of their speed on 2 cores (BENCHMARKS.md, bench_overhead.py).
SETTLE_SECONDS = 30.0


def git_state(folder: Path) -> dict[str, str]:
    """Commit and dirty flag of the git checkout ``folder`` is in (empty outside one)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], check=False, cwd=folder, capture_output=True,
                                text=True, timeout=10)
        if commit.returncode != 0:
            return {}
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], check=False, cwd=folder,
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return {"mlflow.source.git.commit": commit.stdout.strip(), "git.dirty": str(bool(status.stdout.strip())).lower()}


def system_info(trainer: pl.Trainer) -> dict[str, str]:
    """Versions, CPU, device and parallel settings: what a run's speed and numerics depend on."""
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
        rank_zero_info(f"run folder: {shown_path(self.run_dir)}{where}")
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
        tracker.start_system_metrics()

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
        self._upload_results(trainer, tracker, finished=False)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Called before Lightning finalizes the loggers (only when the verb succeeded).
        if trainer.is_global_zero and self._recording and read_run_mark(self.run_dir).get("status") == "running":
            mark_run(self.run_dir, stage, "finished")
        tracker = tracker_of(trainer)
        if tracker is not None and trainer.is_global_zero:
            self._upload_results(trainer, tracker)

    def _upload_results(self, trainer: pl.Trainer, tracker: MLflowTracker, finished: bool = True) -> None:
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
        if finished and export is not None and export.is_dir():
            # The best checkpoint as the run's MLflow model, its export as the model's artifacts
            # (a failed or stopped fit logs none: `lmexp runs register` can log it later).
            score = getattr(checkpoint, "best_model_score", None)
            tracker.log_best_model(export, exported_step(export), best, getattr(checkpoint, "monitor", None),
                                   float(score) if score is not None else None)
        tracker.log_loss_curve()
        store = tracker.tracking_uri
        compare = f"tracked at {store}" if store.startswith("http") else f"mlflow ui --backend-store-uri {store}"
        rank_zero_info(f"run {self.run_dir.name} saved in {shown_path(self.run_dir)}; compare runs: lmexp runs, {compare}")
