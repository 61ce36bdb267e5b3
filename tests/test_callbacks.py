from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest

from lmexp import CausalLM, TextDataModule
from lmexp.callbacks import SampleText


def test_samples_once_per_step_under_gradient_accumulation(tiny_corpus: Path, cpu_trainer_kwargs: dict, caplog):
    caplog.set_level("INFO")
    trainer = pl.Trainer(
        max_steps=4, accumulate_grad_batches=3, limit_val_batches=0,
        callbacks=[SampleText(every_n_steps=2, prompt="the ", max_new_tokens=5)], **cpu_trainer_kwargs,
    )
    trainer.fit(CausalLM("gpt-tiny", warmup_steps=0), datamodule=TextDataModule(str(tiny_corpus), batch_size=2))
    assert caplog.text.count("sample at step 2") == 1 and caplog.text.count("sample at step 4") == 1
    assert "sample at step 4 ---\nthe " in caplog.text
    assert "sample after" not in caplog.text  # the step-4 sample is the final one: printed once
    saved = (Path(trainer.log_dir) / "samples.txt").read_text()
    assert saved.count("--- sample") == 2 and "--- sample at step 4 ---\nthe " in saved


def test_tokens_per_second_reaches_the_logger_at_every_logging_step(tiny_corpus: Path, tmp_path: Path):
    import csv

    from lightning.pytorch.loggers import CSVLogger

    trainer = pl.Trainer(
        accelerator="cpu", max_steps=12, log_every_n_steps=3, val_check_interval=5, limit_val_batches=1,
        check_val_every_n_epoch=None, logger=CSVLogger(str(tmp_path)), enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    objective = CausalLM("gpt-tiny", warmup_steps=0)
    trainer.fit(objective, datamodule=TextDataModule(str(tiny_corpus), batch_size=2))
    rows = list(csv.DictReader(next(tmp_path.rglob("metrics.csv")).read_text().splitlines()))
    rates = [float(r["train/tokens_per_sec"]) for r in rows if r.get("train/tokens_per_sec")]
    assert len(rates) == 4 and all(rate > 0 for rate in rates)  # steps 3, 6, 9, 12
    assert len(set(rates)) == 4  # each a fresh measurement, also right after the validation at step 5


def test_training_metrics_are_logged_only_on_logging_steps(tiny_corpus: Path, tmp_path: Path, monkeypatch):
    """Each self.log costs ~1 ms and a host read-back: between logging steps none is made."""
    import csv

    from lightning.pytorch.loggers import CSVLogger

    calls: list[tuple[str, int]] = []
    original = CausalLM.log

    def counting_log(self, name, *args, **kwargs):
        if name.startswith("train/"):
            calls.append((name, self.trainer.global_step))
        return original(self, name, *args, **kwargs)

    monkeypatch.setattr(CausalLM, "log", counting_log)
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=10, log_every_n_steps=4, limit_val_batches=0, logger=CSVLogger(str(tmp_path)),
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(CausalLM("gpt-tiny", warmup_steps=0), datamodule=TextDataModule(str(tiny_corpus), batch_size=2))
    loss_steps = [step for name, step in calls if name == "train/loss"]
    assert loss_steps == [3, 7]  # global_step before steps 4 and 8, the steps Lightning writes
    rows = list(csv.DictReader(next(tmp_path.rglob("metrics.csv")).read_text().splitlines()))
    logged = [int(r["step"]) for r in rows if r.get("train/loss")]
    assert logged == [3, 7]


def test_progress_bar_reads_metrics_only_on_logging_steps(tiny_corpus: Path, monkeypatch):
    """Reading logged tensors back is a device sync: the bar must not do it every batch."""
    from lmexp.callbacks import StepProgressBar

    # Every read of the logged values for the bar goes through Trainer.progress_bar_metrics (it
    # turns them into numbers): count those reads, and let each one happen.
    reads: list[tuple[int, set[str]]] = []
    read = pl.Trainer.progress_bar_metrics.fget

    def counted(trainer):
        metrics = read(trainer)
        reads.append((trainer.global_step, set(metrics)))
        return metrics

    monkeypatch.setattr(pl.Trainer, "progress_bar_metrics", property(counted))
    bar = StepProgressBar()
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=10, log_every_n_steps=4, limit_val_batches=0, logger=False, callbacks=[bar],
        enable_checkpointing=False, enable_model_summary=False,
    )
    trainer.fit(CausalLM("gpt-tiny", warmup_steps=0), datamodule=TextDataModule(str(tiny_corpus), batch_size=2))
    assert [step for step, _ in reads] == [4, 8, 10]  # after the batches whose metrics were logged, and once at the end
    assert {"train/loss", "train/tokens_per_sec"} <= reads[0][1]  # this step's values, not the last interval's


