"""K-fold cross-validation: one fit per fold, each a tracked run under one parent run.

``lmexp fit ... --data.num_folds K`` comes here: the same config is fitted K times, fold ``i``
validating on the i-th fold of the training table and training on the rest. Each fold's
metrics are those of its best validation (the checkpoint it would keep); the parent run holds
their mean and standard deviation, and ``crossval.json`` in the parent's folder keeps them,
with what each fold trained and validated on (``splits``: see ``split_record``).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from lmexp.atomic import write_text
from lmexp.data.classification import Examples
from lmexp.mlflow_store import TrackingStore, default_tracking_uri
from lmexp.run_folders import new_run_dir
from lmexp.tracking import MLflowTracker

__all__ = ["BestValidation", "CrossValidation", "examples_digest", "split_record", "summarize", "tracking_uri_of"]


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
    """The K fits of one config as one run: built by ``lmexp.runs``, executed like a ``Run``.

    ``build`` makes each fold's fit (``lmexp.runs.build``'s signature); it is given rather than
    imported, so that the run builder, which makes a ``CrossValidation``, stays the only way in.
    """

    def __init__(self, args: list[str], num_folds: int, experiment: str, root: Path, run_name: str | None,
                 monitor: str | None, mode: str, tracking_uri: str | None, build: Callable[..., Any]) -> None:
        self.args, self.num_folds, self.experiment = args, num_folds, experiment
        self.build = build
        self.run_dir = new_run_dir(root, f"{run_name}-cv" if run_name else None, "fit")
        self.monitor, self.mode = monitor, mode
        self.tracking_uri = tracking_uri  # None: tracking off

    def execute(self) -> dict[str, dict[str, float]]:
        base = self.run_dir.name
        parent = self._start_parent(base)
        folds: list[dict[str, float]] = []
        splits: list[dict[str, dict[str, Any]]] = []
        for fold in range(self.num_folds):
            rank_zero_info(f"cross-validation: fold {fold + 1} of {self.num_folds}")
            best = BestValidation(self.monitor, self.mode)
            logger: Any = False
            if self.tracking_uri is not None:
                tags = {"crossval.fold": str(fold), "crossval.folds": str(self.num_folds)}
                if parent is not None:
                    tags["mlflow.parentRunId"] = parent.run_id
                logger = MLflowTracker(self.tracking_uri, tags=tags)
            run = self.build("fit", args=[*self.args, f"--data.init_args.fold={fold}", f"--run_name={base}-fold{fold}",
                                     f"--experiment={self.experiment}", f"--trainer.default_root_dir={self.run_dir.parent}"],
                        callbacks=[best], logger=logger)
            run.execute()
            folds.append(best.best)
            splits.append(split_record(run.datamodule))
        summary = summarize(folds)
        self._report(summary, folds, splits, parent)
        return summary

    def _start_parent(self, name: str) -> TrackingStore | None:
        if self.tracking_uri is None:
            return None
        store = TrackingStore(self.tracking_uri, self.experiment, f"{name} ({self.num_folds}-fold)",
                              tags={"crossval.folds": str(self.num_folds), "run_dir": str(self.run_dir)})
        try:
            store.connect()
        except Exception as err:  # noqa: BLE001  (the folds track themselves, with their journals, either way)
            rank_zero_info(f"cross-validation: no parent MLflow run ({type(err).__name__}: {err})")
            return None
        return store

    @rank_zero_only
    def _report(self, summary: dict[str, dict[str, float]], folds: list[dict[str, float]],
                splits: list[dict[str, dict[str, Any]]], parent: TrackingStore | None) -> None:
        lines = [f"cross-validation over {self.num_folds} folds (mean ± std of each fold's best validation):"]
        lines += [f"  {name}: {s['mean']:.4f} ± {s['std']:.4f}" for name, s in summary.items()]
        print("\n".join(lines))
        record = {"folds": folds, "summary": summary, "splits": splits}
        write_text(self.run_dir / "crossval.json", json.dumps(record, indent=2))
        if parent is not None:
            values = {f"cv/{name}_{stat}": value for name, s in summary.items() for stat, value in s.items()}
            parent.apply({"kind": "metrics", "values": values, "time": int(time.time() * 1000), "step": 0})
            parent.apply({"kind": "artifact", "path": str(self.run_dir / "crossval.json")})
            parent.client.set_terminated(parent.run_id, "FINISHED")


def split_record(datamodule: Any) -> dict[str, dict[str, Any]]:
    """What one fold trained and validated on. Per split: ``examples`` (how many) and ``sha256``
    (``examples_digest``: two folds, or two runs, used the same examples exactly when the
    digests agree); for validation also ``lines``, the training table's lines it held out (as
    in ``train.tsv:LINE``), to trace a fold's errors back to the rows it was scored on."""
    record: dict[str, dict[str, Any]] = {}
    for split in ("train", "val"):
        examples = (getattr(datamodule, "splits", None) or {}).get(split)
        if examples is None:
            continue
        record[split] = {"examples": len(examples), "sha256": examples_digest(examples)}
        if split == "val":
            record[split]["lines"] = [int(origin.rsplit(":", 1)[1]) for origin in examples.origins]
    return record


def examples_digest(examples: Examples) -> str:
    """SHA-256 of labelled examples in their order: each example's text, second text and label."""
    digest = hashlib.sha256()
    pairs = examples.pairs or [None] * len(examples.texts)
    labels = examples.labels or [None] * len(examples.texts)
    for row in zip(examples.texts, pairs, labels):
        digest.update(json.dumps(row).encode() + b"\n")
    return digest.hexdigest()


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
