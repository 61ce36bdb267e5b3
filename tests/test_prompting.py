"""Prompt-based classification: exact verbalizer scoring, demonstrations, calibration, CLI."""

from __future__ import annotations

import csv
import json
import string
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import Tensor, nn

from lmexp.checkpoints import export_safetensors
from lmexp.data.classification import Examples
from lmexp.data.tokenizer import train_tokenizer
from lmexp.errors import CheckpointError, ConfigError
from lmexp.models import BERT, GPT, build_model, from_name
from lmexp.prompting import (
    PromptSpec,
    choose_demonstrations,
    classify,
    score_continuations,
)
from lmexp.verbs.prompt import run_prompt

ALPHABET = string.ascii_letters + string.digits + " .,:;!?/\n'-"
YES_NO = {"pos": " yes", "neg": " no"}


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([ALPHABET], "char")  # no [UNK]: unseen characters vanish


def random_network(tokenizer, arch: str = "gpt", seed: int = 0) -> nn.Module:
    """A tiny untrained network with peaked next-token distributions, so positions matter."""
    torch.manual_seed(seed)
    vocab = tokenizer.get_vocab_size()
    if arch == "lstm":
        model = build_model(from_name("lstm-small", vocab_size=vocab, n_layer=1, n_embd=32, block_size=64))
    else:
        position = "rotary" if arch == "gpt-rotary" else "learned"
        model = GPT(from_name("gpt-tiny", vocab_size=vocab, block_size=64, position=position))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.3)
    return model.eval()


class BigramStub(nn.Module):
    """A causal 'language model' whose continuation is known: after ':' comes ' ', then 'y'es or
    'n'o depending on the '!' (for yes) and '?' (for no) read so far, plus a fixed bias to yes."""

    accepts_attention_mask = True

    def __init__(self, tokenizer, bias: float = 0.0, block_size: int = 200) -> None:
        super().__init__()
        self.config = SimpleNamespace(arch="gpt", block_size=block_size, vocab_size=tokenizer.get_vocab_size())
        self.ids = {c: tokenizer.token_to_id(c) for c in ALPHABET}
        vocab = tokenizer.get_vocab_size()
        table = torch.zeros(vocab, vocab)
        for before, after in [(":", " "), ("y", "e"), ("e", "s"), ("n", "o")]:
            table[self.ids[before], self.ids[after]] = 20.0
        self.register_buffer("table", table)
        self.bias = bias
        self.calls: list[tuple[int, ...]] = []
        self.masks: list[Tensor] = []

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        self.calls.append(tuple(input_ids.shape))
        if attention_mask is not None:
            self.masks.append(attention_mask)
        real = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
        mood = ((input_ids == self.ids["!"]) & real).cumsum(1) - ((input_ids == self.ids["?"]) & real).cumsum(1)
        logits = self.table[input_ids].clone()
        after_space = input_ids == self.ids[" "]
        logits[..., self.ids["y"]] += torch.where(after_space, self.bias + 3.0 * mood, torch.zeros_like(mood)).float()
        return logits


def brute_force(model: nn.Module, prompt: list[int], continuation: list[int], shift: int = 0) -> float:
    """log p(continuation | prompt), one unpadded sequence; shift=1 is the classic off-by-one."""
    ids = torch.tensor([prompt + continuation])
    with torch.no_grad():
        log_probs = model(ids)[0].float().log_softmax(-1)
    return sum(float(log_probs[len(prompt) - 1 + k + shift, token]) for k, token in enumerate(continuation))


def write_table(path: Path, rows: list[tuple[str, str]], header: tuple[str, str] = ("sentence", "label")) -> Path:
    path.write_text("\t".join(header) + "\n" + "".join(f"{t}\t{l}\n" for t, l in rows), encoding="utf-8")
    return path


