"""Build a run (trainer, objective, data) exactly as ``lmexp fit|validate|test`` would.

``build`` is the one way runs are made: the command line, sweeps, benchmarks and tests all
come through it, so each gets the same config validation, one-line errors, run folder,
tracking and callbacks::

    from lmexp.runs import build

    run = build("fit", configs=["configs/quickstart.yaml"], overrides={"model.init_args.lr": 3e-3})
    run.execute()
    print(run.run_dir, run.trainer.callback_metrics["val/loss"])

``configure`` and ``check`` validate the same settings and make the objective and data without a
run (no trainer, nothing written). Every run gets its own folder (``lmexp.run_folders``) and
records itself there and in MLflow (``lmexp.recording``). A ``fit`` with ``--data.num_folds K``
builds a ``CrossValidation``, K fits executed as one run.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import Logger

from lmexp.arguments import summarize_parse_error
from lmexp.checkpoints import CHECKPOINT_KEY, read_checkpoint
from lmexp.crossval import CrossValidation, tracking_uri_of
from lmexp.data.tokenizer import tokenizer_from_json
from lmexp.deprecation import moved_names
from lmexp.errors import ConfigError, find_user_error
from lmexp.tracking import MLflowTracker, tracker_of

if TYPE_CHECKING:
    from lmexp.lightning_cli import LmexpCLI

__all__ = ["VERBS", "Configured", "CrossValidation", "Run", "build", "check", "command_line_run", "configure"]

VERBS = ("fit", "validate", "test")

MOVED = {
    "RUN_DIR_VARIABLE": "lmexp.run_folders",
    "RUN_MARK": "lmexp.run_folders",
    "continued_run_dir": "lmexp.run_folders",
    "default_experiment": "lmexp.run_folders",
    "latest_checkpoints_folder": "lmexp.run_folders",
    "mark_run": "lmexp.run_folders",
    "new_run_dir": "lmexp.run_folders",
    "point_latest": "lmexp.run_folders",
    "read_run_mark": "lmexp.run_folders",
    "resolve_named_checkpoint": "lmexp.run_folders",
    "resume_checkpoint": "lmexp.run_folders",
    "run_folders": "lmexp.run_folders",
    "SETTLE_SECONDS": "lmexp.recording",
    "TRACKING_KEY": "lmexp.recording",
    "RunRecorder": "lmexp.recording",
    "git_state": "lmexp.recording",
    "system_info": "lmexp.recording",
}
__getattr__ = moved_names(__name__, MOVED)


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
        or run before it in the same process. A fit's schedule is checked against the trainer's
        step limit before the data is prepared.
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
            if self.verb == "fit" and hasattr(self.model, "check_training_length"):
                # Settings that need no data fail now, not after the data is prepared (long, for a large corpus).
                self.model.check_training_length(self.trainer.max_steps, self.trainer.max_epochs)
            return method(self.model, datamodule=self.datamodule, ckpt_path=self.ckpt_path,
                          weights_only=self.weights_only)
        except BaseException:
            # Stopped before it wrote anything (bad data, say): no empty run folder stays behind.
            if self.new_folder and self.run_dir.is_dir() and not any(self.run_dir.iterdir()):
                self.run_dir.rmdir()
            raise



@dataclass
class Configured:
    """A run's settings, checked, with the objective and data made but no run: what ``configure`` returns.

    ``config`` is the plain config ``check`` returns (what ``config.yaml`` would hold), ``model``
    and ``data`` the objective and data module (data None when the config has none; weights and
    data come when they are set up), ``trainer`` the trainer's settings (no ``Trainer`` is made).
    """

    config: dict[str, Any]
    model: pl.LightningModule
    data: pl.LightningDataModule | None
    trainer: dict[str, Any]


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
) -> Run | CrossValidation:
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

    Returns:
        The ``Run``; for a fit with ``data.num_folds`` above 1, the ``CrossValidation`` of its folds.

    Raises:
        ConfigError, DataError, CheckpointError: bad input, with a one-line message.
    """
    named = [f"--{flag}={value}" for flag, value in
             (("experiment", experiment), ("run_name", run_name), ("ckpt_path", ckpt_path)) if value is not None]
    cli = _parse(verb, configs, overrides, [*named, *args], callbacks=list(callbacks), logger=logger)
    return _assemble(cli)


