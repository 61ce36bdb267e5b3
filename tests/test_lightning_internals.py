"""Lightning's private API that lmexp relies on (``lmexp.lightning_internals``), checked against the
installed Lightning: a release that renames or changes one fails here, by name, not inside a run."""

from __future__ import annotations

import inspect
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.demos.boring_classes import BoringModel

from lmexp.lightning_internals import CheckpointMergeMixin, leave_verb_to_caller, logs_this_step, subcommand_parser


class WidthModel(BoringModel):
    """A model with one hyperparameter, for the checkpoint merge to set."""

    def __init__(self, width: int = 2) -> None:
        super().__init__()
        self.save_hyperparameters()


class BuildOnlyCLI(CheckpointMergeMixin, LightningCLI):
    """Records each checkpoint merge and leaves the verb unrun, as lmexp's CLI does."""

    def merge_checkpoint_hparams(self) -> None:
        self.merges = [*getattr(self, "merges", []), self.config.get("subcommand")]
        self.lightning_checkpoint_merge()

    def after_instantiate_classes(self) -> None:
        leave_verb_to_caller(self)


def one_step_fit(cli_class: type[LightningCLI], tmp_path: Path, *args: str) -> LightningCLI:
    return cli_class(
        WidthModel,
        save_config_callback=None,
        args=["fit", f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=1", "--trainer.logger=false",
              "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
              "--trainer.enable_model_summary=false", *args],
    )


def test_cli_parse_ckpt_path_merges_the_checkpoints_hyperparameters_once(tmp_path: Path):
    assert list(inspect.signature(LightningCLI._parse_ckpt_path).parameters) == ["self"]
    checkpoint = tmp_path / "saved.ckpt"
    torch.save({"hyper_parameters": {"width": 5}}, checkpoint)

    cli = one_step_fit(BuildOnlyCLI, tmp_path, f"--ckpt_path={checkpoint}")

    assert cli.merges == ["fit"]  # the override is what __init__ calls, once, after parsing
    assert cli.model.hparams.width == 5  # and Lightning's own merge, reached through it, applied the checkpoint's


def test_cli_clearing_subcommand_keeps_lightning_from_running_the_verb(tmp_path: Path):
    source = inspect.getsource(LightningCLI.__init__)
    assert source.index("self.after_instantiate_classes()") < source.index("if self.subcommand is not None:")

    built = one_step_fit(BuildOnlyCLI, tmp_path / "built")
    assert built.subcommand is None and built.trainer.global_step == 0  # made, not trained

    ran = one_step_fit(LightningCLI, tmp_path / "ran")  # the same without it: Lightning trains
    assert ran.trainer.global_step == 1


def test_cli_parser_of_a_verb_dumps_its_settings_for_config_to_read_back(tmp_path: Path):
    assert list(inspect.signature(LightningCLI._parser).parameters) == ["self", "subcommand"]
    cli = one_step_fit(BuildOnlyCLI, tmp_path, "--model.width=3")

    parser = subcommand_parser(cli, "fit")

    assert isinstance(parser, LightningArgumentParser) and parser is not cli.parser
    dumped = parser.dump(cli.config["fit"], skip_none=False)
    assert "fit:" not in dumped  # the verb's own settings, not the whole command line's
    again = parser.parse_string(dumped)
    assert again.model.width == 3 and again.trainer.max_steps == 1


# ------------------------------------------------------------------ trainer, loops, checkpoints
def quiet_trainer(tmp_path: Path, **kwargs) -> pl.Trainer:
    settings = {"accelerator": "cpu", "logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
                "enable_model_summary": False, "default_root_dir": str(tmp_path), "limit_val_batches": 0}
    return pl.Trainer(**{**settings, **kwargs})


def test_trainer_logs_this_step_follows_log_every_n_steps(tmp_path: Path):
    seen: list[tuple[int, bool]] = []

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append((trainer.global_step, logs_this_step(trainer)))

    trainer = quiet_trainer(tmp_path, max_steps=6, log_every_n_steps=3, callbacks=[Record()])
    assert isinstance(type(trainer._logger_connector).should_update_logs, property)
    trainer.fit(BoringModel())
    assert [step for step, logs in seen if logs] == [2, 5]  # the batches whose values reach the loggers


