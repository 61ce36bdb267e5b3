"""Callbacks lmexp adds to Lightning's: checkpoints with exports, text samples, progress displays."""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelSummary, ProgressBar
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.model_summary import get_formatted_model_size, get_human_readable_count

from lmexp.atomic import atomic_write, remove_stale_temporaries
from lmexp.checkpoints import export_safetensors, exported_step, load_checkpoint, read_checkpoint
from lmexp.data.tokenizer import describe_unknown, encode_prompt
from lmexp.errors import CheckpointError, LmexpError
from lmexp.generation import generate
from lmexp.lightning_internals import SaveNotifyingCheckpoint, SelectiveRichProgressBar, logs_this_step


class LmexpCheckpoint(SaveNotifyingCheckpoint):
    """Best and last checkpoints, plus a safetensors export of the best one.

    The export (``<dirpath>/best/``: weights, config, tokenizer) is what inference and
    compression tools load without Lightning.
    """

    def __init__(
        self,
        dirpath: str | None = None,
        monitor: str | None = "val/loss",
        mode: str = "min",
        filename: str = "best",
        save_last: bool = True,
        save_top_k: int = 1,
        every_n_train_steps: int | None = None,
        export_best: bool = True,
        enable_version_counter: bool = False,
        **kwargs: Any,
    ) -> None:
        # No version counter: each run has a folder of its own, and a checkpoint replaces its
        # previous version atomically. With one, a resumed run beside an unreadable last.ckpt
        # would write last-v1.ckpt, which --ckpt_path last never looks for.
        super().__init__(
            dirpath=dirpath, monitor=monitor, mode=mode, filename=filename, save_last=save_last,
            save_top_k=save_top_k, every_n_train_steps=every_n_train_steps,
            auto_insert_metric_name=False, enable_version_counter=enable_version_counter, **kwargs,
        )
        self.export_best = export_best

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the best/last records only within the run that wrote them.

        A checkpoint saved in another folder (an evaluation of it, or a fit that branches from it
        into a run of its own) describes that run's files: nothing of it applies here, not even
        ``best_model_path`` (this run's export would write into the other run's folder). Lightning
        would keep that path and warn "The dirpath has changed" at every ``lmexp test``.
        """
        saved = state_dict.get("dirpath", self.dirpath)
        if saved == self.dirpath or (saved and self.dirpath and _same_path(saved, self.dirpath)):
            super().load_state_dict({**state_dict, "dirpath": self.dirpath})

    def on_checkpoint_saved(self, trainer: pl.Trainer, filepath: str) -> None:
        # Under FSDP rank 0 holds only a shard: export from the full checkpoint afterwards
        # (lmexp.checkpoints.load_checkpoint + export_safetensors).
        sharded = isinstance(trainer.strategy, FSDPStrategy)
        if self.export_best and not sharded and filepath == self.best_model_path and trainer.is_global_zero:
            module = trainer.lightning_module
            tokenizer = getattr(trainer.datamodule, "tokenizer", None)
            folder = Path(filepath).with_suffix("")
            inputs = trainer.datamodule.input_settings() if hasattr(trainer.datamodule, "input_settings") else None
            export_safetensors(
                module.model, module.network_config, folder, tokenizer, module.objective_name, inputs,
                getattr(module, "transforms", None), global_step=trainer.global_step,
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and self.dirpath:
            remove_stale_temporaries(Path(self.dirpath))  # what a killed earlier process of this run left

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Leave the run's files matching its end, even after a resume that had nothing left to
        train (the process before it was killed between saving ``best.ckpt`` and the rest):
        ``last.ckpt`` holds the final step, and the export holds ``best.ckpt``'s weights."""
        if isinstance(trainer.strategy, FSDPStrategy) or not self.dirpath or trainer.global_step == 0:
            return
        last = Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"
        if self.save_last and _step_of(last) != trainer.global_step:
            trainer.save_checkpoint(last, self.save_weights_only)  # every rank calls it; rank 0 writes
        best = self.best_model_path
        if not (self.export_best and best and trainer.is_global_zero and Path(best).is_file()):
            return
        folder, step = Path(best).with_suffix(""), _step_of(Path(best))
        if step is not None and exported_step(folder) != step:
            loaded = load_checkpoint(best)
            export_safetensors(loaded.model, loaded.config, folder, loaded.tokenizer, loaded.objective,
                               loaded.inputs, loaded.transforms, global_step=step)
            rank_zero_info(f"exported {best} (step {step}) to {folder}: the export of that checkpoint had not finished")


