"""Data for compression, from the same YAML configs that trained the network.

Calibration batches (Wanda, structured pruning), fine-tuning, distillation and evaluation all
read the data section of a config, encoded with the network's own tokenizer: the run builder
(``lmexp.runs.build``) is given the network as ``model.init_args.pretrained``, exactly as
``lmexp fit|validate|test`` would take it.
"""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from torch import Tensor

from compression.core import EXPERIMENT, CompressionError
from lmexp.runs import Run, build

Split = Literal["train", "val", "test"]
ONE_PROCESS = {"trainer.devices": 1, "trainer.num_nodes": 1, "trainer.strategy": "auto"}
"""Overrides for runs that only read data or evaluate: a config made for DDP would otherwise
start more processes, each re-running the whole command."""
_STAGE = {"train": "fit", "val": "validate", "test": "test"}


def configs_for(checkpoint: str | Path, configs: Sequence[str | Path] | None) -> list[Path]:
    """The given config files, else the ``config.yaml`` that training wrote into the checkpoint's
    run folder (``<run>/checkpoints/best.ckpt`` or ``<run>/checkpoints/best/``)."""
    if configs:
        missing = [str(c) for c in configs if not Path(c).is_file()]
        if missing:
            raise CompressionError(f"config file {missing[0]!r} does not exist: pass the YAML the network was trained with")
        return [Path(c) for c in configs]
    path = Path(checkpoint).resolve()
    for folder in list(path.parents)[:3]:
        if (folder / "config.yaml").is_file():
            return [folder / "config.yaml"]
    raise CompressionError(
        f"no data config for {str(checkpoint)!r}: its run folder has no config.yaml; pass --config with the YAML "
        "the network was trained with (its data section is used)"
    )


def pretrained_overrides(checkpoint: str | Path, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Overrides that make a config's objective start from `checkpoint` (its network, weights and
    tokenizer) instead of the network the config describes."""
    return {
        "model.init_args.pretrained": str(checkpoint),
        "model.init_args.network_overrides": None,
        **(overrides or {}),
    }


def build_run(
    verb: str,
    checkpoint: str | Path,
    configs: Sequence[str | Path],
    overrides: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> Run:
    """A run of `configs` on the network in `checkpoint` (see ``lmexp.runs.build`` for kwargs),
    in the experiment ``compression`` unless told otherwise: its folder is
    ``runs/compression/<time>`` (or under the config's ``default_root_dir``) and its MLflow runs sit
    beside the compression commands' own records."""
    kwargs.setdefault("experiment", EXPERIMENT)
    return build(verb, configs=configs, overrides=pretrained_overrides(checkpoint, overrides), **kwargs)


def batches(
    checkpoint: str | Path,
    configs: Sequence[str | Path],
    split: Split = "train",
    limit: int | None = 8,
    batch_size: int | None = None,
) -> list[dict[str, Tensor]]:
    """Up to `limit` batches of `split` as the config's data module serves them to this network
    (the training split for calibration, val/test for evaluation)."""
    if split not in _STAGE:
        raise CompressionError(f"split={split!r} is unknown: use train, val or test")
    overrides: dict[str, Any] = {"trainer.logger": False, **ONE_PROCESS}
    if batch_size is not None:
        overrides["data.init_args.batch_size"] = batch_size
    with tempfile.TemporaryDirectory(prefix="lmexp-compression-") as root:
        overrides["trainer.default_root_dir"] = root
        run = build_run(_STAGE[split], checkpoint, configs, overrides, logger=False)
        datamodule = run.datamodule
        if hasattr(datamodule, "accept"):
            datamodule.accept(run.model.data_contract())
        datamodule.prepare_data()
        datamodule.setup(_STAGE[split])
        loader = {"train": datamodule.train_dataloader, "val": datamodule.val_dataloader,
                  "test": datamodule.test_dataloader}[split]()
        found = list(itertools.islice(loader, limit))
    if not found:
        raise CompressionError(f"the {split} split of {', '.join(map(str, configs))} has no batches: use another split")
    return found
