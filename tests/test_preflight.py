"""Settings that need no data fail before the data is prepared: a large corpus takes long to tokenize."""

from pathlib import Path

import pytest

from lmexp.data.datamodule import TextDataModule
from tests.conftest import make_corpus
from tests.helpers import one_line_error

ROOT = Path(__file__).resolve().parents[1]


def fit(source: Path, root: Path, *extra: str) -> list[str]:
    return [
        "fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), f"--data.source={source}",
        "--trainer.val_check_interval=1", "--trainer.limit_val_batches=1", f"--trainer.default_root_dir={root}",
        "--trainer.enable_progress_bar=false", *extra,
    ]


@pytest.fixture
def prepared(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The data module's preparation, recorded as it runs (still done)."""
    calls: list[str] = []
    for hook in ("prepare_data", "setup"):
        original = getattr(TextDataModule, hook)

        def recorded(self, *args, _original=original, _hook=hook, **kwargs):
            calls.append(_hook)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(TextDataModule, hook, recorded)
    return calls


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--model.warmup_steps=50", "--trainer.max_steps=10"],
         "warmup_steps=50 is not below the 10 training steps: lower model.warmup_steps or train longer"),
        (["--model.warmup_steps=50", "--trainer.max_steps=100", "--model.max_steps=20"],
         "warmup_steps=50 is not below the 20 training steps"),
        (["--trainer.max_steps=-1", "--trainer.max_epochs=-1"], "training has no end"),
    ],
    ids=["trainer-max-steps", "model-max-steps", "no-end"],
)
def test_a_schedule_that_cannot_fit_fails_before_the_token_cache_is_built(
    tmp_path, capsys, isolated_cache, prepared, extra, expected
):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(make_corpus(100))
    message = one_line_error(capsys, fit(corpus, tmp_path / "runs", *extra))
    assert expected in message
    assert prepared == []  # the data module was never asked to prepare
    assert not any(isolated_cache.rglob("*.bin")), "token ids were encoded before the error"
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("checkpoints"))


def test_a_length_that_comes_from_the_data_is_checked_once_the_data_is_ready(tmp_path, capsys, prepared):
    """With no step limit (one epoch), the number of steps is known only from the data."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(make_corpus(100))
    extra = ["--trainer.max_steps=-1", "--trainer.max_epochs=1", "--model.warmup_steps=100000"]
    message = one_line_error(capsys, fit(corpus, tmp_path / "runs", *extra))
    assert "warmup_steps=100000 is not below the" in message and "training steps" in message
    assert "prepare_data" in prepared



def test_a_data_setting_that_contradicts_the_model_fails_before_the_cache_is_built(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from lmexp.data.contract import DataContract
    from lmexp.errors import ConfigError

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(make_corpus(50))
    built: list[str] = []
    monkeypatch.setattr("lmexp.data.datamodule.build_token_cache", lambda *a, **k: built.append("build"))
    monkeypatch.setattr("lmexp.data.datamodule.prepare_token_cache", lambda *a, **k: built.append("prepare"))
    data = TextDataModule(source=str(corpus), block_size=512, cache_dir=str(tmp_path / "cache"))
    data.accept(DataContract(task="causal_lm", block_size=128))
    for step in (data.prepare_data, data.prepare_cache):
        with pytest.raises(ConfigError, match="data.block_size=512 exceeds the model's context of 128"):
            step()
    assert built == []
