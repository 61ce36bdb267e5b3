"""Evaluating a saved checkpoint in a later command: the command's evaluation settings apply, and
a network or objective setting that contradicts the checkpoint is refused in one line."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest

from lmexp.cli import main
from lmexp.runs import build
from tests.conftest import make_corpus
from tests.test_bad_input import one_line_error

TINY = """\
# A tiny GPT trained for a few steps, then evaluated by later commands.
seed_everything: 0
trainer:
  accelerator: cpu
  max_steps: 4
  val_check_interval: 2
  limit_val_batches: 2
  check_val_every_n_epoch: null
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
  default_root_dir: {root}
model:
  class_path: lmexp.CausalLM
  init_args:
    network: gpt-tiny
    warmup_steps: 0
    continuation_prompt_tokens: 8
    continuation_tokens: 8
data:
  class_path: lmexp.TextDataModule
  init_args:
    source: {corpus}
    batch_size: 4
    test_fraction: 0.2
    cache_dir: {cache}
"""


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny config whose run has been trained (``--ckpt_path best`` finds its checkpoint)."""
    folder = tmp_path_factory.mktemp("evaluated")
    (folder / "corpus.txt").write_text(make_corpus())
    path = folder / "tiny.yaml"
    path.write_text(TINY.format(root=folder / "runs", corpus=folder / "corpus.txt", cache=folder / "cache"))
    main(["fit", "--config", str(path)])
    return path


def printed_metrics(printed: str) -> dict[str, float]:
    """The test metrics of the results table Lightning prints."""
    return {name: float(value) for name, value in re.findall(r"│\s*(test/\w+)\s*│\s*([-0-9.e]+)\s*│", printed)}


def test_the_readme_bleu_rouge_command_scores_continuations_of_a_saved_checkpoint(config: Path, capsys):
    capsys.readouterr()
    main(["test", "--config", str(config), "--ckpt_path", "best", "--model.continuation_passages", "4"])
    scored = printed_metrics(capsys.readouterr().out)
    assert {"test/loss", "test/bleu", "test/rougeL"} <= set(scored), scored
    assert 0 <= scored["test/bleu"] <= 1 and 0 <= scored["test/rougeL"] <= 1


@pytest.mark.parametrize("verb", ["validate", "test"])
def test_an_evaluation_takes_the_commands_settings_and_the_checkpoints_network(config: Path, verb: str):
    run = build(verb, configs=[config], ckpt_path="best", args=[
        "--model.continuation_passages=3", "--model.continuation_tokens=6", "--model.lr=0.5",
        "--model.network_overrides.dropout=0.3",  # changes nothing the trained weights compute
        "--model.pretrained=never-read.ckpt",  # the checkpoint's weights replace a pretrained start
        "--data.eval_stride=8", "--data.batch_size=2",
    ])
    hparams = run.model.hparams
    assert (hparams.continuation_passages, hparams.continuation_tokens, hparams.continuation_prompt_tokens) == (3, 6, 8)
    assert hparams.lr == 0.5  # unused by an evaluation, but as the run's config.yaml records it
    assert hparams.pretrained is None and run.model.network_config.n_layer == 2
    assert run.model.network_config.vocab_size is not None  # the checkpoint's, before any data is read
    assert (run.datamodule.eval_stride, run.datamodule.batch_size) == (8, 2)


@pytest.mark.parametrize(
    ("flag", "refusal", "fix"),
    [
        ("--model.network_overrides.n_layer=3", "model.network_overrides.n_layer=3 does not match the checkpoint",
         "whose network has n_layer=2: evaluating a checkpoint keeps the network"),
        ("--model.network_overrides.n_embd=64", "model.network_overrides.n_embd=64 does not match the checkpoint",
         "whose network has n_embd=32: evaluating a checkpoint keeps the network"),
        ("--model.network=gpt-nano", "model.network='gpt-nano' (n_layer=4) does not match the checkpoint",
         "whose network has n_layer=2: evaluating a checkpoint keeps the network"),
        ("--model=lmexp.MaskedLM", "model lmexp.MaskedLM cannot evaluate the checkpoint",
         "which holds a lmexp.CausalLM: use --model lmexp.CausalLM"),
    ],
    ids=["n_layer", "n_embd", "preset", "objective"],
)
def test_a_setting_that_cannot_apply_to_the_checkpoint_is_refused_in_one_line(config: Path, capsys, flag: str,
                                                                               refusal: str, fix: str):
    root = config.parent / "runs"
    before = sorted(root.iterdir())
    message = one_line_error(capsys, ["test", "--config", str(config), "--ckpt_path", "best", flag])
    assert refusal in message and fix in message and "best.ckpt" in message
    assert sorted(root.iterdir()) == before  # no evaluation run folder was made


def test_a_resumed_fit_follows_the_schedule_length_the_command_states(tmp_path: Path):
    """The warning on a changed trainer.max_steps advises --model.max_steps: on resume that flag
    must reach the objective, not be replaced by the checkpoint's saved value."""
    (tmp_path / "corpus.txt").write_text(make_corpus())
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY.format(root=tmp_path / "runs", corpus=tmp_path / "corpus.txt", cache=tmp_path / "cache"))
    main(["fit", "--config", str(path)])
    with pytest.warns(UserWarning, match="the LR schedule was 4 steps long and is now 6"):
        build("fit", configs=[path], ckpt_path="last", args=["--trainer.max_steps=6"]).execute()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = build("fit", configs=[path], ckpt_path="last", args=["--trainer.max_steps=8", "--model.max_steps=6"])
        run.execute()
    assert run.model.hparams.max_steps == 6 and run.model._schedule_steps == 6
    assert run.trainer.global_step == 8
    assert not [w for w in caught if "LR schedule was" in str(w.message)]


def test_a_resumed_fit_may_state_the_other_warmup_setting(tmp_path: Path):
    """warmup_steps and warmup_fraction are exclusive: the one a resume states replaces the other
    saved in the checkpoint, rather than failing on both being set."""
    (tmp_path / "corpus.txt").write_text(make_corpus())
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY.format(root=tmp_path / "runs", corpus=tmp_path / "corpus.txt", cache=tmp_path / "cache")
                    .replace("    warmup_steps: 0\n", ""))
    main(["fit", "--config", str(path), "--model.warmup_fraction=0.5"])
    run = build("fit", configs=[path], ckpt_path="last", args=["--trainer.max_steps=6", "--model.max_steps=6",
                                                               "--model.warmup_steps=1"])
    assert (run.model.hparams.warmup_steps, run.model.hparams.warmup_fraction) == (1, None)
