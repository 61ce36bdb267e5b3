"""Every bad input gets a one-line error naming the problem and the fix, and exit status 2."""

from pathlib import Path

import pytest
import torch

from lmexp.cli import main
from tests.conftest import make_corpus
from tests.helpers import one_line_error

ROOT = Path(__file__).resolve().parents[1]


def fit(source: str, root: Path, *extra: str) -> list[str]:
    return [
        "fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), f"--data.source={source}",
        "--trainer.max_steps=2", "--trainer.val_check_interval=1", "--trainer.limit_val_batches=1",
        "--model.warmup_steps=1", f"--trainer.default_root_dir={root}", "--trainer.enable_progress_bar=false",
        *extra,
    ]


def test_missing_path(tmp_path, capsys):
    message = one_line_error(capsys, fit(str(tmp_path / "missing.txt"), tmp_path))
    assert "missing.txt' does not exist: pass an existing file" in message


def test_empty_corpus_after_cleaning(tmp_path, capsys):
    path = tmp_path / "c.txt"
    path.write_text(make_corpus(20))
    message = one_line_error(capsys, fit(str(path), tmp_path, "--data.min_chars=100000"))
    assert "empty after cleaning" in message and "lower data.min_chars" in message


def test_binary_input_names_file_and_offset(tmp_path, capsys):
    path = tmp_path / "b.txt"
    path.write_bytes(b"hello\n\x00\x01\x02")
    message = one_line_error(capsys, fit(str(path), tmp_path))
    assert str(path) in message and "NUL byte at offset 6" in message


def test_non_utf8_input_names_file_and_offset(tmp_path, capsys):
    path = tmp_path / "latin.txt"
    path.write_bytes("na\u00efve text\n".encode("latin-1"))
    message = one_line_error(capsys, fit(str(path), tmp_path))
    assert str(path) in message and "offset 2" in message and "iconv" in message


def test_corpus_shorter_than_one_block(tmp_path, capsys):
    path = tmp_path / "short.txt"
    path.write_text("\n\n".join(f"line {i} of a short text" for i in range(30)))
    message = one_line_error(capsys, fit(str(path), tmp_path))
    assert "fewer than one sample of 129" in message and "smaller block_size" in message


def test_unknown_preset_lists_the_valid_ones(tmp_path, capsys):
    message = one_line_error(capsys, fit("python-docs", tmp_path, "--model.network=gpt-huge"))
    assert "gpt-huge" in message and "gpt-nano" in message


def test_checkpoint_with_another_tokenizer(tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text(make_corpus(300))
    main(fit(str(corpus), tmp_path))
    capsys.readouterr()
    other = tmp_path / "other.txt"
    other.write_text("completely different alphabet: XYZ 0123456789 @#$%\n\n" * 5 + make_corpus(300, seed=3).upper())
    message = one_line_error(capsys, fit(str(other), tmp_path, "--ckpt_path=last"))
    assert "use the data settings the checkpoint was trained with" in message

    wrong = tmp_path / "wrong.json"
    from lmexp.data import train_tokenizer

    train_tokenizer(["abc"], "char", special_tokens=["[UNK]"]).save(str(wrong))
    message = one_line_error(
        capsys, ["generate", "--ckpt", str(tmp_path / "latest" / "checkpoints" / "last.ckpt"), "--tokenizer", str(wrong)]
    )
    assert "tokens but the checkpoint's model has vocab_size=" in message


def test_prompt_longer_than_the_context(tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text(make_corpus(300))
    main(fit(str(corpus), tmp_path))
    capsys.readouterr()
    message = one_line_error(
        capsys, ["generate", "--ckpt", str(tmp_path / "latest" / "checkpoints" / "last.ckpt"), "--prompt", "the cat " * 40]
    )
    assert "prompt has 320 tokens but the model's context is block_size=128: shorten the prompt" in message
    message = one_line_error(
        capsys, ["generate", "--ckpt", str(tmp_path / "latest" / "checkpoints" / "last.ckpt"), "--window_shift", "500"]
    )
    assert "window_shift=500 exceeds the model's context block_size=128" in message


def test_missing_checkpoint(tmp_path, capsys):
    message = one_line_error(capsys, ["generate", "--ckpt", str(tmp_path / "none.ckpt")])
    assert "does not exist" in message


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--data.block_size=512"], "data.block_size=512 exceeds the model's context of 128 tokens"),
        (["--model.network_overrides={vocab_size: 5}"], "model's vocab_size=5 is smaller than the tokenizer's"),
        (["--trainer.max_steps=-1", "--trainer.max_epochs=-1"], "training has no end"),
    ],
)
def test_inconsistent_sizes_and_unbounded_training(tmp_path, capsys, extra, expected):
    corpus = tmp_path / "c.txt"
    corpus.write_text(make_corpus(300))
    assert expected in one_line_error(capsys, fit(str(corpus), tmp_path, *extra))


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--data.mlm_probability=1.5"], "data.mlm_probability=1.5 must be in (0, 1)"),
        (["--model.network_overrides={block_size: 3}"], "block_size=3 leaves no room for text"),
    ],
)
def test_masked_lm_settings(tmp_path, capsys, extra, expected):
    corpus = tmp_path / "c.txt"
    corpus.write_text(make_corpus(300))
    argv = [
        "fit", "--config", str(ROOT / "configs" / "bert_mlm.yaml"), f"--data.source={corpus}",
        "--trainer.max_steps=2", "--model.warmup_steps=1", f"--trainer.default_root_dir={tmp_path}",
        "--trainer.enable_progress_bar=false", *extra,
    ]
    assert expected in one_line_error(capsys, argv)


