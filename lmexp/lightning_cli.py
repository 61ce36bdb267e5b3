"""LightningCLI with lmexp's defaults, behind ``lmexp fit|validate|test`` and ``lmexp.runs.build``.

It parses, validates and makes a run's parts (trainer, objective, data, run folder); ``lmexp.runs``
puts them together into the run and leaves executing it to its caller.
"""

from __future__ import annotations

import importlib
import logging
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import LearningRateMonitor, ModelSummary, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import Logger
from lightning.pytorch.plugins.io import CheckpointIO

from lmexp.arguments import OneLineErrors
from lmexp.callbacks import (
    AtomicCheckpointIO,
    CheckpointOnException,
    LmexpCheckpoint,
    ParameterSummary,
    PlainProgress,
    StepProgressBar,
    StopTogether,
)
from lmexp.checkpoints import local_checkpoint, read_checkpoint
from lmexp.errors import CheckpointError, ConfigError
from lmexp.guards import FiniteLossGuard
from lmexp.lightning_internals import CheckpointMergeMixin, leave_verb_to_caller, subcommand_parser
from lmexp.mlflow_models import is_model_uri, model_checkpoint
from lmexp.mlflow_store import check_experiment_name
from lmexp.objectives import TrainingObjective
from lmexp.objectives.base import NETWORK_SETTINGS, SCHEDULE_SETTINGS, check_stated_network
from lmexp.precision import AUTO, PRECISION_HELP, PRECISION_TYPE, PrecisionChoice, resolve_auto_precision
from lmexp.recording import TRACKING_KEY, RunRecorder
from lmexp.run_folders import (
    continued_run_dir,
    default_experiment,
    new_run_dir,
    resolve_named_checkpoint,
    saved_run_config,
)
from lmexp.tracking import MLflowTracker

EVALUATIONS = ("validate", "test")  # verbs that score a checkpoint, reading its run's settings
NAMED_CHECKPOINTS = ("last", "best", "hpc")  # --ckpt_path values that name a file rather than give one
# What ``lmexp --help`` and every trainer verb's --help say: all the verbs, not just the trainer's.
DESCRIPTION = (
    "Train and use language models. Verbs: fit, validate, test (each with --help); "
    "generate: sample text from a checkpoint (lmexp generate --help); "
    "predict: label a table of texts with a fine-tuned classifier (lmexp predict --help); "
    "prompt: classify by prompting a GPT, zero- or few-shot (lmexp prompt --help); "
    "export: write a checkpoint as a Hugging Face transformers folder (lmexp export --help); "
    "data: build a config's token cache ahead of training, on one machine or as --shard k/N parts of several "
    "(lmexp data prepare --help); "
    "probe: time a run's training steps in 32-true and bf16-mixed and print what --trainer.precision auto "
    "would choose (lmexp probe --help); "
    "runs: list tracked runs (lmexp runs --help); "
    "chaos: inject kills, full disks and NaNs into short runs of a config and check nothing is lost (lmexp chaos --help)."
)


class LmexpArgumentParser(OneLineErrors, LightningArgumentParser):
    """Lightning's parser, reporting a bad flag or value in one line; ``trainer.precision`` also
    takes ``auto`` (resolved by measurement before the trainer is made: lmexp.precision)."""

    def add_class_arguments(self, class_type: Any, nested_key: str | None = None, *args: Any, **kwargs: Any) -> list[str]:
        trainer = nested_key == "trainer" and isinstance(class_type, type) and issubclass(class_type, pl.Trainer)
        if not trainer:
            return super().add_class_arguments(class_type, nested_key, *args, **kwargs)
        kwargs["skip"] = {*(kwargs.get("skip") or ()), "precision"}
        added = super().add_class_arguments(class_type, nested_key, *args, **kwargs)
        self.groups[nested_key].add_argument("--trainer.precision", type=PRECISION_TYPE, default=None,
                                             help=PRECISION_HELP)
        return [*added, "trainer.precision"]