# ------------------------------------------------------------------- (1) exact scoring
@pytest.mark.parametrize("arch", ["gpt", "gpt-rotary", "lstm"])
def test_batched_scores_equal_unbatched_log_probabilities(tokenizer, arch: str) -> None:
    model = random_network(tokenizer, arch)
    texts = ["ok", "this one is a good deal longer than the others", "mid length text", "x"]
    verbalizers = {"a": " no", "b": " absolutely", "c": " maybe so"}  # 3, 11 and 9 tokens
    examples = Examples(texts, None, None)
    spec = PromptSpec(template="Q: {text}\nA:", verbalizers=verbalizers)
    result = classify(model, tokenizer, examples, spec, batch_size=5)  # 12 rows, mixed lengths per batch
    names = result.label_names
    encode = lambda s: tokenizer.encode(s, add_special_tokens=False).ids
    expected = torch.tensor([
        [brute_force(model, encode(result.prompts[i]), encode(verbalizers[n])) for n in names]
        for i in range(len(texts))
    ])
    shifted = torch.tensor([
        [brute_force(model, encode(result.prompts[i]), encode(verbalizers[n]), shift=-1) for n in names]
        for i in range(len(texts))
    ])
    assert result.prompts[0] == "Q: ok\nA:"
    torch.testing.assert_close(result.scores, expected, atol=1e-4, rtol=1e-5)
    assert (result.scores - shifted).abs().max() > 0.1  # an off-by-one would not pass
    assert result.scores.std() > 0.5  # the labels really score differently
    torch.testing.assert_close(result.probabilities, expected.softmax(-1), atol=1e-4, rtol=1e-4)

    normalized = classify(model, tokenizer, examples, PromptSpec("Q: {text}\nA:", verbalizers, length_normalize=True))
    lengths = torch.tensor([len(encode(verbalizers[n])) for n in names], dtype=torch.float32)
    torch.testing.assert_close(normalized.scores, expected / lengths, atol=1e-4, rtol=1e-5)


def test_score_continuations_does_not_depend_on_batch_size(tokenizer) -> None:
    model = random_network(tokenizer)
    rows = [([5, 6, 7], [8]), ([9], [10, 11, 12, 13]), ([1, 2, 3, 4, 5, 6], [7, 8])]
    one_by_one = torch.cat([score_continuations(model, [row], batch_size=1) for row in rows])
    torch.testing.assert_close(score_continuations(model, rows, batch_size=3), one_by_one, atol=1e-4, rtol=1e-5)


# ------------------------------------------------------------ (2) known continuation
@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_stub_with_known_continuation_classifies_as_expected(tokenizer, batch_size: int) -> None:
    model = BigramStub(tokenizer)
    texts = ["great!", "meh?", "wow, so good! really!", "bad? really? no", "fine!"]
    labels = ["pos", "neg", "pos", "neg", "pos"]
    result = classify(model, tokenizer, Examples(texts, None, labels), PromptSpec(verbalizers=YES_NO), batch_size=batch_size)
    assert result.predictions == labels
    assert result.label_names == ["neg", "pos"]  # alphabetical, as fine-tuning orders them
    truth = torch.tensor([result.label_names.index(label) for label in labels])
    assert (result.probabilities[torch.arange(5), truth] > 0.9).all()
    assert result.metrics["accuracy"] == 1.0 and result.metrics["macro_f1"] == 1.0
    assert result.metrics["confusion"] == [[2, 0], [0, 3]]
    assert result.n_truncated == 0
    assert sum(shape[0] for shape in model.calls) == 2 * len(texts)  # one row per (prompt, verbalizer)
    if batch_size > 1:  # rows of different lengths share a batch: left-padded, with the mask
        assert model.masks and all(bool(mask[:, -1].all()) for mask in model.masks)
        assert any(not bool(mask[:, 0].all()) for mask in model.masks)


class NoMaskStub(nn.Module):
    """A model from elsewhere: its forward takes no attention_mask, and it does not say so."""

    def __init__(self, tokenizer) -> None:
        super().__init__()
        self.inner = BigramStub(tokenizer)
        self.config = self.inner.config

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.inner(input_ids)


def test_a_model_that_does_not_say_it_takes_a_mask_is_scored_right_padded(tokenizer) -> None:
    model = NoMaskStub(tokenizer)
    texts = ["great!", "meh?", "wow, so good! really!", "bad? really? no"]
    labels = ["pos", "neg", "pos", "neg"]
    result = classify(model, tokenizer, Examples(texts, None, labels), PromptSpec(verbalizers=YES_NO), batch_size=8)
    assert result.predictions == labels
    assert len(model.inner.calls) == 1  # rows of different lengths in one batch, without a mask
    rows = [([5, 6, 7], [8]), ([9], [10, 11, 12, 13]), ([1, 2, 3, 4, 5, 6], [7, 8])]
    expected = torch.tensor([brute_force(model, list(p), list(c)) for p, c in rows])
    torch.testing.assert_close(score_continuations(model, rows, batch_size=3), expected, atol=1e-4, rtol=1e-5)


