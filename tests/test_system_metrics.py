"""System metrics: sampled in a thread, sent through the tracker's queue under MLflow's names,
off with ``system_metrics=false``."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from lmexp.system_metrics import PREFIX, SystemSampler, sample_system
from lmexp.tracking import MLflowTracker
from tests.helpers import one_line_error
from tests.test_cli import ROOT

WAIT_SECONDS = 60.0  # never reached unless broken


@pytest.fixture(autouse=True)
def tracker_thread_at_normal_priority(monkeypatch):
    monkeypatch.setattr(os, "setpriority", lambda *args: None)


def test_a_sample_reads_cpu_memory_and_disk_under_mlflows_names(tmp_path: Path):
    values = sample_system(disk=str(tmp_path / "not" / "yet"))  # a folder still to be made: its file system
    assert {"cpu_utilization_percentage", "system_memory_usage_megabytes", "system_memory_usage_percentage",
            "disk_usage_percentage", "disk_available_megabytes"} <= set(values)
    assert 0 < values["system_memory_usage_percentage"] <= 100


def test_the_sampler_emits_every_interval_and_once_more_at_stop():
    got: list[dict] = []
    two = threading.Event()

    def emit(values: dict) -> None:
        got.append(values)
        if len(got) >= 2:
            two.set()

    sampler = SystemSampler(emit, interval=0.05)
    sampler.start()
    assert two.wait(WAIT_SECONDS)
    before = len(got)
    sampler.stop()
    assert len(got) == before + 1 and all(key.startswith(PREFIX) for key in got[-1])


def _tracked(tmp_path: Path, name: str, **kwargs) -> tuple[MLflowTracker, object]:
    tracker = MLflowTracker(experiment_name="system-metrics", run_name=name, save_dir=str(tmp_path), **kwargs)
    tracker.log_metrics({"train/loss": 1.0}, step=7)
    tracker.start_system_metrics()  # as the run builder's recorder does when the run begins
    return tracker, tracker.client


@pytest.mark.parametrize("on", [True, False])
def test_a_tracked_run_records_system_metrics_at_the_training_step_unless_off(tmp_path: Path, on: bool):
    tracker, client = _tracked(tmp_path, f"on-{on}", system_metrics=on, system_metrics_interval=0.05)
    if on:
        sampler = tracker._sampler
        deadline = threading.Event()
        for _ in range(int(WAIT_SECONDS / 0.05)):
            if sampler.samples:
                break
            deadline.wait(0.05)
    else:
        assert tracker._sampler is None
    tracker.finalize("success")
    run = client.get_run(tracker.run_id)
    system = {key for key in run.data.metrics if key.startswith(PREFIX)}
    if not on:
        assert not system
        return
    assert "system/cpu_utilization_percentage" in system
    steps = {m.step for m in client.get_metric_history(tracker.run_id, "system/cpu_utilization_percentage")}
    assert steps == {7}


def test_a_bad_interval_is_one_line(tmp_path: Path, capsys):
    line = one_line_error(capsys, ["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"),
                                   "--trainer.logger=lmexp.MLflowTracker", "--trainer.logger.system_metrics_interval=0",
                                   f"--trainer.default_root_dir={tmp_path}"])
    assert "system_metrics_interval=0" in line
