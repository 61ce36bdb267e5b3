"""``lmexp test|validate`` of a run's checkpoint read that run's saved settings: fit overrides need
not be repeated, a training file that is gone does not stop scoring the test file, and the
command's own flags still win."""

from __future__ import annotations

import re
import shutil
import warnings
from pathlib import Path

import pytest

from lmexp.cli import main
from lmexp.lightning_cli import with_run_settings
from lmexp.runs import build
from tests.test_finetune import write_reviews

CONFIG = """\
# A one-layer classifier; its training file is given on the command line, as a fit override.
seed_everything: 0
trainer:
  accelerator: cpu
  max_steps: 4
  val_check_interval: 2
  check_val_every_n_epoch: null
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
  default_root_dir: {root}
model:
  class_path: lmexp.SequenceClassification
  init_args:
    network: bert-tiny
    network_overrides: {{n_layer: 1, n_embd: 32, n_head: 2}}
    warmup_steps: 0
checkpoint:
  monitor: val/acc
  mode: max
data:
  class_path: lmexp.ClassificationDataModule
  init_args:
    train: {folder}/not-here.tsv
    test: {folder}/dev.tsv
    text_column: [sentence, content]
    tokenizer: char
    batch_size: 8
"""


def trained_classifier(folder: Path) -> Path:
    """Fit a tiny classifier with fit overrides (train file, max_length), then delete the training
    file; returns the config (its ``best.ckpt`` is ``runs/r/checkpoints/best.ckpt`` under ``folder``)."""
    train = write_reviews(folder / "train.tsv", 80)
    write_reviews(folder / "dev.tsv", 30, text_column="content", seed=5)
    config = folder / "cls.yaml"
    config.write_text(CONFIG.format(root=folder / "runs", folder=folder))
    main(["fit", "--config", str(config), f"--data.train={train}", "--data.max_length=24", "--run_name=r"])
    train.unlink()  # gone, as a scratch copy of a large training set may be by evaluation time
    return config


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trained_classifier(tmp_path_factory.mktemp("from_run"))


def printed_metrics(printed: str) -> dict[str, float]:
    return {name: float(value) for name, value in re.findall(r"│\s*(test/\w+)\s*│\s*([-0-9.e]+)\s*│", printed)}


def test_a_test_takes_the_runs_data_settings_and_reads_only_the_test_file(config: Path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = build("test", configs=[config], ckpt_path="best", args=["--data.batch_size=3"])
        data = run.datamodule
        # The run's fit overrides, not the config file's values; the command's flag over both.
        assert data.max_length == 24 and data.train_path == str(config.parent / "train.tsv")
        assert data.batch_size == 3
        result = run.execute()[0]
    assert set(data.splits) == {"test"} and len(data.splits["test"]) == 30  # train.tsv was not read
    assert data.labels == ["0", "1"] and 0 <= result["test/acc"] <= 1
    assert not [w for w in caught if "dirpath has changed" in str(w.message)]


def test_a_test_without_a_config_file_takes_the_runs_model_and_data(config: Path, tmp_path: Path, monkeypatch,
                                                                    capsys):
    monkeypatch.chdir(tmp_path)
    best = config.parent / "runs" / "r" / "checkpoints" / "best.ckpt"
    main(["test", "--ckpt_path", str(best), "--trainer.logger=false", "--trainer.enable_progress_bar=false",
          "--run_name=bare"])
    scored = printed_metrics(capsys.readouterr().out)
    assert {"test/acc", "test/f1", "test/loss"} <= set(scored), scored
    assert (config.parent / "runs" / "bare-test").is_dir() and not (tmp_path / "runs").exists()  # beside the run


def test_a_validate_with_a_val_file_reads_only_that_file(config: Path, tmp_path: Path):
    val = shutil.copy(config.parent / "dev.tsv", tmp_path / "val.tsv")
    run = build("validate", configs=[config], ckpt_path="best", args=[f"--data.val={val}"])
    result = run.execute()[0]
    assert set(run.datamodule.splits) == {"val"} and 0 <= result["val/acc"] <= 1


def test_the_runs_settings_go_after_the_config_files_and_before_the_flags():
    # A setting the run left unset (test: None) is not among them: a config file's value stands.
    data, model = {"class_path": "D", "init_args": {"train": "t.tsv", "test": None}}, {"class_path": "M"}
    saved = {"data": data, "model": model, "trainer": {"max_steps": 9}}
    words = ["test", "--data.batch_size=2", "--config", "a.yaml", "--config=b.yaml", "--ckpt_path", "best"]
    assert with_run_settings(words, "test", saved) == [
        "test", "--data.batch_size=2", "--config", "a.yaml", "--config=b.yaml",
        '--data={"class_path": "D", "init_args": {"train": "t.tsv"}}', "--ckpt_path", "best",
    ]
    # Without a config file the run's model settings are the base too (the network is the checkpoint's),
    # and the evaluation's folder goes beside the run's.
    saved.update(experiment="sst2", trainer={"default_root_dir": "/r"}, seed_everything=7)
    assert with_run_settings(["test", "--ckpt_path", "x.ckpt"], "test", saved)[1:6] == [
        '--model={"class_path": "M"}', '--data={"class_path": "D", "init_args": {"train": "t.tsv"}}',
        "--experiment=sst2", "--seed_everything=7", "--trainer.default_root_dir=/r",
    ]
    assert with_run_settings(["test"], "test", None) == ["test"]