def _same_path(a: str | Path, b: str | Path) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def _step_of(path: Path) -> int | None:
    """The training step a checkpoint file holds; None if it is missing or unreadable."""
    try:
        return int(read_checkpoint(path, mmap=True).get("global_step", 0))
    except CheckpointError:
        return None


class ParameterSummary(ModelSummary):
    """Lightning's model summary (layers, parameters, size) without a column of zero FLOPs.

    Lightning counts FLOPs only while it runs the objective's ``example_input_array`` through the
    model, which lmexp objectives do not set (the batch shape comes from the data); every run
    printed "FLOPs 0" per layer and "Total Flops 0". The column and total appear when counted.
    """

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int = 0,
        **summarize_kwargs: Any,
    ) -> None:
        rank_zero_info("\n" + format_summary(summary_data, total_parameters, trainable_parameters, model_size,
                                              total_training_modes, total_flops))


def format_summary(
    summary_data: list[tuple[str, list[str]]],
    total_parameters: int,
    trainable_parameters: int,
    model_size: float,
    total_training_modes: dict[str, int],
    total_flops: int = 0,
) -> str:
    """The summary table and its totals as text (FLOPs only where they were counted)."""
    columns = [(name, [str(value) for value in values]) for name, values in summary_data
               if total_flops or name != "FLOPs"]
    widths = [max([len(name), *(len(value) for value in values)]) for name, values in columns]
    rows = [[name for name, _ in columns], *zip(*(values for _, values in columns))]
    lines = [" | ".join(f"{cell:<{width}}" for cell, width in zip(row, widths)) for row in rows]
    rule = "-" * (sum(widths) + 3 * len(widths))
    totals = [
        (get_human_readable_count(trainable_parameters), "Trainable params"),
        (get_human_readable_count(total_parameters - trainable_parameters), "Non-trainable params"),
        (get_human_readable_count(total_parameters), "Total params"),
        (get_formatted_model_size(model_size), "Total estimated model params size (MB)"),
        (str(total_training_modes.get("train", 0)), "Modules in train mode"),
        (str(total_training_modes.get("eval", 0)), "Modules in eval mode"),
    ] + ([(get_human_readable_count(total_flops), "Total FLOPs")] if total_flops else [])
    return "\n".join([lines[0], rule, *lines[1:], rule, *(f"{value:<10}{what}" for value, what in totals)])


class CheckpointOnException(pl.Callback):
    """Save ``<dirpath>/interrupted.ckpt`` when training stops on an error, Ctrl-C or SIGTERM.

    Lightning's ``OnExceptionCheckpoint`` does the same but also turns every later ``fit``
    without ``ckpt_path`` into a silent resume; here resuming stays explicit
    (``--ckpt_path last`` picks this file when it is the newest). A run that then trains to its
    end has used it up, so it is removed.
    """

    def __init__(self, dirpath: str, filename: str = "interrupted") -> None:
        self.path = Path(dirpath) / f"{filename}.ckpt"

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if trainer.state.fn == "fit" and trainer.global_step > 0:
            try:
                trainer.save_checkpoint(self.path, weights_only=False)  # everything needed to resume
            except (OSError, LmexpError) as error:  # a full disk, NaN weights: never hide what stopped training
                rank_zero_warn(f"could not save {self.path} ({error}): resume with --ckpt_path last from the "
                               "newest checkpoint saved before")
                return
            reason = "SIGTERM" if isinstance(exception, SIGTERMException) else type(exception).__name__
            advice = ("the weights before the divergence; resuming at the same learning rate diverges again: "
                      "lower it" if isinstance(exception, ArithmeticError) else "resume with --ckpt_path last")
            rank_zero_info(f"training stopped by {reason} at step {trainer.global_step}; checkpoint saved to "
                           f"{self.path}: {advice}")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Reached only when fit ends without an exception.
        if trainer.is_global_zero and self.path.is_file():
            self.path.unlink()


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, made safe on every filesystem: the checkpoint goes to a
    temporary file in its own folder, is fsynced and renamed into place (lmexp.atomic), so the
    previous file survives a kill or a full disk. Lightning's own writer stages the file in $TMPDIR
    and moves it, which is a copy onto the target when the run folder is on another filesystem.
    Strategies call it on global rank 0 only."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options: save without them")
        # Streamed into the temporary file: a checkpoint is never held twice in memory.
        with atomic_write(path, "wb", fault="checkpoint.write", needed_bytes=_tensor_bytes(checkpoint)) as handle:
            torch.save(checkpoint, handle)


