"""Checkpoints and exports are whole or absent: written beside their target and renamed into place,
a full disk is one line with the previous file intact, and ``--ckpt_path last`` never starts over
while a run has a readable checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from lmexp.atomic import TEMPORARY_PREFIX
from lmexp.checkpoints import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, export_safetensors, load_checkpoint
from lmexp.cli import main
from lmexp.data.tokenizer import train_tokenizer
from lmexp.errors import CheckpointError, StorageError
from lmexp.models import ModelConfig, build_model
from lmexp.run_folders import run_folders
from lmexp.runs import build
from tests.conftest import make_corpus
from tests.test_cli import quickstart_args


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def temporaries(*folders: Path) -> list[Path]:
    return [p for folder in folders for p in folder.rglob("*") if p.name.startswith(TEMPORARY_PREFIX)]


def tiny_export(folder: Path, seed: int = 0) -> tuple[torch.nn.Module, ModelConfig]:
    tokenizer = train_tokenizer([make_corpus(20)], "char")
    torch.manual_seed(seed)
    config = ModelConfig(arch="gpt", vocab_size=tokenizer.get_vocab_size(), block_size=16, n_layer=1, n_head=2,
                         n_embd=16)
    model = build_model(config)
    export_safetensors(model, config, folder, tokenizer)
    return model, config


# ------------------------------------------------------------------ the writers, in isolation
def test_checkpoint_io_writes_in_the_target_folder_with_the_umask(tmp_path: Path, monkeypatch, umask_022):
    import tempfile

    def no_tmpdir(*args, **kwargs):
        raise AssertionError("a checkpoint went through $TMPDIR")

    monkeypatch.setattr(tempfile, "mkstemp", no_tmpdir)
    from lmexp.callbacks import AtomicCheckpointIO

    path = tmp_path / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 3, "w": torch.ones(4)}, path)
    assert torch.load(path, weights_only=True)["global_step"] == 3
    assert path.stat().st_mode & 0o777 == 0o644
    assert temporaries(tmp_path) == []


def test_a_full_disk_while_checkpointing_is_one_line_and_keeps_the_previous_file(tmp_path: Path, fault):
    from lmexp.callbacks import AtomicCheckpointIO

    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 1}, path)
    fault("checkpoint.write:enospc")
    with pytest.raises(StorageError, match=r"disk full while writing .*last\.ckpt.*needed") as info:
        io.save_checkpoint({"global_step": 2, "w": torch.zeros(1000)}, path)
    assert "\n" not in str(info.value)
    assert torch.load(path, weights_only=True)["global_step"] == 1
    assert temporaries(tmp_path) == []


def test_an_export_is_replaced_as_a_whole_with_the_umask(tmp_path: Path, fault, umask_022):
    folder = tmp_path / "best"
    first, _ = tiny_export(folder, seed=0)
    assert {p.stat().st_mode & 0o777 for p in folder.iterdir()} == {0o644}
    fault("export.write:enospc")
    with pytest.raises(StorageError, match="disk full while writing"):
        tiny_export(folder, seed=1)
    loaded = load_checkpoint(folder)  # the first export, whole
    for name, value in first.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[name], value, rtol=0, atol=0)
    assert temporaries(tmp_path) == []
    assert {p.name for p in folder.iterdir()} == {WEIGHTS_FILE, CONFIG_FILE, TOKENIZER_FILE}


@pytest.mark.parametrize("damage", ["weights", "tokenizer"])
def test_a_damaged_export_is_a_one_line_error_naming_the_file(tmp_path: Path, damage: str):
    folder = tmp_path / "best"
    tiny_export(folder)
    if damage == "weights":
        weights = folder / WEIGHTS_FILE
        weights.write_bytes(weights.read_bytes()[:600])
        bad = weights
    else:
        bad = folder / TOKENIZER_FILE
        bad.write_text('{"version": "1.0", "model": ')
    with pytest.raises(CheckpointError, match=bad.name) as info:
        load_checkpoint(folder)
    assert "\n" not in str(info.value) and "re-export" in str(info.value)


def test_the_trainer_writes_checkpoints_atomically_and_keeps_the_users_plugins(tmp_path: Path):
    from lightning.pytorch.plugins.environments import LightningEnvironment

    from lmexp.callbacks import AtomicCheckpointIO

    overrides = {"trainer.default_root_dir": str(tmp_path), "trainer.max_steps": 1}
    configs = [Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"]
    run = build("fit", configs=configs, overrides={**overrides, "trainer.strategy": "ddp", "trainer.plugins": [
        {"class_path": "lightning.pytorch.plugins.environments.LightningEnvironment"}]})
    assert isinstance(run.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert isinstance(run.trainer.strategy.cluster_environment, LightningEnvironment)
    own = build("fit", configs=configs, overrides={**overrides, "trainer.plugins": [
        {"class_path": "lightning.pytorch.plugins.io.TorchCheckpointIO"}]})
    assert type(own.trainer.strategy.checkpoint_io).__name__ == "TorchCheckpointIO"  # the user's choice stands


# ------------------------------------------------------------------ through a real fit
def test_a_full_disk_during_a_fit_is_one_line_and_loses_no_checkpoint(tmp_path: Path, fault, capsys):
    # Each validation writes best.ckpt then last.ckpt: the third write (step 6) finds the disk
    # full, and so does the stop checkpoint after it (the third commit).
    fault("checkpoint.write@3:enospc,checkpoint.commit@3:enospc")
    args = quickstart_args(tmp_path, steps=9) + ["--trainer.val_check_interval=3",
                                                 "--trainer.enable_progress_bar=false"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len([line for line in err if line.startswith("error:")]) == 1 and "Traceback" not in "\n".join(err)
    assert "disk full while writing" in err[-1] and ".ckpt" in err[-1]
    checkpoints = tmp_path / "latest" / "checkpoints"
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 3
    assert torch.load(checkpoints / "best.ckpt", weights_only=True)["global_step"] in (3, 6)
    assert not (checkpoints / "interrupted.ckpt").exists()
    assert temporaries(tmp_path) == []


def test_ckpt_path_last_falls_back_to_the_newest_readable_checkpoint_in_the_same_run(tmp_path: Path, caplog, capsys):
    caplog.set_level("INFO")
    args = quickstart_args(tmp_path, steps=6) + ["--trainer.val_check_interval=3",
                                                 "--trainer.enable_progress_bar=false"]
    main(args)
    (run,) = run_folders(tmp_path)
    checkpoints = run / "checkpoints"
    best_step = torch.load(checkpoints / "best.ckpt", weights_only=True)["global_step"]
    last = checkpoints / "last.ckpt"
    last.write_bytes(last.read_bytes()[:4096])  # cut short

    with pytest.warns(UserWarning, match=f"checkpoints/last.ckpt is unreadable .*: resuming from "
                      f".*checkpoints/best.ckpt at step {best_step}"):
        main(quickstart_args(tmp_path, steps=9) + ["--trainer.val_check_interval=3",
                                                   "--trainer.enable_progress_bar=false", "--ckpt_path", "last"])
    assert f"Restoring states from the checkpoint path at {(checkpoints / 'best.ckpt').resolve()}" in caplog.text
    assert run_folders(tmp_path) == [run]  # the same run continues
    assert torch.load(last, weights_only=True)["global_step"] == 9

    for name in ("last.ckpt", "best.ckpt"):
        path = checkpoints / name
        path.write_bytes(path.read_bytes()[:4096])
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main(quickstart_args(tmp_path, steps=12) + ["--ckpt_path", "last"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "none of the checkpoints" in err[0], err
    assert run_folders(tmp_path) == [run]  # no new run started


def test_a_transformers_export_is_replaced_as_a_whole_with_the_umask(tmp_path: Path, fault, umask_022):
    from lmexp.formats.huggingface import export_hf

    tokenizer = train_tokenizer([make_corpus(20)], "char")
    config = ModelConfig(arch="gpt", vocab_size=tokenizer.get_vocab_size(), block_size=16, n_layer=1, n_head=2,
                         n_embd=16, bias=True, activation="gelu")
    torch.manual_seed(0)
    first = build_model(config)
    folder = export_hf(first, config, tmp_path / "hf", tokenizer)
    assert {p.stat().st_mode & 0o777 for p in folder.iterdir()} == {0o644}
    fault("export.write:enospc")
    with pytest.raises(StorageError, match="disk full while writing"):
        export_hf(build_model(config), config, folder, tokenizer)
    loaded = load_checkpoint(folder)  # the first export, whole
    for name, value in first.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[name], value, rtol=0, atol=0)
    assert temporaries(tmp_path) == []