def test_logs_this_step_raises_when_lightning_drops_the_connector():
    """Without the private connector, every step logging (and syncing) would go unnoticed."""
    with pytest.raises(AttributeError, match="_logger_connector"):
        logs_this_step(SimpleNamespace(fast_dev_run=False))


def test_trainer_loop_progress_counts_batches_and_epochs(tmp_path: Path):
    from lmexp.lightning_internals import batches_processed, between_epochs

    seen: list[tuple[int, int, bool]] = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append((batch_idx, batches_processed(trainer), between_epochs(trainer)))

    trainer = quiet_trainer(tmp_path, max_epochs=2, limit_train_batches=3, callbacks=[Record()])
    trainer.fit(BoringModel())
    assert seen == [(i, i + 1, False) for i in range(3)] * 2  # `processed` counts the batch just run
    assert between_epochs(trainer)  # both epochs done, none started


def test_trainer_rewound_fit_loop_state_resumes_at_the_rewound_batch(tmp_path: Path):
    from lmexp.lightning_internals import rewind_saved_fit_loop

    trainer = quiet_trainer(tmp_path, max_steps=5, limit_train_batches=10)
    trainer.fit(BoringModel())
    path = tmp_path / "five.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=False)
    assert checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["processed"] == 5

    assert rewind_saved_fit_loop(checkpoint, 3) == (3, True)
    assert rewind_saved_fit_loop({"loops": {}}, 3) is None
    rewound = tmp_path / "three.ckpt"
    torch.save(checkpoint, rewound)
    first: list[int] = []

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            first.append(batch_idx)

    quiet_trainer(tmp_path, max_steps=7, limit_train_batches=10, callbacks=[Record()]).fit(
        BoringModel(), ckpt_path=str(rewound))
    assert first[0] == 3  # Lightning reads the rewound counts: batch 3 runs again

    between = torch.load(path, weights_only=False)
    assert rewind_saved_fit_loop(between, None) == (0, False)
    assert between["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["processed"] == 0


def test_trainer_save_notifying_checkpoint_reports_each_written_file(tmp_path: Path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lmexp.lightning_internals import SaveNotifyingCheckpoint

    assert list(inspect.signature(ModelCheckpoint._save_checkpoint).parameters) == ["self", "trainer", "filepath"]
    written: list[tuple[str, bool]] = []

    class Record(SaveNotifyingCheckpoint):
        def on_checkpoint_saved(self, trainer, filepath):
            written.append((Path(filepath).name, Path(filepath).is_file()))

    record = Record(dirpath=str(tmp_path), filename="step{step}", every_n_train_steps=2, save_top_k=-1, monitor=None,
                    auto_insert_metric_name=False)
    quiet_trainer(tmp_path, max_steps=4, enable_checkpointing=True, callbacks=[record]).fit(BoringModel())
    assert written == [("step2.ckpt", True), ("step4.ckpt", True)]


def test_trainer_selective_rich_progress_bar_titles_and_skips_metric_reads(tmp_path: Path):
    from lightning.pytorch.callbacks import RichProgressBar

    from lmexp.lightning_internals import SelectiveRichProgressBar

    assert list(inspect.signature(RichProgressBar._get_train_description).parameters) == ["self", "current_epoch"]
    assert list(inspect.signature(RichProgressBar._update_metrics).parameters) == ["self", "trainer", "pl_module"]
    assert list(inspect.signature(RichProgressBar._update).parameters)[:3] == ["self", "progress_bar_id", "current"]
    assert callable(RichProgressBar._initialize_train_progress_bar_id)

    class Bar(SelectiveRichProgressBar):
        reads = 0

        def train_description(self, current_epoch):
            return f"run {current_epoch}"

        def refreshes_metrics(self, trainer):
            return trainer.global_step % 3 == 0

        def get_metrics(self, trainer, pl_module):
            self.reads += 1
            return super().get_metrics(trainer, pl_module)

    bar = Bar()
    trainer = quiet_trainer(tmp_path, max_steps=6, enable_progress_bar=True, callbacks=[bar])
    trainer.fit(BoringModel())
    assert bar.progress.tasks[bar.train_progress_bar_id].description == "run 0"
    assert bar.reads == 2 + 1  # steps 3 and 6, and the epoch's end
