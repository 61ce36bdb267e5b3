"""``--trainer.precision auto`` and ``lmexp probe``: precision chosen by timing the run's own steps."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from lmexp import CausalLM, TextDataModule
from lmexp import precision as probe_module
from lmexp.cli import main
from lmexp.errors import ConfigError
from lmexp.lightning_cli import DESCRIPTION
from lmexp.precision import BF16, FP32, PRECISION_VARIABLE, choose_precision, probe_precision, resolve_auto_precision
from lmexp.runs import build

FAST = {"warmup_steps": 1, "steps": 2}  # enough to exercise every path on a tiny GPT


def tiny_config(folder: Path, corpus: Path, precision: str = "32-true") -> Path:
    path = folder / "tiny.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "seed_everything": 3,
                "trainer": {
                    "accelerator": "cpu",
                    "devices": 1,
                    "precision": precision,
                    "max_steps": 2,
                    "limit_val_batches": 1,
                    "val_check_interval": 2,
                    "check_val_every_n_epoch": None,
                    "enable_progress_bar": False,
                    "enable_model_summary": False,
                    "gradient_clip_val": 1.0,
                    "default_root_dir": str(folder / "runs"),
                },
                "model": {"class_path": "lmexp.CausalLM", "init_args": {"network": "gpt-tiny", "warmup_steps": 0}},
                "data": {
                    "class_path": "lmexp.TextDataModule",
                    "init_args": {"source": str(corpus), "tokenizer": "char", "batch_size": 2},
                },
            }
        )
    )
    return path


def bf16_units(monkeypatch, present: bool) -> None:
    monkeypatch.setattr(probe_module, "cpu_has_bf16_units", lambda: present)


def fewer_steps(monkeypatch) -> None:
    """Runs built with precision auto probe FAST's steps."""
    monkeypatch.setattr(probe_module, "WARMUP_STEPS", FAST["warmup_steps"])
    monkeypatch.setattr(probe_module, "TIMED_STEPS", FAST["steps"])


def recording_timer(fp32_s: float | None = None, bf16_s: float | None = None):
    """A timer that runs each step and returns the given seconds per precision (None: measured)."""
    calls: list[str] = []

    def timer(precision: str, step) -> float:
        calls.append(precision)
        start = probe_module.time.perf_counter()
        step()
        given = bf16_s if precision == BF16 else fp32_s
        return given if given is not None else probe_module.time.perf_counter() - start

    return timer, calls


def rng_states() -> tuple:
    return torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()


# ------------------------------------------------------------------------------ the decision
@pytest.mark.parametrize(
    ("fp32_ms", "bf16_ms", "fp32_loss", "bf16_loss", "expected"),
    [
        (20.0, 10.0, 3.0, 3.0, BF16),  # twice as fast, same loss
        (20.0, 18.9, 3.0, 3.03, BF16),  # 5.5% faster, loss 1% off
        (20.0, 19.5, 3.0, 3.0, FP32),  # only 2.5% faster
        (20.0, 25.0, 3.0, 3.0, FP32),  # slower
        (20.0, 10.0, 3.0, 3.1, FP32),  # faster but the loss is 3.3% off
        (20.0, 10.0, 3.0, float("nan"), FP32),  # bf16 diverged
        (20.0, None, 3.0, None, FP32),  # bf16 not measured
    ],
)
def test_choose_precision_needs_both_speed_and_a_matching_loss(fp32_ms, bf16_ms, fp32_loss, bf16_loss, expected):
    precision, reason = choose_precision(fp32_ms, bf16_ms, fp32_loss, bf16_loss)
    assert precision == expected and reason


