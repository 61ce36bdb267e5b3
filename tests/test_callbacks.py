from pathlib import Path

import lightning.pytorch as pl

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
    assert "sample after 4 steps ---\nthe " in caplog.text