def command_line_run(argv: list[str] | None = None, description: str | None = None) -> Run | CrossValidation:
    """The run ``lmexp VERB ...`` makes from its command line (``argv`` None: ``sys.argv``).

    A bad flag or value prints one line and exits 2, as the command line does; ``description``
    is the text of ``lmexp --help``.
    """
    from lmexp.lightning_cli import LmexpCLI

    return _assemble(LmexpCLI(args=argv, **({} if description is None else {"description": description})))


def configure(
    verb: str = "fit",
    configs: Sequence[str | Path] = (),
    overrides: Mapping[str, Any] | None = None,
    args: Sequence[str] = (),
) -> Configured:
    """Validate a run's settings as ``build`` would and make its objective and data, without the run.

    Every key and value is checked against the schema and the model, data and callbacks are
    constructed (cheap: weights and data come when a run starts). No trainer is made and nothing
    is written: a sweep checks its search space with it, ``lmexp probe`` times the objective.

    Raises:
        ConfigError: a bad key or value, with the one line the command line would print.
    """
    seed_log = logging.getLogger("lightning.fabric.utilities.seed")  # "Seed set to": no run is started
    level = seed_log.level
    seed_log.setLevel(logging.WARNING)
    try:
        cli = _parse(verb, configs, overrides, args, check_only=True)
    except ConfigError:
        raise
    except Exception as err:  # a class's own check, wrapped by jsonargparse
        user_error = find_user_error(err)
        if user_error is None:
            raise
        raise ConfigError(str(user_error)) from None
    finally:
        seed_log.setLevel(level)
    made = cli.config_init[verb]
    trainer = made.get("trainer") or {}
    return Configured(config=cli.config_dict, model=made["model"], data=made.get("data"),
                      trainer=dict(trainer if isinstance(trainer, Mapping) else vars(trainer)))


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
    return configure(verb, configs, overrides, args).config


def _command_line(verb: str, configs: Sequence[str | Path], overrides: Mapping[str, Any] | None) -> list[str]:
    if verb not in VERBS:
        raise ConfigError(f"verb {verb!r} is not one of {', '.join(VERBS)}")
    argv = [verb] + [f"--config={path}" for path in configs]
    return argv + [f"--{key}={_flag_value(value)}" for key, value in (overrides or {}).items()]


def _parse(verb: str, configs: Sequence[str | Path], overrides: Mapping[str, Any] | None, args: Sequence[str],
           **kwargs: Any) -> LmexpCLI:
    from jsonargparse import ArgumentError

    from lmexp.lightning_cli import LmexpCLI

    argv = _command_line(verb, configs, overrides) + list(args)
    try:
        with warnings.catch_warnings():
            # Building from Python inside another program (a sweep, a benchmark) is what `args` is for.
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
            return LmexpCLI(argv, exit_on_error=False, **kwargs)
    except ArgumentError as err:  # a bad key or value: the one line the command line would print
        raise ConfigError(f"{summarize_parse_error(str(err))} (see lmexp {verb} --help)") from None


def _assemble(cli: LmexpCLI) -> Run | CrossValidation:
    """The run from the parts the CLI made: one ``Run``, or a fit's K folds as a ``CrossValidation``."""
    verb = cli.verb
    config = cli.config[verb]
    if cli.folds > 1:
        logger = cli.logger_override
        if logger is None:
            logger = cli.config_dict.get("trainer", {}).get("logger")
        return CrossValidation(
            cli.raw_args[1:] if cli.raw_args[:1] == [verb] else cli.raw_args, cli.folds, cli.experiment, cli.root,
            config.run_name, config.checkpoint.monitor, config.checkpoint.mode, tracking_uri_of(logger), build=build,
        )
    return Run(
        verb=verb, trainer=cli.trainer, model=cli.model, datamodule=cli.datamodule, run_dir=cli.run_dir,
        experiment=cli.experiment, ckpt_path=config.ckpt_path, config=cli.config_dict,
        new_folder=not cli.continues_run, weights_only=config.get("weights_only"),
    )


def _flag_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)