# ------------------------------------------------------------------------------ the probe
def test_the_probe_times_both_precisions_and_leaves_the_run_as_it_was(tiny_corpus: Path, monkeypatch):
    bf16_units(monkeypatch, True)
    # vocab_size given: the objective has its weights from the start, as a pretrained one would.
    objective = CausalLM("gpt-tiny", network_overrides={"vocab_size": 96}, warmup_steps=0)
    datamodule = TextDataModule(str(tiny_corpus), batch_size=2)
    weights = {k: v.clone() for k, v in objective.state_dict().items()}
    torch.manual_seed(11)
    before = rng_states()
    timer, calls = recording_timer()

    choice = probe_precision(objective, datamodule, "cpu", gradient_clip_val=1.0, timer=timer, **FAST)

    assert calls == [FP32] * 3 + [BF16] * 3
    assert choice.precision in (FP32, BF16) and choice.steps == 2 and choice.device == "cpu"
    assert choice.fp32_ms > 0 and choice.bf16_ms > 0
    assert np.isfinite(choice.fp32_loss) and abs(choice.bf16_loss - choice.fp32_loss) < 0.1 * choice.fp32_loss
    line = choice.line()
    assert (
        line.startswith("precision auto on cpu: 32-true ") and "bf16-mixed" in line and f"-> {choice.precision}" in line
    )
    assert set(choice.params()) >= {
        "precision_auto.choice",
        "precision_auto.fp32_ms_per_step",
        "precision_auto.bf16_ms_per_step",
    }
    # The run's own objective, data and random state are untouched.
    after = rng_states()
    assert torch.equal(before[0], after[0]) and before[1] == after[1] and np.array_equal(before[2], after[2])
    for name, value in objective.state_dict().items():
        assert torch.equal(value, weights[name]), name
    assert datamodule.cache is None and datamodule.contract is None


def test_a_trainerless_objective_gets_its_network_only_in_the_probes_copy(tiny_corpus: Path, monkeypatch):
    bf16_units(monkeypatch, False)
    objective = CausalLM("gpt-tiny", warmup_steps=0)  # weights come from the data's vocabulary
    choice = probe_precision(objective, TextDataModule(str(tiny_corpus), batch_size=2), **FAST)
    assert choice.fp32_ms > 0 and objective.model is None


def test_without_bf16_units_bf16_is_never_timed_nor_chosen(tiny_corpus: Path, monkeypatch):
    bf16_units(monkeypatch, False)
    timer, calls = recording_timer(fp32_s=0.020, bf16_s=0.001)
    choice = probe_precision(
        CausalLM("gpt-tiny", warmup_steps=0), TextDataModule(str(tiny_corpus), batch_size=2), timer=timer, **FAST
    )
    assert calls == [FP32] * 3
    assert choice.precision == FP32 and choice.bf16_ms is None and choice.bf16_loss is None
    assert choice.fp32_ms == pytest.approx(20.0)
    assert "no bf16 units" in choice.reason and "no bf16 units" in choice.line()
    assert "precision_auto.bf16_ms_per_step" not in choice.params()


@pytest.mark.parametrize(("bf16_loss", "expected"), [(2.0, BF16), (2.2, FP32)])
def test_a_faster_bf16_is_chosen_only_when_its_loss_matches(tiny_corpus: Path, monkeypatch, bf16_loss, expected):
    bf16_units(monkeypatch, True)
    monkeypatch.setattr(
        probe_module._Arm, "held_out_loss", lambda arm, batch: bf16_loss if arm.precision == BF16 else 2.0
    )
    timer, _ = recording_timer(fp32_s=0.020, bf16_s=0.010)
    choice = probe_precision(
        CausalLM("gpt-tiny", warmup_steps=0), TextDataModule(str(tiny_corpus), batch_size=2), timer=timer, **FAST
    )
    assert (choice.fp32_ms, choice.bf16_ms) == (pytest.approx(20.0), pytest.approx(10.0))
    assert choice.precision == expected
    assert choice.line().endswith(f"-> {expected} ({choice.reason})")


