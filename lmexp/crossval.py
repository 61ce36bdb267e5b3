"""K-fold cross-validation: one fit per fold, each a tracked run under one parent run.

``lmexp fit ... --data.num_folds K`` comes here: the same config is fitted K times, fold ``i``
validating on the i-th fold of the training table and training on the rest. Each fold's
metrics are those of its best validation (the checkpoint it would keep); the parent run holds
their mean and standard deviation, and ``crossval.json`` in the parent's folder keeps them.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from lmexp.mlflow_store import TrackingStore, default_tracking_uri
from lmexp.runs import build, new_run_dir
from lmexp.tracking import MLflowTracker


class BestValidation(pl.Callback):
    """Keeps the validation metrics of the validation where ``monitor`` was best."""

    def __init__(self, monitor: str | None, mode: str = "min") -> None:
        self.monitor, self.mode = monitor, mode
        self.best: dict[str, float] = {}

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        current = metrics.get(self.monitor) if self.monitor else None
        previous = self.best.get(self.monitor) if self.monitor else None
        better = previous is None or current is None or (current < previous if self.mode == "min" else current > previous)
        if better and metrics:
            self.best = metrics


class CrossValidation:
    """The K fits of one config as one run: built by the CLI, executed like a ``Run``."""

    def __init__(self, args: list[str], num_folds: int, experiment: str, root: Path, run_name: str | None,
                 monitor: str | None, mode: str, tracking_uri: str | None) -> None:
        self.args, self.num_folds, self.experiment = args, num_folds, experiment
        self.run_dir = new_run_dir(root, f"{run_name}-cv" if run_name else None, "fit")
        self.monitor, self.mode = monitor, mode
        self.tracking_uri = tracking_uri  # None: tracking off

    def execute(self) -> dict[str, dict[str, float]]:
        base = self.run_dir.name
        parent = self._start_parent(base)
        folds: list[dict[str, float]] = []
        for fold in range(self.num_folds):
            rank_zero_info(f"cross-validation: fold {fold + 1} of {self.num_folds}")
            best = BestValidation(self.monitor, self.mode)
            logger: Any = False
            if self.tracking_uri is not None:
                tags = {"crossval.fold": str(fold), "crossval.folds": str(self.num_folds)}
                if parent is not None:
                    tags["mlflow.parentRunId"] = parent.run_id
                logger = MLflowTracker(self.tracking_uri, tags=tags)
            run = build("fit", args=[*self.args, f"--data.init_args.fold={fold}", f"--run_name={base}-fold{fold}",
                                     f"--experiment={self.experiment}", f"--trainer.default_root_dir={self.run_dir.parent}"],
                        callbacks=[best], logger=logger)
            run.execute()
            folds.append(best.best)
        summary = summarize(folds)
        self._report(summary, folds, parent)
        return summary

    def _start_parent(self, name: str) -> TrackingStore | None:
        if self.tracking_uri is None:
            return None
        store = TrackingStore(self.tracking_uri, self.experiment, f"{name} ({self.num_folds}-fold)",
                              tags={"crossval.folds": str(self.num_folds), "run_dir": str(self.run_dir)})
        try:
            store.connect()
        except Exception as err:  # the folds track themselves (with their journals) either way
            rank_zero_info(f"cross-validation: no parent MLflow run ({type(err).__name__}: {err})")
            return None
        return store

    @rank_zero_only
    def _report(self, summary: dict[str, dict[str, float]], folds: list[dict[str, float]],
                parent: TrackingStore | None) -> None:
        lines = [f"cross-validation over {self.num_folds} folds (mean ± std of each fold's best validation):"]
        lines += [f"  {name}: {s['mean']:.4f} ± {s['std']:.4f}" for name, s in summary.items()]
        print("\n".join(lines))
        (self.run_dir / "crossval.json").write_text(json.dumps({"folds": folds, "summary": summary}, indent=2))
        if parent is not None:
            values = {f"cv/{name}_{stat}": value for name, s in summary.items() for stat, value in s.items()}
            parent.apply({"kind": "metrics", "values": values, "time": int(time.time() * 1000), "step": 0})
            parent.apply({"kind": "artifact", "path": str(self.run_dir / "crossval.json")})
            parent.client.set_terminated(parent.run_id, "FINISHED")


def summarize(folds: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Mean and (sample) standard deviation of every metric all folds report."""
    names = sorted(set.intersection(*(set(f) for f in folds))) if folds else []
    summary = {}
    for name in names:
        values = [f[name] for f in folds]
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
        summary[name] = {"mean": mean, "std": std, "min": min(values), "max": max(values)}
    return summary


def tracking_uri_of(logger_setting: Any) -> str | None:
    """The tracking URI a run's ``trainer.logger`` setting leads to; None when tracking is off."""
    if logger_setting is False:
        return None
    if isinstance(logger_setting, MLflowTracker):
        return logger_setting.tracking_uri
    if isinstance(logger_setting, dict) and str(logger_setting.get("class_path", "")).endswith("MLflowTracker"):
        return (logger_setting.get("init_args") or {}).get("tracking_uri") or default_tracking_uri()
    return default_tracking_uri()
