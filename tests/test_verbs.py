"""The verbs' modules: each serves ``run(argv)``, and their old import paths still work for one
release with a DeprecationWarning naming the new one."""

from __future__ import annotations

import importlib
import sys

import pytest

from lmexp import cli


@pytest.mark.parametrize("verb", sorted(cli.VERB_MODULES))
def test_every_verb_module_has_run(verb: str) -> None:
    assert callable(importlib.import_module(cli.VERB_MODULES[verb]).run)


def test_the_trainer_verbs_help_lists_every_verb() -> None:
    from lmexp.lightning_cli import DESCRIPTION

    assert all(f"{verb}: " in DESCRIPTION for verb in cli.VERB_MODULES)


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
    with pytest.warns(DeprecationWarning, match=rf"{old} is deprecated .*use {new}") as record:
        __import__(old)  # as an import statement does (importlib.import_module would be blamed)
    # The warning blames the importing line, so Python's default filters show it in a script.
    assert [warning.filename for warning in record] == [__file__]
    module = sys.modules[old]
    moved = importlib.import_module(new)
    for name in names:
        assert getattr(module, name) is getattr(moved, name)


@pytest.mark.parametrize(("name", "new"), sorted(cli.MOVED.items()))
def test_names_moved_out_of_cli_still_import_and_warn(name: str, new: str) -> None:
    with pytest.warns(DeprecationWarning, match=rf"use {new}\.{name}") as record:
        value = getattr(cli, name)
    assert [warning.filename for warning in record] == [__file__]
    assert value is getattr(importlib.import_module(new), name)


def test_an_unknown_cli_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        cli.no_such_name  # noqa: B018