def test_metrics_per_class_precision_recall(tokenizer) -> None:
    texts = ["a!", "b!", "c?", "d!"]
    labels = ["pos", "neg", "neg", "pos"]  # "b!" is predicted pos but is neg
    result = classify(BigramStub(tokenizer), tokenizer, Examples(texts, None, labels), PromptSpec(verbalizers=YES_NO))
    metrics = result.metrics
    assert result.predictions == ["pos", "pos", "neg", "pos"]
    assert metrics["accuracy"] == pytest.approx(0.75)
    assert metrics["precision"] == pytest.approx({"neg": 1.0, "pos": 2 / 3})
    assert metrics["recall"] == pytest.approx({"neg": 0.5, "pos": 1.0})
    assert metrics["confusion"] == [[1, 1], [0, 2]]


# ------------------------------------------------------------ (3) demonstrations
def test_demonstrations_are_balanced_seeded_and_shuffled() -> None:
    labels = ["a"] * 10 + ["b"] * 3 + ["c"]
    picked = choose_demonstrations(labels, 6, seed=0)
    counts = Counter(labels[i] for i in picked)
    assert len(set(picked)) == 6 and counts["c"] == 1 and abs(counts["a"] - counts["b"]) <= 1
    even = ["x"] * 5 + ["y"] * 5
    for seed in range(5):
        assert Counter(even[i] for i in choose_demonstrations(even, 4, seed)) == {"x": 2, "y": 2}
    assert choose_demonstrations(labels, 6, seed=3) == choose_demonstrations(labels, 6, seed=3)
    draws = {tuple(choose_demonstrations(even, 4, seed)) for seed in range(10)}
    assert len(draws) > 3  # the seed matters
    orders = [[even[i] for i in draw] for draw in draws]
    assert any(order[k] == order[k + 1] for order in orders for k in range(3))  # not just labels taking turns
    assert any(order[0] != order[1] for order in orders)  # nor grouped by label
    assert sorted(choose_demonstrations(labels, 14, seed=1)) == list(range(14))
    with pytest.raises(ConfigError, match="shots=15 but the training file has 14"):
        choose_demonstrations(labels, 15, seed=0)


def test_truncation_drops_oldest_demonstrations_then_cuts_text_from_the_left(tokenizer) -> None:
    train = Examples(["ok!", "no?", "yes!", "bad?", "fine!", "poor?"], None, ["pos", "neg", "pos", "neg", "pos", "neg"])
    long_text = "lorem ipsum " * 8 + "end!"  # fits alone, not with every demonstration
    huge_text = "dolor sit amet " * 20 + "tail!"  # does not fit even alone
    examples = Examples(["short!", long_text, huge_text], None, ["pos", "pos", "pos"])
    spec = PromptSpec(verbalizers=YES_NO, shots=4, seed=1)
    model = BigramStub(tokenizer, block_size=200)
    result = classify(model, tokenizer, examples, spec, train_examples=train)

    demos = [spec.render(train.texts[i]) + spec.verbalizers[train.labels[i]] for i in result.demonstrations]
    assert len(demos) == 4 and Counter(train.labels[i] for i in result.demonstrations) == {"pos": 2, "neg": 2}
    assert result.prompts[0] == spec.separator.join([*demos, spec.render("short!")])
    assert result.truncated == [False, True, True] and result.n_truncated == 2
    # The long example keeps its whole text and the newest demonstrations that fit.
    kept = result.prompts[1].split(spec.separator)
    assert kept[-1] == spec.render(long_text) and 0 < len(kept) - 1 < 4 and kept[:-1] == demos[len(demos) - len(kept) + 1:]
    # The huge one has no demonstrations left and loses the start of its text, keeping the end.
    assert result.prompts[2].startswith("Review: ") and result.prompts[2].endswith("tail!\nSentiment:")
    kept_text = result.prompts[2][len("Review: "):-len("\nSentiment:")]
    assert huge_text.endswith(kept_text) and len(kept_text) < len(huge_text)
    for prompt in result.prompts:
        assert len(tokenizer.encode(prompt).ids) + len(" yes") <= 200
    assert len(tokenizer.encode(result.prompts[2]).ids) + len(" yes") == 200  # cut no more than needed
    assert result.predictions == ["pos", "pos", "pos"]
    # Same seed, same demonstrations; another seed, others.
    again = classify(model, tokenizer, examples, spec, train_examples=train)
    assert again.prompts == result.prompts
    other = classify(model, tokenizer, examples, PromptSpec(verbalizers=YES_NO, shots=4, seed=7), train_examples=train)
    assert other.demonstrations != result.demonstrations


