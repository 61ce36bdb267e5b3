"""lmexp.checkpoints loads both formats and keeps its names; the old lmexp.huggingface path still
works for one release and warns."""

from __future__ import annotations

import importlib
import sys
import warnings

import pytest

import lmexp.checkpoints
import lmexp.formats.huggingface
import lmexp.formats.native


def test_checkpoints_re_exports_the_native_names_without_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in lmexp.formats.native.__all__:
            if name != "load_native":
                assert getattr(lmexp.checkpoints, name) is getattr(lmexp.formats.native, name)
    assert set(lmexp.checkpoints.__all__) >= {"load_checkpoint", "export_checkpoint", "LoadedModel", "read_checkpoint"}


def test_the_old_huggingface_module_still_works_and_warns(monkeypatch):
    monkeypatch.delitem(sys.modules, "lmexp.huggingface", raising=False)
    with pytest.warns(DeprecationWarning, match="lmexp.huggingface is deprecated.*lmexp.formats.huggingface"):
        old = importlib.import_module("lmexp.huggingface")
    assert old.export_hf is lmexp.formats.huggingface.export_hf
    assert old.load_hf_tokenizer is lmexp.formats.huggingface.load_hf_tokenizer
    assert old.export_checkpoint is lmexp.checkpoints.export_checkpoint
    assert set(old.__all__) == {*lmexp.formats.huggingface.__all__, "export_checkpoint"}
