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
    with pytest.warns(DeprecationWarning, match="lmexp.huggingface is deprecated.*lmexp.formats.huggingface") as record:
        import lmexp.huggingface as old
    assert [warning.filename for warning in record] == [__file__]  # the importing line, which a script shows
    assert old.export_hf is lmexp.formats.huggingface.export_hf
    assert old.load_hf_tokenizer is lmexp.formats.huggingface.load_hf_tokenizer
    assert old.export_checkpoint is lmexp.checkpoints.export_checkpoint
    assert set(old.__all__) == {*lmexp.formats.huggingface.__all__, "export_checkpoint"}


@pytest.mark.parametrize(
    ("name", "new"),
    [
        ("log", "lmexp.formats.huggingface"),
        ("IGNORED", "lmexp.formats.huggingface"),
        ("ACTIVATIONS", "lmexp.formats.huggingface"),
        ("GPT2_EOS", "lmexp.formats.huggingface"),
        ("LoadedModel", "lmexp.checkpoints"),
    ],
)
def test_the_old_huggingface_module_serves_its_other_names_with_a_warning(name, new):
    import lmexp.huggingface as old

    with pytest.warns(DeprecationWarning, match=rf"lmexp\.huggingface\.{name} is deprecated.*use {new}\.{name}") as record:
        value = getattr(old, name)
    assert [warning.filename for warning in record] == [__file__]
    assert value is getattr(importlib.import_module(new), name)
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        old.no_such_name  # noqa: B018


def test_the_huggingface_warnings_keep_their_logger_name():
    assert lmexp.formats.huggingface.log.name == "lmexp.huggingface"