# ------------------------------------------------------------ (4) calibration
def test_contextual_calibration_divides_by_content_free_probabilities(tokenizer) -> None:
    model = BigramStub(tokenizer, bias=4.0)  # the model leans to "yes" whatever the text
    texts = ["great!", "meh?", "good!", "bad? awful"]
    labels = ["pos", "neg", "pos", "neg"]
    examples = Examples(texts, None, labels)
    plain = classify(model, tokenizer, examples, PromptSpec(verbalizers=YES_NO))
    assert plain.predictions == ["pos"] * 4 and plain.metrics["accuracy"] == 0.5

    calibrated = classify(model, tokenizer, examples, PromptSpec(verbalizers=YES_NO, calibrate=True))
    free = classify(model, tokenizer, Examples(["N/A"], None, None), PromptSpec(verbalizers=YES_NO)).probabilities[0]
    assert free[1] > 0.9  # the content-free input's skew: label order is neg, pos
    expected = plain.probabilities / free
    expected = expected / expected.sum(-1, keepdim=True)
    torch.testing.assert_close(calibrated.content_free, free)
    torch.testing.assert_close(calibrated.probabilities, expected)
    torch.testing.assert_close(calibrated.scores, plain.scores)  # raw scores are not calibrated
    assert calibrated.predictions == labels and calibrated.metrics["accuracy"] == 1.0


# ------------------------------------------------------------ (5) one-line errors
def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_bert_checkpoint_is_refused(tokenizer, tmp_path: Path) -> None:
    config = from_name("bert-tiny", vocab_size=tokenizer.get_vocab_size())
    folder = export_safetensors(BERT(config), config, tmp_path / "bert", tokenizer)
    dev = write_table(tmp_path / "dev.tsv", [("good", "1"), ("bad", "0")])
    with pytest.raises(CheckpointError) as error:
        run_prompt(["--ckpt", str(folder), "--input", str(dev), "--verbalizers", '{"0": " bad", "1": " good"}'])
    assert "holds a bert (masked LM) network; prompting needs a causal GPT checkpoint" in one_line(error)
    assert str(folder) in str(error.value)
    bert = BERT(config)
    with pytest.raises(CheckpointError, match="bert"):
        classify(bert, tokenizer, Examples(["a"], None, None), PromptSpec(verbalizers=YES_NO))


def test_spec_errors_name_the_value_and_the_fix() -> None:
    with pytest.raises(ConfigError) as error:
        PromptSpec(template="Review:\nSentiment:", verbalizers=YES_NO)
    assert "has no {text}" in one_line(error)
    with pytest.raises(ConfigError, match="give each label its continuation"):
        PromptSpec()
    with pytest.raises(ConfigError, match=r"placeholder\(s\) \{label\}"):
        PromptSpec(template="{text} -> {label}", verbalizers=YES_NO)
    with pytest.raises(ConfigError, match="shots=-1"):
        PromptSpec(verbalizers=YES_NO, shots=-1)
    with pytest.raises(ConfigError, match="names one label"):
        PromptSpec(verbalizers={"pos": " yes"})
    assert PromptSpec(verbalizers={0: " no", 1: " yes"}).label_names == ["0", "1"]  # YAML int keys
    assert PromptSpec(verbalizers=YES_NO).render("a {pair} b") == "Review: a {pair} b\nSentiment:"