# --------------------------------------------------------------------- runs and the CLI
@pytest.mark.parametrize("given_as", ["overrides", "args", "yaml"])
def test_precision_auto_gives_a_trainer_in_the_chosen_precision(
    tiny_corpus: Path, tmp_path: Path, monkeypatch, caplog, given_as: str
):
    caplog.set_level("INFO")
    monkeypatch.delenv(PRECISION_VARIABLE, raising=False)
    bf16_units(monkeypatch, True)
    timer, calls = recording_timer(fp32_s=0.030, bf16_s=0.015)
    monkeypatch.setattr(probe_module, "_wall_clock_timer", lambda device: timer)
    fewer_steps(monkeypatch)
    config = tiny_config(tmp_path, tiny_corpus, "auto" if given_as == "yaml" else "32-true")
    overrides = {"trainer.precision": "auto"} if given_as == "overrides" else None
    args = ["--trainer.precision=auto"] if given_as == "args" else []
    (tmp_path / "control").mkdir()
    build("fit", configs=[tiny_config(tmp_path / "control", tiny_corpus)])  # no probe: the random state to expect
    expected = rng_states()
    assert not calls

    run = build("fit", configs=[config], overrides=overrides, args=args)

    assert calls == [FP32] * 3 + [BF16] * 3
    assert run.trainer.precision == BF16 and os.environ[PRECISION_VARIABLE] == BF16
    assert "precision auto on cpu: 32-true 30.0 ms/step, bf16-mixed 15.0 ms/step" in caplog.text
    assert run.config["trainer"]["precision"] == "auto"  # the saved config re-probes when rerun
    after = rng_states()  # as the same run in 32-true leaves it
    assert torch.equal(expected[0], after[0]) and expected[1] == after[1] and np.array_equal(expected[2], after[2])
    assert run.model.model is None  # the run builds its own weights, from its own seed


def test_the_tracked_run_records_the_choice_and_both_timings(tiny_corpus: Path, tmp_path: Path, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.delenv(PRECISION_VARIABLE, raising=False)
    bf16_units(monkeypatch, True)
    timer, _ = recording_timer(fp32_s=0.030, bf16_s=0.015)
    monkeypatch.setattr(probe_module, "_wall_clock_timer", lambda device: timer)
    fewer_steps(monkeypatch)
    run = build("fit", configs=[tiny_config(tmp_path, tiny_corpus)], args=["--trainer.precision=auto"])
    run.execute()
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    (tracked,) = [
        r
        for r in client.search_runs([e.experiment_id for e in client.search_experiments()])
        if r.data.tags.get("run_dir") == str(run.run_dir.resolve())
    ]
    params = tracked.data.params
    assert params["precision_auto.choice"] == BF16 and params["system.precision"] == BF16
    assert params["precision_auto.fp32_ms_per_step"] == "30" and params["precision_auto.bf16_ms_per_step"] == "15"
    assert float(params["precision_auto.fp32_loss"]) > 0 and params["trainer.precision"] == "auto"


def test_other_ranks_take_the_launching_process_choice(monkeypatch):
    def no_probe(*args, **kwargs):
        raise AssertionError("a rank Lightning launched must not probe")

    monkeypatch.setattr(probe_module, "probe_run", no_probe)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv(PRECISION_VARIABLE, BF16)
    assert resolve_auto_precision(None, None, {}).precision == BF16
    # Ranks started by torchrun have no launching process to ask: refused in one line.
    monkeypatch.delenv(PRECISION_VARIABLE)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")
    with pytest.raises(ConfigError, match="torchrun"):
        resolve_auto_precision(None, None, {})


def test_the_probe_verb_prints_the_line_and_makes_no_run(tiny_corpus: Path, tmp_path: Path, monkeypatch, capsys):
    bf16_units(monkeypatch, False)
    assert "probe: " in DESCRIPTION  # listed by lmexp --help
    main(["probe", "--config", str(tiny_config(tmp_path, tiny_corpus)), "--steps", "2", "--warmup_steps", "1"])
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("precision auto on cpu: 32-true ") and out[-1].endswith("-> 32-true")
    assert "ms/step" in out[-1] and "no bf16 units" in out[-1]
    assert not (tmp_path / "runs").exists()


def test_bad_probe_input_is_one_line(tiny_corpus: Path, tmp_path: Path, capsys):
    config = str(tiny_config(tmp_path, tiny_corpus))
    for argv, expected in [
        (["probe", "--config", config, "--steps", "0"], "error: --steps=0 must be a positive integer"),
        (["probe", "--config", config, "--trainer.precision", "fast"], "error: --trainer.precision: expected"),
        (["fit", "--config", config, "--trainer.precision", "fast"], "error: --trainer.precision: expected"),
    ]:
        with pytest.raises(SystemExit) as stop:
            main(argv)
        err = capsys.readouterr().err
        assert stop.value.code == 2 and err.startswith(expected) and len(err.strip().splitlines()) == 1, err