def test_foreign_export_folder(tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"format": 7}')
    message = one_line_error(capsys, ["generate", "--ckpt", str(tmp_path)])
    assert "is not an lmexp export" in message
    # A transformers config.json makes it a Hugging Face folder, which needs its weights.
    (tmp_path / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"]}')
    message = one_line_error(capsys, ["generate", "--ckpt", str(tmp_path)])
    assert "has no weights (model.safetensors, pytorch_model.bin or their shard indexes)" in message


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"tokenizer": "sentencepiece"}, "data.tokenizer='sentencepiece' is not supported: choose one of char, bpe, wordpiece"),
        ({"normalization": "NFD"}, "data.normalization='NFD' is not supported: choose one of NFC, NFKC, none"),
        ({"dedupe": "line"}, "data.dedupe='line' is not supported: choose one of documents, lines, none"),
        ({"task": "mlm"}, "data.task='mlm' is not supported: choose one of causal_lm, masked_lm"),
        ({"block_size": 0}, "data.block_size=0 must be a positive integer"),
        ({"vocab_size": 0}, "data.vocab_size=0 must be a positive integer"),
        ({"num_workers": -1}, "data.num_workers=-1 is negative"),
    ],
)
def test_data_settings_are_checked_before_any_work(settings, expected):
    from lmexp.data import TextDataModule
    from lmexp.errors import ConfigError

    with pytest.raises(ConfigError) as raised:
        TextDataModule("does-not-matter.txt", **settings)
    assert expected in str(raised.value) and "\n" not in str(raised.value)


def _tiny_export(folder):
    import json

    from lmexp.checkpoints import export_safetensors
    from lmexp.data import train_tokenizer
    from lmexp.models import GPT, from_name

    config = from_name("gpt-tiny", vocab_size=20)
    tokenizer = train_tokenizer(["abcdefghij klmnop"], "char", special_tokens=["[UNK]"])
    export_safetensors(GPT(config), config, folder, tokenizer)
    return folder / "config.json", json.loads((folder / "config.json").read_text())


def test_edited_or_broken_exports(tmp_path, capsys):
    import json

    config_file, meta = _tiny_export(tmp_path / "export")
    config_file.write_text(json.dumps({**meta, "model": {**meta["model"], "n_layers": 2}}))
    message = one_line_error(capsys, ["generate", "--ckpt", str(tmp_path / "export")])
    assert "has a model config lmexp cannot use" in message and "n_layers" in message

    config_file.write_text(json.dumps({**meta, "model": {**meta["model"], "n_embd": 64}}))
    message = one_line_error(capsys, ["generate", "--ckpt", str(tmp_path / "export")])
    assert "holds weights that do not fit its model config" in message

    config_file.write_text("{not json")
    assert "is not valid JSON" in one_line_error(capsys, ["generate", "--ckpt", str(tmp_path / "export")])


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--num_samples", "0"], "num_samples=0 must be at least 1"),
        (["--device", "gpu"], "device='gpu' is not a device name: use cpu or cuda"),
    ],
)
def test_generate_settings(tmp_path, capsys, extra, expected):
    _tiny_export(tmp_path / "export")
    assert expected in one_line_error(capsys, ["generate", "--ckpt", str(tmp_path / "export"), *extra])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_generate_on_cuda_without_a_gpu(tmp_path, capsys):
    _tiny_export(tmp_path / "export")
    message = one_line_error(capsys, ["generate", "--ckpt", str(tmp_path / "export"), "--device", "cuda"])
    assert "no usable CUDA GPU: use --device cpu" in message


