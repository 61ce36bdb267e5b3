"""Export format 2: the transforms applied to a network are recorded, checked and replayed."""

import json

import pytest
import torch

from lmexp.checkpoints import EXPORT_FORMAT, LoadedModel, export_safetensors, load_checkpoint, preload_hook
from lmexp.errors import CheckpointError
from lmexp.models import build_model, from_name


def _export(tmp_path, **fields):
    config = from_name("gpt-tiny", vocab_size=40, **fields)
    model = build_model(config).eval()
    folder = export_safetensors(model, config, tmp_path / "export", transforms=[{"method": "prune", "sparsity": 0.5}])
    return model, folder


def test_a_structurally_smaller_network_loads_back_as_itself(tmp_path):
    model, folder = _export(tmp_path, layer_heads=[1, 2], layer_mlp_hidden=[16, 100])
    loaded = load_checkpoint(folder)
    assert loaded.config.layer_heads == [1, 2] and loaded.config.layer_mlp_hidden == [16, 100]
    assert loaded.transforms == [{"method": "prune", "sparsity": 0.5}]
    assert not loaded.rebuilt
    ids = torch.randint(0, 40, (2, 9))
    torch.testing.assert_close(loaded.model(ids), model(ids), rtol=0, atol=0)
    assert json.loads((folder / "config.json").read_text())["format"] == EXPORT_FORMAT


def test_an_export_from_a_newer_format_is_refused(tmp_path):
    _, folder = _export(tmp_path)
    meta = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**meta, "format": EXPORT_FORMAT + 1}))
    with pytest.raises(CheckpointError, match=f"export format {EXPORT_FORMAT + 1}.*upgrade lmexp"):
        load_checkpoint(folder)


def test_a_format_1_export_without_transforms_still_loads(tmp_path):
    _, folder = _export(tmp_path)
    meta = json.loads((folder / "config.json").read_text())
    del meta["transforms"]
    (folder / "config.json").write_text(json.dumps({**meta, "format": 1}))
    assert load_checkpoint(folder).transforms == []


def test_a_transform_whose_preload_hook_is_not_installed_is_one_line(tmp_path):
    _, folder = _export(tmp_path)
    meta = json.loads((folder / "config.json").read_text())
    meta["transforms"] = [{"method": "quantize", "rebuild": "no-such-hook"}]
    (folder / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="pre-load hook 'no-such-hook'"):
        load_checkpoint(folder)
    with pytest.raises(CheckpointError, match="pre-load hook"):
        preload_hook("no-such-hook")


def test_a_malformed_transforms_list_is_refused(tmp_path):
    _, folder = _export(tmp_path)
    meta = json.loads((folder / "config.json").read_text())
    meta["transforms"] = ["prune"]
    (folder / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="malformed transforms"):
        load_checkpoint(folder)


def test_loaded_model_knows_when_its_layers_were_rebuilt():
    config = from_name("gpt-tiny", vocab_size=10)
    assert LoadedModel(build_model(config), config, None, transforms=[{"method": "int8", "rebuild": "x"}]).rebuilt