def test_data_errors_name_the_value_and_the_fix(tokenizer) -> None:
    model = BigramStub(tokenizer)
    spec = PromptSpec(verbalizers=YES_NO)
    with pytest.raises(ConfigError) as error:
        classify(model, tokenizer, Examples(["a!", "b", "c"], None, ["pos", "meh", "odd"]), spec)
    assert "'meh', 'odd' in the input have no verbalizer" in one_line(error)
    examples = Examples(["a!"], None, ["pos"])
    with pytest.raises(ConfigError) as error:
        classify(model, tokenizer, examples, PromptSpec(verbalizers={"pos": " yes", "neg": "é"}))
    assert "'é' of label 'neg' encodes to no tokens" in one_line(error)
    with pytest.raises(ConfigError) as error:
        classify(model, tokenizer, examples, PromptSpec(verbalizers={"pos": " yes", "neg": " né"}))
    assert "' né' of label 'neg' has pieces not in the tokenizer's vocabulary" in one_line(error)
    with pytest.raises(ConfigError, match="encode to the same tokens"):
        classify(model, tokenizer, examples, PromptSpec(verbalizers={"pos": " yes", "neg": " yes"}))
    with pytest.raises(ConfigError, match="needs labelled training examples"):
        classify(model, tokenizer, examples, PromptSpec(verbalizers=YES_NO, shots=2))
    with pytest.raises(ConfigError, match="has {pair} but the input has single texts"):
        classify(model, tokenizer, examples, PromptSpec("{text} / {pair}:", YES_NO))
    with pytest.raises(ConfigError, match="has sentence pairs but template"):
        classify(model, tokenizer, Examples(["a"], ["b"], ["pos"]), spec)
    with pytest.raises(ConfigError, match="leaving no room for the text"):
        classify(BigramStub(tokenizer, block_size=20), tokenizer, examples, spec)


def test_bad_flag_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as stop:
        run_prompt(["--ckpt", "x", "--input", "y", "--verbalizers", "{}", "--shots", "many"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "shots" in err and "\n" not in err


def test_unknown_characters_warn_once(tokenizer, capsys: pytest.CaptureFixture) -> None:
    examples = Examples(["café!", "naïve?", "plain!"], None, ["pos", "neg", "pos"])
    result = classify(BigramStub(tokenizer), tokenizer, examples, PromptSpec(verbalizers=YES_NO))
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning")]
    assert len(warnings) == 1 and "2 of 3 prompts" in warnings[0] and "'é'" in warnings[0] and "'ï'" in warnings[0]
    assert result.predictions == ["pos", "neg", "pos"]


# ------------------------------------------------------------ (6) the command end to end
def test_run_prompt_end_to_end(tokenizer, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = random_network(tokenizer)
    folder = export_safetensors(model, model.config, tmp_path / "gpt", tokenizer)
    rows = [("a fine film", "1"), ("dull and slow", "0"), ("loved it", "1"), ("not good", "0"), ("bright, warm", "1")]
    dev = write_table(tmp_path / "dev.tsv", rows)
    train = write_table(tmp_path / "train.tsv", [("great", "1"), ("awful", "0"), ("nice", "1"), ("boring", "0")],
                        header=("text", "label"))
    out, report = tmp_path / "out" / "predictions.csv", tmp_path / "report"
    result = run_prompt([
        "--ckpt", str(folder), "--input", str(dev), "--train", str(train), "--shots", "2", "--calibrate",
        "--verbalizers", '{"0": " bad", "1": " good"}', "--template", "Review: {text}\nSentiment:",
        "--batch_size", "3", "--output", str(out), "--report_dir", str(report),
    ])
    with open(out, newline="", encoding="utf-8") as f:
        table = list(csv.reader(f))
    assert table[0] == ["text", "label", "prediction", "p_0", "p_1"]
    assert [row[:2] for row in table[1:]] == [list(row) for row in rows]
    assert [row[2] for row in table[1:]] == result.predictions
    probs = torch.tensor([[float(v) for v in row[3:]] for row in table[1:]])
    torch.testing.assert_close(probs, result.probabilities, atol=1e-5, rtol=0)
    torch.testing.assert_close(probs.sum(-1), torch.ones(len(rows)), atol=1e-5, rtol=0)
    assert result.content_free is not None and len(result.demonstrations) == 2

    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["accuracy"] == pytest.approx(result.metrics["accuracy"])
    assert set(metrics) >= {"macro_f1", "precision", "recall", "confusion", "n_truncated", "settings"}
    assert metrics["settings"]["shots"] == 2 and metrics["n_examples"] == len(rows)
    assert (report / "confusion.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "2-shot prompting, calibrated" in printed and "macro-F1" in printed and "confusion matrix" in printed
    assert "prompts truncated to fit the context (block_size=64): " in printed

    # Without a label column: predictions only, no metrics.
    unlabelled = write_table(tmp_path / "raw.tsv", [("a fine film", "x")], header=("text", "id"))
    plain = run_prompt(["--ckpt", str(folder), "--input", str(unlabelled), "--verbalizers", '{"0": " bad", "1": " good"}',
                        "--output", str(out)])
    assert plain.metrics == {} and plain.labels is None
    with open(out, newline="", encoding="utf-8") as f:
        assert next(csv.reader(f)) == ["text", "prediction", "p_0", "p_1"]