def test_tokens_per_second_with_gradient_accumulation_spans_whole_windows(tiny_corpus: Path, monkeypatch):
    """The rate is logged once per logged optimizer step, over all its micro-batches."""
    logged: list[tuple[int, float]] = []
    original = CausalLM.log

    def recording_log(self, name, value, *args, **kwargs):
        if name == "train/tokens_per_sec":
            logged.append((self.trainer.global_step, value))
        return original(self, name, value, *args, **kwargs)

    monkeypatch.setattr(CausalLM, "log", recording_log)
    clock = iter(range(1000))
    monkeypatch.setattr("lmexp.objectives.throughput.time", SimpleNamespace(perf_counter=lambda: float(next(clock))))
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=6, accumulate_grad_batches=2, log_every_n_steps=3, limit_val_batches=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(CausalLM("gpt-tiny", warmup_steps=0), datamodule=TextDataModule(str(tiny_corpus), batch_size=2))
    tokens_per_batch = 2 * 32  # batch 2 x gpt-tiny's block of 32
    # The clock ticks once per read: at the end of the first batch (t=0), then as each logged
    # optimizer step starts, before its first micro-batch (batches 5 and 11): the windows hold
    # batches 2-4 (1 tick) and 5-10 (1 tick), whole accumulation windows only.
    assert [step for step, _ in logged] == [2, 5]
    assert [float(rate) for _, rate in logged] == [3 * tokens_per_batch, 6 * tokens_per_batch]


def test_plain_progress_prints_a_line_per_logging_interval(tiny_corpus: Path):
    """Without a terminal (a pipe, nohup, a scheduler's log) progress still shows as it happens."""
    import io

    from lmexp.callbacks import PlainProgress

    out = io.StringIO()
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=10, log_every_n_steps=4, val_check_interval=5, limit_val_batches=1,
        check_val_every_n_epoch=None, logger=False, callbacks=[PlainProgress(stream=out)],
        enable_checkpointing=False, enable_model_summary=False,
    )
    trainer.fit(CausalLM("gpt-tiny", warmup_steps=0), datamodule=TextDataModule(str(tiny_corpus), batch_size=2))
    lines = out.getvalue().splitlines()
    steps = [line for line in lines if line.startswith("step ")]
    assert [line.split(" | ")[0] for line in steps] == ["step 4/10", "step 8/10"]
    assert all(" | loss " in line and " tok/s " in line and " | eta " in line for line in steps)
    assert [line.split(":")[0] for line in lines if line.startswith("validation")] == [
        "validation at step 5", "validation at step 10"
    ]
    assert "val/loss" in lines[-2] and lines[-1].startswith("training ended at step 10 after ")


def test_progress_bar_metrics_fit_in_80_columns(tiny_corpus: Path, monkeypatch):
    import io

    import rich

    from lmexp.callbacks import StepProgressBar

    # Lightning reconfigures Rich's global console with the bar's console_kwargs: give this test
    # a console of its own, so later output does not land in this test's buffer.
    monkeypatch.setattr(rich, "_console", None)

    screen = io.StringIO()
    bar = StepProgressBar(console_kwargs={"file": screen, "width": 80, "force_terminal": True, "color_system": None})
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=6, log_every_n_steps=2, val_check_interval=3, limit_val_batches=1,
        check_val_every_n_epoch=None, logger=False, callbacks=[bar], enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(CausalLM("gpt-tiny", warmup_steps=0), datamodule=TextDataModule(str(tiny_corpus), batch_size=2))
    drawn = screen.getvalue()
    assert "tok/s: " in drawn and "val_loss: " in drawn and "…" not in drawn


def test_a_sample_prompt_with_unknown_characters_warns_once(tiny_corpus: Path, cpu_trainer_kwargs: dict):
    trainer = pl.Trainer(
        max_steps=4, limit_val_batches=0,
        callbacks=[SampleText(every_n_steps=2, prompt="the \u00e9", max_new_tokens=3)], **cpu_trainer_kwargs,
    )
    with pytest.warns(UserWarning, match="not in the tokenizer's vocabulary.*'\u00e9'") as caught:
        trainer.fit(CausalLM("gpt-tiny", warmup_steps=0), datamodule=TextDataModule(str(tiny_corpus), batch_size=2))
    assert sum("vocabulary" in str(w.message) for w in caught) == 1  # not once per sample
