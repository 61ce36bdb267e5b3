"""A class given to a setting that takes a plain value (a mapping of fields) is one line naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmexp.cli import main

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
A_CLASS = '{"class_path": "foo.Bar", "init_args": {"dropout": 0.1}}'


def parse_error(args: list[str], capsys: pytest.CaptureFixture) -> str:
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", QUICKSTART, *args, "--print_config"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_a_class_on_the_command_line_for_a_plain_mapping_is_one_line(capsys):
    err = parse_error(["--model.init_args.network_overrides", A_CLASS], capsys)
    assert "--model.network_overrides" in err and "plain value, not a class" in err and "foo.Bar" in err
    assert "Namespace(" not in err


def test_a_class_in_a_yaml_for_a_plain_mapping_is_one_line(tmp_path: Path, capsys):
    config = tmp_path / "overrides.yaml"
    config.write_text("model:\n  init_args:\n    network_overrides:\n      class_path: foo.Bar\n"
                      "      init_args:\n        dropout: 0.1\n")
    err = parse_error(["--config", str(config)], capsys)
    assert "--model.network_overrides" in err and "plain value, not a class" in err
    assert "Namespace(" not in err