def _tensor_bytes(value: Any) -> int:
    """About what ``torch.save`` writes for ``value``: its tensors' bytes (the rest is small)."""
    if isinstance(value, torch.Tensor):
        return value.nelement() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


class StopTogether(pl.Callback):
    """SIGTERM under DDP: every rank stops after the same batch, and the stop checkpoint is saved.

    Lightning 2.6's SIGTERM handler calls a collective broadcast from inside the signal handler,
    wherever the rank happens to be (in the middle of backward's all-reduce, say), and each rank
    then raises at its own step: the ranks can deadlock (Lightning issue #20806; here about one
    stop in four hung). With several processes this handler only notes the signal and passes it
    on to the other local ranks, as Lightning's does; after each training batch the ranks agree,
    with one all-reduce of a flag, whether any of them got it, and all raise ``SIGTERMException``
    together. A single process keeps Lightning's handler.
    """

    def __init__(self) -> None:
        self._received = False
        self._installed = False
        self._launcher: Any = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning installs its handler right before training starts: replace it here.
        environment = getattr(trainer.strategy, "cluster_environment", None)
        requeues = getattr(environment, "auto_requeue", False)  # SLURM requeue keeps Lightning's handling
        if trainer.world_size < 2 or requeues or threading.current_thread() is not threading.main_thread():
            return
        self._received = False
        self._launcher = trainer.strategy.launcher  # Lightning's own launcher; None under torchrun or SLURM
        signal.signal(signal.SIGTERM, self._note)
        self._installed = True

    def _note(self, signum: int, frame: Any) -> None:
        if not self._received and self._launcher is not None:
            self._launcher.kill(signum)  # the other local ranks, as Lightning's handler does
        self._received = True

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if not self._installed:
            return
        flag = torch.tensor([1.0 if self._received else 0.0], device=pl_module.device)
        if trainer.strategy.reduce(flag, reduce_op="max").item() > 0:
            raise SIGTERMException

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._installed = False  # Lightning restores the handlers it found


class SampleText(pl.Callback):
    """Print a generated sample every N steps and at the end, and append it to
    ``samples.txt`` in the run's log folder (the CSV logger has no text channel)."""

    def __init__(
        self,
        every_n_steps: int = 500,
        prompt: str = "\n",
        max_new_tokens: int = 200,
        temperature: float = 0.8,
        top_k: int | None = None,
        seed: int = 0,
    ) -> None:
        self.every_n_steps = every_n_steps
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_k = top_k
        self.seed = seed
        self._last_sampled_step = -1
        self._samples_file: Path | None = None
        self._warned_unknown = False

    def sample(self, trainer: pl.Trainer) -> str | None:
        module = trainer.lightning_module
        tokenizer = getattr(trainer.datamodule, "tokenizer", None)
        if getattr(module, "task", None) != "causal_lm" or tokenizer is None:
            return None
        ids, unknown = encode_prompt(tokenizer, self.prompt)
        if unknown and not self._warned_unknown:
            self._warned_unknown = True
            rank_zero_warn(f"sample prompt {self.prompt!r}: {describe_unknown(unknown)}")
        ids = ids or [0]
        prompt = torch.tensor([ids[-module.block_size :]], device=module.device)
        generator = torch.Generator(device=module.device).manual_seed(self.seed)
        out = generate(module.model, prompt, self.max_new_tokens, self.temperature, self.top_k, generator=generator)
        return tokenizer.decode(out[0].tolist())

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # trainer.log_dir is a collective (a broadcast from rank 0) under DDP: read it here, where
        # every rank calls it, never from code that runs on rank 0 alone (it would hang there).
        log_dir = trainer.log_dir
        self._samples_file = Path(log_dir) / "samples.txt" if log_dir is not None else None

    def _emit(self, trainer: pl.Trainer, title: str) -> None:
        # Generating on rank 0 alone needs the whole model there, which FSDP does not keep.
        if not trainer.is_global_zero or isinstance(trainer.strategy, FSDPStrategy):
            return
        text = self.sample(trainer)
        if text is None:
            return
        rank_zero_info(f"\n--- {title} ---\n{text}\n---")
        if self._samples_file is not None:
            self._samples_file.parent.mkdir(parents=True, exist_ok=True)
            with open(self._samples_file, "a", encoding="utf-8") as f:
                f.write(f"--- {title} ---\n{text}\n\n")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_sampled_step = trainer.global_step  # a resumed run already sampled this step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        # With gradient accumulation several batches end on the same step: sample once.
        if self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0 and step != self._last_sampled_step:
            self._last_sampled_step = step
            self._emit(trainer, f"sample at step {step}")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step != self._last_sampled_step:  # the last periodic sample may be this step's
            self._emit(trainer, f"sample after {trainer.global_step} steps")


