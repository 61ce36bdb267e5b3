"""The verbs' modules: each serves ``run(argv)``, and their old import paths still work for one
release with a DeprecationWarning naming the new one."""

from __future__ import annotations

import importlib
import sys

import pytest

from lmexp import cli


@pytest.mark.parametrize("verb", sorted(cli.VERBS))
def test_every_verb_module_has_run(verb: str) -> None:
    assert callable(importlib.import_module(cli.VERBS[verb]).run)


@pytest.mark.parametrize(
    ("old", "new", "names"),
    [
        ("lmexp.predict", "lmexp.verbs.predict", ["predict_file", "run_predict"]),
        ("lmexp.chaos", "lmexp.verbs.chaos", ["Chaos", "SCENARIOS", "run_chaos", "saved_problems"]),
        ("lmexp.cleanup", "lmexp.verbs.clean", ["find_leftovers", "run_state", "run_clean"]),
    ],
)
def test_moved_module_still_imports_and_warns(
    old: str, new: str, names: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delitem(sys.modules, old, raising=False)
    with pytest.warns(DeprecationWarning, match=rf"{old} is deprecated .*use {new}"):
        module = importlib.import_module(old)
    moved = importlib.import_module(new)
    for name in names:
        assert getattr(module, name) is getattr(moved, name)


@pytest.mark.parametrize(("name", "new"), sorted(cli.MOVED.items()))
def test_names_moved_out_of_cli_still_import_and_warn(name: str, new: str) -> None:
    with pytest.warns(DeprecationWarning, match=rf"use {new}\.{name}"):
        value = getattr(cli, name)
    assert value is getattr(importlib.import_module(new), name)


def test_an_unknown_cli_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        cli.no_such_name  # noqa: B018
