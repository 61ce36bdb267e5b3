"""Every use lmexp makes of Lightning's private API, in one place.

Each function names the private attribute it reads or overrides and why no public hook does the
job. ``tests/test_lightning_internals.py`` exercises each against the installed Lightning, so an
upgrade that changes one fails there, loudly, rather than somewhere in a run;
``pyproject.toml`` bounds ``lightning`` to the versions tested. Nothing else in lmexp touches an
underscore attribute of Lightning.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar

if TYPE_CHECKING:
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

# ------------------------------------------------------------------ trainer, loops, checkpoints


def logs_this_step(trainer: pl.Trainer) -> bool:
    """Whether Lightning writes this training batch's metrics (every ``log_every_n_steps``).

    Reads ``trainer._logger_connector.should_update_logs``: the public ``log_every_n_steps`` and
    ``global_step`` do not say it, since Lightning counts the batches that stepped (accumulation)
    in a private loop counter and also logs when training stops. Anything logged or read back
    between those steps is wasted: a logged GPU tensor turned into a number is a device sync.
    Read directly, so a Lightning that renames it raises ``AttributeError`` here rather than
    quietly logging (and syncing) every step.
    """
    return trainer._logger_connector.should_update_logs or bool(trainer.fast_dev_run)


def batches_processed(trainer: pl.Trainer) -> int:
    """Training batches of the current epoch that have run (``processed`` already counts the batch a
    checkpoint is taken after; ``completed`` lags by one).

    Reads ``trainer.fit_loop.epoch_loop.batch_progress``: ``fit_loop`` is public, but its type
    (``_FitLoop``), the epoch loop and the progress records are private classes, with no public
    accessor for the position inside an epoch.
    """
    return int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)


def between_epochs(trainer: pl.Trainer) -> bool:
    """Whether training stands between two epochs: the last one is completed and the next has not
    started, so the batch counts still describe the finished epoch.

    Reads ``trainer.fit_loop.epoch_progress`` (a private ``_Progress`` record, no public accessor).
    """
    epochs = trainer.fit_loop.epoch_progress.current
    return epochs.started == epochs.completed > 0


def rewind_saved_fit_loop(checkpoint: dict[str, Any], last_step_batch: int | None) -> tuple[int, bool] | None:
    """Rewind the fit loop's progress saved in ``checkpoint`` to the last optimizer step.

    ``last_step_batch`` is the batch of the current epoch that ended the last step, or None
    between epochs (the saved epoch is then counted as finished and the next one as not begun).
    Edits ``checkpoint["loops"]["fit_loop"]``, whose layout (``epoch_loop.batch_progress``,
    ``epoch_progress`` with ``ready/started/processed/completed`` counts) is the private state of
    Lightning's loops: no public API writes a loop's progress.

    Returns (batches of the epoch the rewound state counts as done, whether any count went back),
    or None when the checkpoint holds no fit-loop progress.
    """
    loops = checkpoint.get("loops", {}).get("fit_loop", {})
    progress, epochs = loops.get("epoch_loop.batch_progress"), loops.get("epoch_progress")
    if not progress or not epochs:
        return None
    current, total = progress["current"], progress["total"]
    if last_step_batch is None:
        for key in ("ready", "started", "processed", "completed"):
            current[key] = 0
        progress["is_last_batch"] = False  # it described the finished epoch's final batch
        for counts in (epochs["current"], epochs["total"]):
            counts["ready"] = counts["started"] = counts["completed"]
        return 0, False
    rewound = False
    for key in ("ready", "started", "processed", "completed"):
        excess = current[key] - last_step_batch
        if excess > 0:
            current[key] -= excess
            total[key] -= excess
            rewound = True
    return last_step_batch, rewound


class SaveNotifyingCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that calls ``on_checkpoint_saved(trainer, filepath)`` after each file it writes.

    Overrides the private ``ModelCheckpoint._save_checkpoint``: it is the one place that knows a
    file was just written and which one (``Callback.on_save_checkpoint`` runs before the file
    exists, and ``best_model_path`` keeps its name when a new best replaces the old).
    """

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        self.on_checkpoint_saved(trainer, filepath)

    def on_checkpoint_saved(self, trainer: pl.Trainer, filepath: str) -> None:
        """Called after ``filepath`` is written (override)."""


class SelectiveRichProgressBar(RichProgressBar):
    """``RichProgressBar`` with two public choices in place of private methods.

    ``train_description(epoch)`` titles the training bar (None: Lightning's title), overriding the
    private ``_get_train_description``. ``refreshes_metrics(trainer)`` says whether this training
    batch re-reads the logged metrics: the stock ``on_train_batch_end`` re-reads them after every
    batch through the private ``_update`` / ``_update_metrics`` /
    ``_initialize_train_progress_bar_id``, and no public hook skips that.
    """

    def train_description(self, current_epoch: int) -> str | None:
        return None

    def refreshes_metrics(self, trainer: pl.Trainer) -> bool:
        return True

    def _get_train_description(self, current_epoch: int) -> str:
        description = self.train_description(current_epoch)
        return super()._get_train_description(current_epoch) if description is None else description

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.is_disabled:
            return
        if self.train_progress_bar_id is None:  # resumed mid-epoch
            self._initialize_train_progress_bar_id()
        self._update(self.train_progress_bar_id, batch_idx + 1)
        if self.refreshes_metrics(trainer):
            self._update_metrics(trainer, pl_module)
        self.refresh()


# ------------------------------------------------------------------ LightningCLI

class CheckpointMergeMixin:
    """LightningCLI mixin that decides how the hyperparameters saved in ``--ckpt_path``'s
    checkpoint enter the parsed config: ``class MyCLI(CheckpointMergeMixin, LightningCLI)``.

    LightningCLI's ``__init__`` calls its private ``_parse_ckpt_path`` right after parsing, and
    that puts every saved hyperparameter over the command's own settings. Lightning 2.6 has no
    public hook for it (``adapt_checkpoint_hparams`` is proposed, not released), so the override
    lives here and hands over to ``merge_checkpoint_hparams``, which subclasses override;
    ``lightning_checkpoint_merge`` is Lightning's own merge, for the cases that keep it.
    """

    def merge_checkpoint_hparams(self) -> None:
        """Merge the checkpoint's hyperparameters into ``self.config`` (default: Lightning's way)."""
        self.lightning_checkpoint_merge()

    def lightning_checkpoint_merge(self) -> None:
        """Lightning's merge: every saved hyperparameter over the command's settings."""
        super()._parse_ckpt_path()  # type: ignore[misc]

    def _parse_ckpt_path(self) -> None:
        self.merge_checkpoint_hparams()


def subcommand_parser(cli: LightningCLI, verb: str) -> LightningArgumentParser:
    """The parser of one verb (``fit``, ``validate``...), read through the private ``LightningCLI._parser``.

    Each verb has a parser of its own (kept in the private ``_subcommand_parsers``), whose ``dump``
    writes the verb's settings as ``--config`` reads them back. The public ``cli.parser`` is that of
    the whole command line: its dump nests everything under the verb and checks the whole command.
    """
    return cli._parser(verb)


def leave_verb_to_caller(cli: LightningCLI) -> None:
    """Keep LightningCLI from running the verb it parsed, so the caller runs it; call it from
    ``after_instantiate_classes``.

    ``__init__`` runs the verb (the private ``_run_subcommand``) after ``after_instantiate_classes``
    whenever ``cli.subcommand`` is set. The public switch, ``run=False``, also takes away the
    fit/validate/test sub-commands the command line is made of, so clearing ``subcommand`` there
    is the one way.
    """
    cli.subcommand = None