def _bad_checkpoint(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"{kind}.ckpt"
    if kind == "truncated":
        torch.save({"global_step": 3, "state_dict": {"w": torch.zeros(1000)}}, path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "random":
        path.write_bytes(bytes(range(256)) * 8)
    elif kind == "pickle":
        torch.save({"module": torch.nn.Linear(2, 2)}, path)  # loads only by running pickled code
    return path


@pytest.mark.parametrize("verb", ["fit", "validate", "test"])
@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("missing", "does not exist"),
        ("truncated", "is truncated or not a checkpoint"),
        ("random", "is truncated or not a checkpoint"),
        ("pickle", "could not be read safely (UnpicklingError: Weights only load failed)"),
    ],
)
def test_bad_ckpt_path(tmp_path, capsys, verb, kind, expected):
    path = _bad_checkpoint(tmp_path, kind)
    argv = [verb, "--config", str(ROOT / "configs" / "quickstart.yaml"), f"--trainer.default_root_dir={tmp_path}",
            "--ckpt_path", str(path)]
    message = one_line_error(capsys, argv)
    assert f"{path}' {expected}" in message and "pass" in message
    assert "In PyTorch 2.6" not in message  # torch's paragraph about weights_only stays out


@pytest.mark.parametrize("kind", ["random", "pickle"])
def test_generate_on_a_file_that_is_not_a_checkpoint(tmp_path, capsys, kind):
    path = _bad_checkpoint(tmp_path, kind)
    message = one_line_error(capsys, ["generate", "--ckpt", str(path)])
    assert str(path) in message and "pass a .ckpt written by lmexp" in message and "In PyTorch 2.6" not in message


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--model.lr", "abc"], "--model.lr: expected float, got 'abc' (see lmexp fit --help)"),
        (["--data.batch_size", "x"], "--data.batch_size: expected int, got 'x'"),
        (["--model.optimizer", "sgd"], "--model.optimizer: expected one of 'adamw', 'adamw8bit', 'muon', got 'sgd'"),
        (["--trainer.max_stepz", "5"], "unrecognized arguments: --trainer.max_stepz 5 (see lmexp fit --help)"),
        # Lightning's own check of a trainer setting, raised as the Trainer is built.
        (["--trainer.max_steps", "-5"], "`max_steps` must be a non-negative integer or -1"),
    ],
)
def test_bad_flags_are_one_line(tmp_path, capsys, flags, expected):
    argv = ["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), f"--trainer.default_root_dir={tmp_path}", *flags]
    assert expected in one_line_error(capsys, argv)
    assert "usage:" not in capsys.readouterr().err


def test_generate_flags_are_one_line(tmp_path, capsys):
    message = one_line_error(capsys, ["generate", "--ckpt", "x", "--max_new_tokens", "abc"])
    assert message == "error: --max_new_tokens: expected int, got 'abc' (see lmexp generate --help)"


def test_a_user_error_is_reported_by_rank_zero_only(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")  # what Lightning's launcher sets in the second process
    with pytest.raises(SystemExit) as exit_info:
        main(fit(str(tmp_path / "missing.txt"), tmp_path))
    assert exit_info.value.code == 2 and capsys.readouterr().err == ""


def test_unknown_prompt_characters_are_named(tmp_path, capsys):
    _tiny_export(tmp_path / "export")
    main(["generate", "--ckpt", str(tmp_path / "export"), "--prompt", "ab\u00e9c\u2014", "--max_new_tokens", "3"])
    err = capsys.readouterr().err
    assert "warning: prompt 'ab\u00e9c\u2014'" in err and "'\u00e9', '\u2014'" in err and "not in the tokenizer's vocabulary" in err


def test_check_validates_a_run_without_making_it(tmp_path, monkeypatch):
    from lmexp.errors import ConfigError
    from lmexp.runs import check

    monkeypatch.chdir(tmp_path)
    config = check("fit", [ROOT / "configs" / "quickstart.yaml"], {"model.init_args.lr": 1e-3})
    assert config["model"]["init_args"]["lr"] == 1e-3 and config["data"]["init_args"]["source"] == "python-docs"
    with pytest.raises(ConfigError, match="has no option 'lrx'"):
        check("fit", [ROOT / "configs" / "quickstart.yaml"], {"model.init_args.lrx": 1e-3})
    # What only the classes check (the network's fields) is checked too, as one line.
    with pytest.raises(ConfigError) as caught:
        check("fit", [ROOT / "configs" / "quickstart.yaml"], {"model.init_args.network_overrides.n_head": 3})
    assert str(caught.value) == "n_embd=128 is not divisible by n_head=3: choose n_embd as a multiple of n_head"
    assert list(tmp_path.iterdir()) == []  # no run folder, no tracking store
