"""The run builder's own surface: ``configure`` without a run, and the old paths of names that moved
out of ``lmexp.runs`` (run folders, what a run records)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from lmexp import runs
from lmexp.crossval import CrossValidation
from lmexp.errors import ConfigError
from lmexp.runs import configure

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(runs.MOVED))
def test_moved_names_keep_their_old_path_with_a_warning(name: str):
    new = runs.MOVED[name]
    with pytest.warns(DeprecationWarning, match=f"lmexp.runs.{name} is deprecated.*use {new}.{name}"):
        old = getattr(runs, name)
    assert old is getattr(importlib.import_module(new), name)


def test_configure_makes_the_objective_and_data_but_no_run(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    made = configure("fit", [ROOT / "configs" / "quickstart.yaml"],
                     {"model.init_args.lr": 1e-3, "trainer.gradient_clip_val": 0.5})
    assert type(made.model).__name__ == "CausalLM" and made.model.hparams.lr == 1e-3
    assert made.data is not None and made.data.source == "python-docs"
    assert made.trainer["gradient_clip_val"] == 0.5 and made.trainer.get("max_steps") is not None
    assert made.config["model"]["init_args"]["lr"] == 1e-3  # what check returns
    with pytest.raises(ConfigError, match="is not one of fit, validate, test"):
        configure("predict")
    assert list(tmp_path.iterdir()) == []  # no run folder, no tracking store


def test_a_fit_over_folds_is_built_as_a_cross_validation_using_the_builder(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    table = tmp_path / "train.tsv"
    table.write_text("".join(f"{'good' if i % 2 else 'bad'} text {i}\t{i % 2}\n" for i in range(8)))
    built = runs.build("fit", [ROOT / "configs" / "quickstart.yaml"], args=[
        "--data=lmexp.data.ClassificationDataModule", f"--data.train={table}", "--data.num_folds=2",
        "--model=lmexp.objectives.SequenceClassification", f"--trainer.default_root_dir={tmp_path / 'runs'}",
        "--trainer.logger=false", "--run_name=cv",
    ])
    assert isinstance(built, CrossValidation) and built.num_folds == 2
    assert built.build is runs.build and built.run_dir == tmp_path / "runs" / "cv-cv"


def test_the_model_summary_shows_flops_only_where_counted(tmp_path: Path, monkeypatch, caplog):
    """Lightning counts FLOPs only through a module's example_input_array, which lmexp objectives
    do not set: its summary printed a FLOPs column of zeros and "Total Flops 0" at every fit."""
    import logging

    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import ModelSummary
    from lightning.pytorch.demos.boring_classes import BoringModel

    from lmexp.callbacks import ParameterSummary

    monkeypatch.chdir(tmp_path)
    run = runs.build("fit", [ROOT / "configs" / "quickstart.yaml"], logger=False, args=[
        f"--trainer.default_root_dir={tmp_path / 'runs'}", "--trainer.enable_model_summary=true"])
    assert [type(c) for c in run.trainer.callbacks if isinstance(c, ModelSummary)] == [ParameterSummary]
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    counted = BoringModel()
    counted.example_input_array = torch.zeros(2, 32)
    with caplog.at_level(logging.INFO):
        ParameterSummary().on_fit_start(trainer, BoringModel())
        plain = caplog.text
        caplog.clear()
        ParameterSummary().on_fit_start(trainer, counted)
    assert "Total params" in plain and "FLOPs" not in plain and "Flops" not in plain
    assert "FLOPs" in caplog.text and "Total FLOPs" in caplog.text