class StepProgressBar(SelectiveRichProgressBar):
    """Rich progress bar titled by optimizer steps, whose metrics never stall the device.

    Language models train for ``max_steps``, not epochs; Lightning then has no epoch limit and
    the stock title reads ``Epoch 0/-2``. The stock bar also re-reads the logged metrics after
    every batch, turning each logged GPU tensor into a Python number: a device sync per step
    that stops the host from queueing work ahead (it halved the speed of a small GPT on a
    GPU). This bar re-reads them only on the steps where new values were logged.
    """

    def refreshes_metrics(self, trainer: pl.Trainer) -> bool:
        return logs_this_step(trainer)

    def train_description(self, current_epoch: int) -> str | None:
        trainer = self.trainer
        if trainer.max_steps is None or trainer.max_steps < 0:
            return None  # Lightning's epoch title
        # The title is set at epoch start only (the bar counts batches), so show the budget.
        description = f"Epoch {current_epoch} (max {trainer.max_steps} steps)"
        return f"{description:{len(self.validation_description)}}"

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        return display_metrics(super().get_metrics(trainer, pl_module))


# Short names in progress displays, so the line fits in 80 columns; the loggers keep the full ones.
_DISPLAY_NAMES = {"train/loss": "loss", "train/tokens_per_sec": "tok/s", "val/loss": "val_loss", "val/bpb": "val_bpb"}


def display_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """The progress-bar metrics worth a glance, short-named: loss, tokens/s, val loss and bpb
    (perplexity is exp(loss); the version number of the log folder is not a metric)."""
    shown: dict[str, Any] = {}
    for name, short in _DISPLAY_NAMES.items():
        if name in metrics:
            value = metrics[name]
            value = value.item() if isinstance(value, torch.Tensor) else value
            shown[short] = round(value) if name == "train/tokens_per_sec" else value
    return shown


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class PlainProgress(ProgressBar):
    """Progress as plain lines, one per logging interval, for output that is not a terminal.

    Under a pipe, ``nohup``, CI or a cluster scheduler's log file a Rich bar draws nothing until
    the end, so a long run looks dead. This prints step, loss, tokens/s, elapsed time and an ETA
    every ``log_every_n_steps`` steps, and the validation metrics after each validation.
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__()
        self._stream = stream
        self._enabled = True
        self._started = 0.0
        self._first_step = 0
        self._last_printed = -1

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _print(self, line: str) -> None:
        if self._enabled:  # ProgressBar.setup disables it on every rank but 0
            print(line, file=self._stream or sys.stdout, flush=True)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._started = time.perf_counter()
        self._first_step = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if not logs_this_step(trainer) or step == self._last_printed or step == 0:
            return
        self._last_printed = step
        total = trainer.max_steps if trainer.max_steps > 0 else trainer.estimated_stepping_batches
        elapsed = time.perf_counter() - self._started
        parts = [f"step {step}/{total}" if math.isfinite(total) else f"step {step}"]
        metrics = display_metrics(self.get_metrics(trainer, pl_module))
        parts += [f"{name} {value:,}" if name == "tok/s" else f"{name} {value:.4f}" for name, value in metrics.items()
                  if not name.startswith("val")]
        parts.append(f"elapsed {_clock(elapsed)}")
        done = step - self._first_step
        if done > 0 and math.isfinite(total) and total > step:
            parts.append(f"eta {_clock(elapsed / done * (total - step))}")
        self._print(" | ".join(parts))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        values = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        shown = ", ".join(f"{k} {float(v):.4f}" for k, v in sorted(values.items()))
        self._print(f"validation at step {trainer.global_step}: {shown}")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._print(f"training ended at step {trainer.global_step} after {_clock(time.perf_counter() - self._started)}")
