"""The compression report: every variant made, saved, loaded back and measured on the same data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from compression.__main__ import main
from compression.core import CompressionError, load, save
from compression.pruning import magnitude
from compression.report import build_report, method_from_spec
from tests.compression.conftest import train_tiny_gpt


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer GPT, 64 wide (shapes bitsandbytes' CPU 4-bit kernel takes), trained briefly."""
    return train_tiny_gpt(tmp_path_factory.mktemp("report"), 300, '--model.network_overrides={"n_embd": 64}',
                          "--model.lr=3e-3", "--data.batch_size=16", "--trainer.max_steps=40",
                          "--trainer.val_check_interval=20")


def test_report_measures_each_variant_against_the_original(trained, tmp_path):
    out = tmp_path / "report"
    rows = build_report(trained, ["int8", "magnitude=0.5", "dynamic-int8"], out, calibration_batches=2,
                        timing_batches=2, seconds=0.1, rounds=2, track=False)
    by_name = {row.name: row for row in rows}
    assert list(by_name) == ["original", "int8", "magnitude=0.5", "dynamic-int8"]
    assert all(row.peak_memory_bytes > 0 for row in rows)  # each from its own process
    original = by_name["original"]
    assert original.change == 0 and original.metric == "ppl" and original.value > 1
    # int8 keeps the same weights in a quarter of the bytes (plus per-row scales)
    assert 0.24 < by_name["int8"].linear_bytes / original.linear_bytes < 0.30
    assert by_name["int8"].parameters == original.parameters
    assert abs(by_name["int8"].change) < 0.05
    # half the block weights are zeros: non-zero count drops by about half of the block linears
    pruned = by_name["magnitude=0.5"]
    assert pruned.parameters == original.parameters
    assert original.nonzero - pruned.nonzero == pytest.approx(original.linear_bytes / 4 / 2, rel=0.02)
    assert pruned.value > original.value  # pruning without recovery costs quality
    assert by_name["dynamic-int8"].disk_bytes is None  # in memory only
    assert 0.24 < by_name["dynamic-int8"].linear_bytes / original.linear_bytes < 0.30  # packed int8 counted
    # every saved variant loads back with its transform recorded
    saved = json.loads((out / "variants" / "int8" / "config.json").read_text())
    assert saved["transforms"][-1]["method"] == "int8"
    report = json.loads((out / "report.json").read_text())
    assert [r["name"] for r in report["rows"]] == list(by_name)
    assert "| int8 |" in (out / "report.md").read_text()
    assert (out / "size_quality.png").stat().st_size > 1000
    assert "[4/4] dynamic-int8" in (out / "report.log").read_text()


def test_report_takes_variants_made_elsewhere_and_logs_to_mlflow(trained, tmp_path, isolated_tracking):
    from mlflow import MlflowClient

    quarter = save(magnitude(load(trained), 0.25), tmp_path / "quarter")
    out = tmp_path / "second"
    rows = build_report(trained, [], out, variants=[f"quarter={quarter}"], timing_batches=1, seconds=0.02, rounds=1,
                        tracking_uri=isolated_tracking, measure_memory=False)
    assert [r.name for r in rows] == ["original", "quarter"]
    assert all(r.peak_memory_bytes is None for r in rows)  # not asked for
    assert rows[1].transforms[-1]["method"] == "magnitude" and rows[1].nonzero < rows[0].nonzero
    client = MlflowClient(isolated_tracking)
    experiment = client.get_experiment_by_name("compression")
    run = client.search_runs([experiment.experiment_id])[0]
    assert run.data.metrics["quarter/ppl"] == pytest.approx(rows[1].value)
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"report.md", "size_quality.png"}


@pytest.mark.parametrize(
    ("spec", "message"),
    [("int9", "unknown method 'int9'"), ("wanda=1.5", "outside \\[0, 1\\)"), ("wanda=half", "needs a fraction"),
     ("int8=2", "takes no value")],
)
def test_bad_method_spellings_are_one_line_errors(spec, message):
    with pytest.raises(CompressionError, match=message):
        method_from_spec(spec)


def test_report_command_refuses_a_file_that_is_not_a_checkpoint(tmp_path, capsys):
    bogus = tmp_path / "notes.ckpt"
    bogus.write_text("not a checkpoint")
    assert main(["report", "--ckpt", str(bogus), "--config", str(bogus), "--no-tracking"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "not a checkpoint" in err and "\n" not in err


def test_report_command_refuses_a_bad_variant_spelling(trained, tmp_path, capsys):
    assert main(["report", "--ckpt", str(trained), "--methods", "--variant", "nopath", "--out", str(tmp_path),
                 "--no-tracking"]) == 2
    assert "NAME=PATH" in capsys.readouterr().err