def _not_an_advertisement(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("💡 Tip:")


class LmexpCLI(CheckpointMergeMixin, LightningCLI):
    """LightningCLI with lmexp's defaults: a run folder per run, MLflow tracking, best/last
    checkpoints with an export, a checkpoint on crash or interrupt, a progress display,
    learning-rate logging, and our own data sampler (it shards batches across ranks itself).

    It makes the run's parts and stops without running ``verb``: ``lmexp.runs`` assembles them
    (``folds`` > 1: a cross-validation) for its caller to execute. ``description`` is the text of
    ``--help``.
    """

    def __init__(
        self,
        args: list[str] | None = None,
        callbacks: list[pl.Callback] | None = None,
        logger: Logger | bool | None = None,
        exit_on_error: bool = True,
        check_only: bool = False,
        description: str = DESCRIPTION,
    ) -> None:
        # TokenBatches shards batches across workers itself, so its __len__ is exact.
        warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
        # The data module restores the data position itself (its state is in the checkpoint).
        warnings.filterwarnings("ignore", message=r"You're resuming from a checkpoint that ended before the epoch ended")
        logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_not_an_advertisement)
        self.logger_override = logger
        self.check_only = check_only  # parse and validate every class's arguments; make no run
        self.raw_args = list(args) if args is not None else sys.argv[1:]
        self.folds = 1  # > 1: a fit is K-fold cross-validation, one run per fold
        self.verb: str | None = None  # the parsed verb, which is left to the caller to run
        self.new_run_dir: Path | None = None
        self.continues_run = False
        self.precision_choice: PrecisionChoice | None = None  # what trainer.precision=auto chose
        self.args_given: Any = args  # as parsed: re-read for what the command itself states
        self.saved_hparams: dict[str, Any] = {}  # the hyperparameters of the checkpoint given with --ckpt_path
        try:
            self._build(args, callbacks, exit_on_error, description)
        except BaseException:
            # A run that could not be built leaves no empty folder behind.
            if self.new_run_dir is not None and self.new_run_dir.is_dir() and not any(self.new_run_dir.iterdir()):
                self.new_run_dir.rmdir()
            raise

    def _build(self, args: list[str] | None, callbacks: list[pl.Callback] | None, exit_on_error: bool,
               description: str) -> None:
        super().__init__(
            model_class=TrainingObjective,
            datamodule_class=pl.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            # enable_autolog_hparams off: RunRecorder logs the whole resolved config (model, data and
            # trainer) to every logger; Lightning's copy of the module's would repeat it under short names.
            trainer_defaults={"use_distributed_sampler": False, "enable_autolog_hparams": False,
                              "callbacks": list(callbacks or [])},
            save_config_callback=None,  # RunRecorder writes config.yaml into the run folder
            parser_class=LmexpArgumentParser,
            # jsonargparse's subcommand parsers defer errors to the main parser unless told otherwise.
            parser_kwargs={"prog": "lmexp", "description": description,
                           **({} if exit_on_error else {"exit_on_error": False})},
            args=args,
        )

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # predict has nothing to write for a language model yet: not offered until it does.
        return {verb: skip for verb, skip in LightningCLI.subcommands().items() if verb != "predict"}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(LmexpCheckpoint, "checkpoint")
        parser.add_lightning_class_args(FiniteLossGuard, "guard")  # on in every fit: --guard.mode stop|skip
        parser.add_argument("--experiment", type=str | None, default=None,
                            help="MLflow experiment and run-folder group (default: the first config file's name)")
        parser.add_argument("--run_name", type=str | None, default=None,
                            help="Name of the run and its folder (default: the start time, e.g. 20261203-101500)")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse the command line; ``validate``/``test`` of a checkpoint in a run folder start from
        that run's saved settings.

        An evaluation scores the data the run was trained with: the ``data`` section of the run's
        saved ``config.yaml`` (``<run>/config.yaml`` beside ``checkpoints/``), fit overrides
        included, so none needs repeating; without ``--config``, its ``model`` section too.
        Precedence, later wins: defaults, ``--config`` files, the run's saved settings, then the
        command's own flags (``--data.test other.tsv``). The saved settings come after the config
        files because they are those files as the run used them, with its overrides.
        """
        self.args_given = args
        words = self.raw_args if args is None or isinstance(args, (list, tuple)) else None
        verb, stated = stated_checkpoint(words or [])
        if verb in EVALUATIONS and is_model_uri(stated):  # a registered model: the settings of the run it came from
            source = model_checkpoint(stated)
            self.args_given = with_run_settings(words or [], verb, saved_run_config(source) if source else None)
            self._parse_given(parser)
        elif verb in EVALUATIONS and stated is not None and Path(stated).is_file():
            self.args_given = with_run_settings(words or [], verb, saved_run_config(stated))
            self._parse_given(parser)
        else:  # no checkpoint file named: --ckpt_path best/last is found from the parsed settings
            super().parse_arguments(parser, args)
            verb = self.config.get("subcommand")
            if verb in EVALUATIONS and words is not None:
                checkpoint = self._checkpoint_file(verb)
                saved = saved_run_config(checkpoint) if checkpoint is not None else None
                if saved:
                    self.args_given = with_run_settings(words, verb, saved)
                    self._parse_given(parser)
        verb = self.config.get("subcommand")
        if verb is None:
            return
        config = self.config[verb]
        named = config.experiment if config.experiment is not None else default_experiment(config.get("config"))
        self.experiment = check_experiment_name(named)
        config.experiment = self.experiment  # so a run's saved config.yaml reproduces it as it ran
        self.root = Path(config.trainer.default_root_dir or Path("runs") / self.experiment).expanduser()
        self.requested_ckpt = config.ckpt_path
        if is_model_uri(config.ckpt_path):
            # A registered model is an export: weights, no trainer state. An evaluation builds the
            # objective from it (as --model.pretrained does); a fit cannot resume from it.
            if verb == "fit":
                raise ConfigError(f"--ckpt_path {config.ckpt_path} is a registered model (weights, no optimizer or "
                                  f"trainer state): fit cannot resume from it; start from its weights with "
                                  f"--model.pretrained {config.ckpt_path}")
            local_checkpoint(config.ckpt_path)  # downloaded now: a bad URI is a one-line error before any run
            config.model.init_args.pretrained = config.ckpt_path
            config.ckpt_path = None
        # The file --ckpt_path last/best names, found here: LightningCLI reads the checkpoint's
        # hyperparameters right after parsing, from real files only.
        config.ckpt_path = resolve_named_checkpoint(
            config.ckpt_path, self.root, config.run_name, verb, config.checkpoint.filename
        )
        # It reads them with a bare torch.load: check the file first, so a bad one is a one-line error.
        if config.ckpt_path is not None and config.ckpt_path not in NAMED_CHECKPOINTS and not str(
            config.ckpt_path
        ).startswith("registry"):
            checkpoint = read_checkpoint(config.ckpt_path, mmap=True)
            self.source_run = checkpoint.get(TRACKING_KEY) or {}
            self.saved_hparams = dict(checkpoint.get("hyper_parameters") or {})
        else:
            self.source_run, self.saved_hparams = {}, {}
        data_args = (config.get("data") or {}).get("init_args") or {}
        if verb == "fit" and data_args.get("fold") is None and (data_args.get("num_folds") or 1) > 1:
            self.folds = int(data_args.get("num_folds"))
        # The config as given (experiment resolved), before the run's folders are filled in:
        # fed back with --config, it starts a new run of the same experiment.
        self.config_yaml = subcommand_parser(self, verb).dump(config, skip_none=False)
        self.config_dict = yaml_to_dict(self.config_yaml)

    def _parse_given(self, parser: LightningArgumentParser) -> None:
        """Parse the command line with the run's settings added (``args_given``)."""
        with warnings.catch_warnings():
            # The words are the command line's own, with the run's settings added: not a program
            # passing arguments beside a command line, which Lightning warns of.
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
            super().parse_arguments(parser, self.args_given)

    def _checkpoint_file(self, verb: str) -> str | None:
        """The checkpoint file the parsed command evaluates (``--ckpt_path best`` found), or None."""
        config = self.config[verb]
        named = config.experiment if config.experiment is not None else default_experiment(config.get("config"))
        root = Path(config.trainer.default_root_dir or Path("runs") / named).expanduser()
        path = resolve_named_checkpoint(config.ckpt_path, root, config.run_name, verb, config.checkpoint.filename)
        return str(path) if path is not None and Path(path).is_file() else None

    def merge_checkpoint_hparams(self) -> None:
        """The model an evaluation of a checkpoint builds: the checkpoint's objective and network,
        with the command's other settings.

        Lightning would put every saved hyperparameter over the command's, so an evaluation
        setting (``--model.continuation_passages 4``) would be dropped without a word. The
        network (``NETWORK_SETTINGS``) is what the weights fix: it stays the checkpoint's, and a
        network setting the command states must agree with it, as must the objective. Every other
        setting is the command's, as for any run and as its ``config.yaml`` records: evaluation
        options apply, training options go unused. A fit keeps Lightning's way (resuming restores
        the optimizer state the saved settings describe), except for the schedule's shape and
        length (``SCHEDULE_SETTINGS``): the scheduler's state is only its step, so a schedule the
        command states is the one the resumed run follows (as the warning on a changed
        trainer.max_steps advises).
        """
        verb = self.config.get("subcommand")
        if verb == "fit":
            stated = self._stated_model_arguments(verb) if self.config[verb].get("ckpt_path") else {}
            self.lightning_checkpoint_merge()
            schedule = {name: stated[name] for name in SCHEDULE_SETTINGS if name in stated}
            for given, other in (("warmup_steps", "warmup_fraction"), ("warmup_fraction", "warmup_steps")):
                if schedule.get(given) is not None and other not in schedule:
                    schedule[other] = None  # the two are exclusive: the stated one replaces the saved other
            if schedule:
                model = {"class_path": self.config[verb].model.class_path, "dict_kwargs": schedule}
                self.config = self.parser.parse_object({verb: {"model": model}}, self.config)
                for name, value in schedule.items():  # a None (the other warmup setting) is not merged
                    self.config[verb].model.init_args[name] = value
            return
        if verb is None or not self.saved_hparams:
            return
        path = str(self.config[verb].ckpt_path)
        saved = {name: value for name, value in self.saved_hparams.items() if name != "_instantiator"}
        model = self.config[verb].model
        class_path = saved.pop("_class_path", None) or model.class_path
        try:
            objective = _import_class(class_path)
        except (ImportError, AttributeError) as err:
            raise CheckpointError(
                f"the checkpoint {path!r} holds a {class_path}, which cannot be imported ({err}): install what "
                "provides it, or evaluate its export with --model.pretrained"
            ) from None
        if not issubclass(objective, _import_class(model.class_path)):
            raise ConfigError(
                f"model {model.class_path} cannot evaluate the checkpoint {path!r}, which holds a {class_path}: "
                f"use --model {class_path}, or the config that checkpoint was trained with"
            )
        if "network" in saved:
            check_stated_network(self._stated_model_arguments(verb), saved["network"], path)
        # A checkpoint of a subclass (a distilled CausalLM under a CausalLM config): the settings
        # only the subclass has are the checkpoint's.
        given = vars(model.init_args)
        kept = {name: value for name, value in saved.items()
                if name in NETWORK_SETTINGS or (class_path != model.class_path and name not in given)}
        self.config = self.parser.parse_object({verb: {"model": {"class_path": class_path, "dict_kwargs": kept}}},
                                               self.config)

    def _stated_model_arguments(self, verb: str) -> dict[str, Any]:
        """The model arguments the command states (config files and flags), without the defaults."""
        from jsonargparse import Namespace

        args = self.args_given
        parse = self.parser.parse_object if isinstance(args, (dict, Namespace)) else self.parser.parse_args
        model = parse(args, defaults=False)[verb].get("model")
        init_args = model.get("init_args") if isinstance(model, Namespace) else None
        return init_args.as_dict() if isinstance(init_args, Namespace) else {}

    def before_instantiate_classes(self) -> None:
        if self.check_only or self.folds > 1:
            return
        verb = self.subcommand
        config = self.config[verb]
        continued = continued_run_dir(config.ckpt_path, self.requested_ckpt, self.root, config.run_name) \
            if verb == "fit" else None
        if continued is None:
            self.new_run_dir = new_run_dir(self.root, config.run_name, verb)
        self.continues_run = continued is not None
        self.run_dir = continued or self.new_run_dir
        config.trainer.default_root_dir = str(self.run_dir)
        if config.checkpoint.dirpath is None:
            config.checkpoint.dirpath = str(self.run_dir / "checkpoints")
        if config.data.init_args.get("val_fraction") == 0 and config.checkpoint.monitor == "val/loss":
            # No validation split: the best checkpoint (and its export) is the latest one,
            # saved when training (or its epoch) ends rather than after a validation.
            config.checkpoint.monitor = None
            config.checkpoint.save_on_train_epoch_end = True

    def instantiate_classes(self) -> None:
        if self.check_only or self.folds > 1:
            # Model, data and callbacks are made (their __init__ checks what the schema cannot, such
            # as network_overrides' field names); no trainer, run folder or tracking.
            self.config_init = self.parser.instantiate_classes(self.config)
            return
        super().instantiate_classes()

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        config = self._instantiated("trainer", {})
        if config.get("precision") == AUTO:  # Lightning takes no "auto": measure and decide here
            self.precision_choice = resolve_auto_precision(self.model, self.datamodule, config,
                                                           self.config_dict.get("seed_everything"))
            kwargs["precision"] = self.precision_choice.precision
        logger = config.get("logger") if self.logger_override is None else self.logger_override
        if logger in (True, None):
            logger = MLflowTracker()
        for tracker in logger if isinstance(logger, list) else [logger]:
            if isinstance(tracker, MLflowTracker):
                self._bind_tracker(tracker)
        configured = list(config.get("callbacks") or []) + list(self.trainer_defaults["callbacks"])
        callbacks = list(config.get("callbacks") or [])
        checkpoint = self._instantiated("checkpoint")
        if checkpoint is not None and checkpoint.dirpath:
            # A crash or Ctrl-C between validations keeps its progress: resume with --ckpt_path last.
            callbacks.append(CheckpointOnException(checkpoint.dirpath))
        callbacks.append(StopTogether())  # SIGTERM under DDP: all ranks stop at the same batch
        if config.get("enable_progress_bar", True) is not False and not any(
            isinstance(c, ProgressBar) for c in configured
        ):
            # A Rich bar draws nothing until the end where output is not a terminal.
            callbacks.append(StepProgressBar() if sys.stdout.isatty() else PlainProgress())
        if config.get("enable_model_summary", True) is not False and not any(
            isinstance(c, ModelSummary) for c in configured
        ):
            callbacks.append(ParameterSummary())  # Lightning's, without its column of zero FLOPs
            kwargs["enable_model_summary"] = False  # Lightning's own default summary: not a second one
        if logger is not False and not any(isinstance(c, LearningRateMonitor) for c in configured):
            callbacks.append(LearningRateMonitor(logging_interval="step"))
        callbacks.append(RunRecorder(self.run_dir, self.experiment, self.config_dict, self.config_yaml,
                                     self.config[self.subcommand].ckpt_path, self.source_run.get("run_id"),
                                     self.precision_choice.params() if self.precision_choice else None))
        plugins = config.get("plugins")
        plugins = list(plugins) if isinstance(plugins, list) else [] if plugins is None else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):  # a user's own writer stands
            plugins.append(AtomicCheckpointIO())  # checkpoints renamed into place, never cut short
        return super().instantiate_trainer(logger=logger, callbacks=callbacks, plugins=plugins, **kwargs)

    def _bind_tracker(self, tracker: MLflowTracker) -> None:
        """Fill in what the run knows and the tracker was not told: experiment, run name, folder,
        and the MLflow run a resumed fit continues (when it was tracked in the same store)."""
        same_store = self.source_run.get("tracking_uri") in (None, tracker.tracking_uri)
        # Only a fit that continues a run's folder continues its MLflow run; a branch or an
        # evaluation is a run of its own that names the one it came from.
        continues = self.source_run.get("run_id") if self.continues_run and same_store else None
        tracker.use_defaults(experiment_name=self.experiment, run_name=self.run_dir.name, save_dir=str(self.run_dir),
                             run_id=continues)

    def _instantiated(self, key: str, default: Any = None) -> Any:
        """The verb's instantiated setting ``key`` (``trainer``, ``checkpoint``...)."""
        return self.config_init[self.subcommand].get(key, default)

    def after_instantiate_classes(self) -> None:
        # Built, not run: lmexp.runs assembles the run and its caller executes it.
        self.verb = self.subcommand
        leave_verb_to_caller(self)


def stated_checkpoint(words: Sequence[str]) -> tuple[str | None, str | None]:
    """The verb and the ``--ckpt_path`` value as the command line words state them."""
    verb = next((word for word in words if not word.startswith("-")), None)
    path = None
    for i, word in enumerate(words):
        if word == "--ckpt_path" and i + 1 < len(words):
            path = words[i + 1]
        elif word.startswith("--ckpt_path="):
            path = word.partition("=")[2]
    return verb, path


def with_run_settings(words: Sequence[str], verb: str, saved: dict[str, Any] | None) -> list[str]:
    """The command line with a run's saved settings after the verb's last ``--config`` file
    (right after the verb when none is given), so the flags after them still win: its ``data``
    section, and without a config file its ``model`` section, experiment and root folder too."""
    import json

    words = list(words)
    start = words.index(verb) + 1 if verb in words else 0
    at, configs = start, False
    for i in range(start, len(words)):
        if words[i] in ("--config", "-c"):
            at, configs = i + 2, True
        elif words[i].startswith("--config="):
            at, configs = i + 1, True
    saved = saved or {}
    sections = ("data",) if configs else ("model", "data")
    added = [f"--{name}={json.dumps(_set_values(saved[name]))}" for name in sections
             if isinstance(saved.get(name), dict) and saved[name].get("class_path")]
    if not configs:  # and where the run's evaluations go: beside it, with its seed
        root = (saved.get("trainer") or {}).get("default_root_dir")
        added += [f"--experiment={saved['experiment']}"] if saved.get("experiment") else []
        seed = saved.get("seed_everything")
        added += [f"--seed_everything={json.dumps(seed)}"] if seed is not None and seed is not False else []
        added += [f"--trainer.default_root_dir={root}"] if root else []
    return [*words[:at], *added, *words[at:]]


def _set_values(section: dict[str, Any]) -> dict[str, Any]:
    """A saved class section without the arguments the run left unset (None): a config file given
    with the evaluation still sets those (a test file the training run had none of)."""
    if not isinstance(section.get("init_args"), dict):
        return section
    return {**section, "init_args": {name: value for name, value in section["init_args"].items() if value is not None}}


def _import_class(path: str) -> type:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def yaml_to_dict(text: str) -> dict[str, Any]:
    import yaml

    return yaml.safe_load(text) or {}
