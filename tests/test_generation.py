import functools
from pathlib import Path

import pytest
import torch
from torch import nn

from lmexp.errors import ConfigError
from lmexp.generation import cut_at_stop, generate, sample_next_token, supports_attention_mask
from lmexp.models import GPT, LSTMLM, ModelConfig, from_name
from lmexp.verbs import generate as cli
from lmexp.verbs.generate import generate_text

VOCAB = 50


def tiny_gpt(**overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(from_name("gpt-tiny", vocab_size=VOCAB, **overrides))


def prompt(batch: int = 2, length: int = 5) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(1))


def greedy_reference(model: nn.Module, ids: torch.Tensor, steps: int, shift: int = 1) -> torch.Tensor:
    """Greedy decoding on the full context; past block_size the window start moves by `shift`
    whenever the context would exceed block_size (shift=1: always the last block_size tokens)."""
    return greedy_reference_with_logits(model, ids, steps, shift)[0]


def greedy_reference_with_logits(
    model: nn.Module, ids: torch.Tensor, steps: int, shift: int = 1, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """greedy_reference and the next-token logits of every step (steps, B, V); with a left-padding
    mask, the window carries the mask's columns (pads fall out of it like any other column)."""
    block_size = model.config.block_size
    start = 0
    step_logits = []
    with torch.no_grad():
        for _ in range(steps):
            while ids.size(1) - start > block_size:
                start += shift
            kwargs = {} if mask is None else {"attention_mask": mask[:, start:]}
            step_logits.append(model(ids[:, start:], **kwargs)[:, -1])
            ids = torch.cat((ids, step_logits[-1].argmax(-1, keepdim=True)), dim=1)
            if mask is not None:
                mask = torch.cat((mask, torch.ones_like(mask[:, :1])), dim=1)
    return ids, torch.stack(step_logits)


class ForwardRecorder:
    """Records the input length and next-token logits of every forward pass of `model`.

    A random model's greedy output soon repeats one token whatever the context, so equal tokens
    alone would not show that two decoders saw the same context; equal logits do.
    """

    def __init__(self, model: nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
        self.lengths: list[int] = []
        self.last_logits: list[torch.Tensor] = []
        forward = model.forward

        def recording_forward(input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
            logits = forward(input_ids, **kwargs)
            self.lengths.append(input_ids.size(1))
            self.last_logits.append(logits[:, -1].clone())
            return logits

        monkeypatch.setattr(model, "forward", recording_forward)

    def pop_logits(self) -> torch.Tensor:
        """The logits recorded so far (steps, B, V); the record starts over."""
        logits, self.last_logits, self.lengths = torch.stack(self.last_logits), [], []
        return logits


def test_temperature_zero_is_deterministic_greedy():
    model = tiny_gpt().eval()
    ids = prompt()
    out = generate(model, ids, max_new_tokens=10, temperature=0)
    assert out.shape == (2, 15)
    assert torch.equal(out[:, :5], ids)
    assert torch.equal(out, greedy_reference(model, ids, 10))
    assert torch.equal(out, generate(model, ids, max_new_tokens=10, temperature=0))


def test_top_k_one_is_greedy():
    model = tiny_gpt()
    ids = prompt()
    sampled = generate(model, ids, 10, top_k=1, generator=torch.Generator().manual_seed(3))
    assert torch.equal(sampled, generate(model, ids, 10, temperature=0))


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("position", ["learned", "rotary"])
@pytest.mark.parametrize(("window_shift", "shift"), [(1, 1), (None, 2), (3, 3), (8, 8)])
def test_cached_and_uncached_agree_past_block_size(monkeypatch, position, window_shift, shift, padded):
    model = tiny_gpt(position=position, block_size=8)  # default shift: 8 // 4 = 2
    ids = prompt(length=5)
    mask = None
    if padded:  # the second prompt has 2 tokens, left-padded to 5
        mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 0, 1, 1]])
        ids = ids.masked_fill(mask == 0, 0)
    expected, expected_logits = greedy_reference_with_logits(model, ids, 20, shift, mask)
    recorder = ForwardRecorder(model, monkeypatch)
    for use_cache in (True, False):
        out = generate(model, ids, 20, temperature=0, use_cache=use_cache, window_shift=window_shift, attention_mask=mask)
        assert out.shape == (2, 25)
        assert torch.equal(out, expected)
        torch.testing.assert_close(recorder.pop_logits(), expected_logits, rtol=1e-5, atol=1e-5)


def test_window_shift_changes_what_the_model_sees(monkeypatch):
    model = tiny_gpt(block_size=8)
    recorder = ForwardRecorder(model, monkeypatch)
    logits = []
    for shift in (1, 4):
        generate(model, prompt(length=5), 20, temperature=0, window_shift=shift)
        logits.append(recorder.pop_logits())
    # Identical while everything fits (the first 4 steps), different once the windows differ.
    torch.testing.assert_close(logits[0][:4], logits[1][:4])
    assert not torch.allclose(logits[0][4:], logits[1][4:])


@pytest.mark.parametrize(
    ("window_shift", "use_cache", "lengths"),
    [
        # Prompt 5, block 8: the window moves by 4 at 9, 13, 17, 21 tokens and is re-encoded
        # (5 = 8 - 4 + 1 tokens) once per 4 new tokens.
        (4, True, [5, 1, 1, 1] + [5, 1, 1, 1] * 4),
        (4, False, [5, 6, 7, 8] + [5, 6, 7, 8] * 4),
        # Exact sliding window: the cache is rebuilt from the last 8 tokens on every step.
        (1, True, [5, 1, 1, 1] + [8] * 16),
    ],
)
def test_cache_is_rebuilt_once_per_window_shift(monkeypatch, window_shift, use_cache, lengths):
    model = tiny_gpt(block_size=8)
    recorder = ForwardRecorder(model, monkeypatch)
    generate(model, prompt(length=5), 20, temperature=0, use_cache=use_cache, window_shift=window_shift)
    assert recorder.lengths == lengths


@pytest.mark.parametrize(
    ("window_shift", "message"),
    [
        (0, "window_shift=0 is invalid: use a positive number of tokens"),
        (9, "window_shift=9 exceeds the model's context block_size=8: use at most 8"),
    ],
)
def test_invalid_window_shift_raises(window_shift, message):
    with pytest.raises(ValueError, match=message):
        generate(tiny_gpt(block_size=8), prompt(), 1, window_shift=window_shift)


def test_same_seed_same_samples():
    model = tiny_gpt()
    ids = prompt()
    runs = [
        generate(model, ids, 12, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(7))
        for _ in range(2)
    ]
    assert torch.equal(runs[0], runs[1])


def test_model_mode_is_restored():
    model = tiny_gpt().train()
    generate(model, prompt(), 2)
    assert model.training


def test_prompt_longer_than_context_raises():
    message = "prompt has 33 tokens but the model's context is block_size=32: shorten the prompt"
    with pytest.raises(ValueError, match=message):
        generate(tiny_gpt(), prompt(length=33), 1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(top_p=0.0), "top_p=0.0 is outside"),
        (dict(top_p=1.5), "top_p=1.5 is outside"),
        (dict(top_k=0), "top_k=0 is invalid"),
        (dict(temperature=-1.0), "temperature=-1.0 is invalid"),
    ],
)
def test_invalid_sampling_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sample_next_token(torch.zeros(1, VOCAB), **kwargs)
    with pytest.raises(ValueError, match=message):
        generate(tiny_gpt(), prompt(), 1, **kwargs)


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    generator = torch.Generator().manual_seed(0)
    draws = {sample_next_token(logits, top_p=0.8, generator=generator).item() for _ in range(200)}
    assert draws == {0, 1}


@pytest.mark.parametrize(("window_shift", "shift"), [(1, 1), (None, 2)])
def test_lstm_generation_recomputes_cropped_context(window_shift, shift):
    torch.manual_seed(0)
    model = LSTMLM(ModelConfig(arch="lstm", n_layer=1, n_embd=16, block_size=8, vocab_size=VOCAB))
    ids = prompt(length=6)
    out = generate(model, ids, 12, temperature=0, window_shift=window_shift)
    assert out.shape == (2, 18)
    assert torch.equal(out, greedy_reference(model, ids, 12, shift))


class AlwaysToken(nn.Module):
    """A model that always predicts `token`."""

    def __init__(self, token: int) -> None:
        super().__init__()
        self.token = token

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*input_ids.shape, VOCAB)
        logits[..., self.token] = 10.0
        return logits


def test_generation_stops_at_eos():
    out = generate(AlwaysToken(3), prompt(), 10, temperature=0, eos_id=3)
    assert out.shape == (2, 6)
    assert out.is_contiguous()
    assert torch.all(out[:, -1] == 3)


# --- batches of prompts of different lengths (left padding) ----------------------------------


def left_pad(prompts: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D prompts -> left-padded ids and mask (B, longest)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = p
        mask[row, width - len(p):] = 1
    return ids, mask


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("position", ["learned", "rotary"])
def test_left_padded_batch_gives_each_prompt_its_own_tokens(monkeypatch, position, use_cache):
    model = tiny_gpt(position=position)
    prompts = [prompt(1, n)[0] for n in (7, 2, 4)]
    ids, mask = left_pad(prompts, pad_id=VOCAB - 1)  # a real token id: masking must hide it
    recorder = ForwardRecorder(model, monkeypatch)
    out = generate(model, ids, 12, temperature=0, attention_mask=mask, use_cache=use_cache)
    batch_logits = recorder.pop_logits()  # (steps, B, V)
    assert not batch_logits.isnan().any()
    for row, p in enumerate(prompts):
        alone = generate(model, p[None], 12, temperature=0, use_cache=use_cache)
        assert torch.equal(out[row, 7 - len(p):], alone[0])
        # Equal logits at every step: each row saw its own context, not only the same argmax.
        torch.testing.assert_close(batch_logits[:, row], recorder.pop_logits()[:, 0], rtol=1e-5, atol=1e-5)


def test_left_padded_sampling_matches_cached_and_uncached():
    model = tiny_gpt()
    ids, mask = left_pad([prompt(1, n)[0] for n in (6, 3)])
    runs = [
        generate(model, ids, 15, top_p=0.9, attention_mask=mask, use_cache=use_cache,
                 generator=torch.Generator().manual_seed(5))
        for use_cache in (True, False)
    ]
    assert torch.equal(runs[0], runs[1])


def test_a_mask_without_padding_changes_nothing():
    model = tiny_gpt()
    ids = prompt()
    plain = generate(model, ids, 8, temperature=0)
    assert torch.equal(generate(model, ids, 8, temperature=0, attention_mask=torch.ones_like(ids)), plain)


@pytest.mark.parametrize(
    ("mask", "message"),
    [
        (torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]), "attention_mask is not left padding"),
        (torch.tensor([[0, 0, 0, 0, 0], [1, 1, 1, 1, 1]]), "attention_mask is not left padding"),
        (torch.tensor([[0, 2, 1, 1, 1], [1, 1, 1, 1, 1]]), "attention_mask holds values other than 0 and 1"),
        (torch.ones(2, 4), r"attention_mask has shape \(2, 4\) but input_ids \(2, 5\)"),
    ],
)
def test_invalid_attention_mask_raises(mask, message):
    with pytest.raises(ValueError, match=message):
        generate(tiny_gpt(), prompt(), 1, attention_mask=mask)


def test_lstm_rejects_padding_but_takes_a_full_mask():
    torch.manual_seed(0)
    model = LSTMLM(ModelConfig(arch="lstm", n_layer=1, n_embd=16, block_size=8, vocab_size=VOCAB))
    ids, mask = left_pad([prompt(1, 4)[0], prompt(1, 2)[0]])
    with pytest.raises(ValueError, match="LSTMLM.forward takes no attention_mask, so it cannot read a left-padded batch"):
        generate(model, ids, 3, attention_mask=mask)
    assert generate(model, prompt(), 3, temperature=0, attention_mask=torch.ones(2, 5)).shape == (2, 8)


# --- repetition penalty ----------------------------------------------------------------------


class FixedLogits(nn.Module):
    """A model whose next-token logits are always `logits`; it takes (and ignores) a mask."""

    accepts_attention_mask = True

    def __init__(self, logits: dict[int, float], default: float = -10.0) -> None:
        super().__init__()
        self.logits = torch.full((VOCAB,), default)
        for token, value in logits.items():
            self.logits[token] = value

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.logits.expand(*input_ids.shape, VOCAB).clone()


@pytest.mark.parametrize(
    ("logits", "penalty", "expected"),
    [
        ({3: 2.0, 4: 1.5}, 1.0, 3),  # no penalty: the best token, although the prompt has it
        ({3: 2.0, 4: 1.5}, 1.5, 4),  # positive logit divided: 2.0 / 1.5 < 1.5
        ({3: 2.0, 4: 1.5}, 1.2, 3),  # 2.0 / 1.2 > 1.5: still the best
        ({3: -1.0, 4: -1.2}, 1.5, 4),  # negative logit multiplied: -1.5 < -1.2
    ],
)
def test_repetition_penalty_changes_the_greedy_choice(logits, penalty, expected):
    ids = torch.tensor([[9, 3, 9]])  # token 3 is in the prompt, 4 is not
    out = generate(FixedLogits(logits), ids, 1, temperature=0, repetition_penalty=penalty)
    assert out[0, -1].item() == expected


def test_repetition_penalty_counts_generated_tokens_and_skips_padding():
    model = FixedLogits({0: 3.0, 5: 2.0, 6: 1.0, 7: 0.5})
    out = generate(model, torch.tensor([[9]]), 3, temperature=0, repetition_penalty=100.0)
    assert out[0, 1:].tolist() == [0, 5, 6]  # each generated token is penalized from then on
    # Token 0 is only padding in the second row: not "already in the row", so not penalized.
    ids, mask = left_pad([torch.tensor([9, 0]), torch.tensor([9])])
    out = generate(model, ids, 1, temperature=0, attention_mask=mask, repetition_penalty=100.0)
    assert out[:, -1].tolist() == [5, 0]


@pytest.mark.parametrize("penalty", [0.0, -1.0, float("nan")])
def test_invalid_repetition_penalty_raises(penalty):
    with pytest.raises(ValueError, match=f"repetition_penalty={penalty} is invalid: use a value > 0"):
        generate(tiny_gpt(), prompt(), 1, repetition_penalty=penalty)


def test_stopping_ends_generation():
    calls = []

    def stopping(tokens: torch.Tensor) -> bool:
        calls.append(tokens.size(1))
        return tokens.size(1) == 8

    out = generate(AlwaysToken(3), prompt(), 10, temperature=0, stopping=stopping)
    assert out.shape == (2, 8) and calls == [6, 7, 8]


def test_cut_at_stop_takes_the_earliest_stop():
    assert cut_at_stop("ab.cd\nef", [".", "\n"]) == "ab"
    assert cut_at_stop("ab\ncd.ef", [".", "\n"]) == "ab"
    assert cut_at_stop("abc", ["x"]) == "abc"


# --- generate_text and the command line ------------------------------------------------------

TEXT = "abcdefghij klmnop"


def tiny_export(folder: Path, arch: str = "gpt") -> Path:
    """A random model and a character tokenizer without [UNK]: one token per character."""
    from lmexp.checkpoints import export_safetensors
    from lmexp.data import train_tokenizer

    tokenizer = train_tokenizer([TEXT], "char")
    torch.manual_seed(0)
    if arch == "gpt":
        config = from_name("gpt-tiny", vocab_size=tokenizer.get_vocab_size(), block_size=64)
        model = GPT(config)
    else:
        config = ModelConfig(arch="lstm", n_layer=1, n_embd=16, block_size=64, vocab_size=tokenizer.get_vocab_size())
        model = LSTMLM(config)
    return export_safetensors(model, config, folder, tokenizer)


class GenerateSpy:
    """Wraps the generate that lmexp.verbs.generate calls, to record how many tokens each call generated."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.new_tokens: list[int] = []
        real = cli.generate

        def spy(model, input_ids, *args, **kwargs):
            out = real(model, input_ids, *args, **kwargs)
            self.new_tokens.append(out.size(1) - input_ids.size(1))
            return out

        monkeypatch.setattr(cli, "generate", spy)


@pytest.mark.parametrize("arch", ["gpt", "lstm"])
def test_generate_text_batch_matches_prompts_alone(tmp_path, arch):
    export = str(tiny_export(tmp_path / "export", arch))
    prompts = ["abc", "ghij kl", "p"]
    batch = generate_text(export, prompts, max_new_tokens=12, temperature=0, num_samples=2)
    alone = [text for p in prompts for text in generate_text(export, p, max_new_tokens=12, temperature=0)]
    assert batch == [text for text in alone for _ in range(2)]  # prompt-major, 2 samples each
    assert all(text.startswith(p) and len(text) == len(p) + 12 for text, p in zip(batch[::2], prompts))


def test_stop_strings_cut_samples_and_stop_generation_early(tmp_path, monkeypatch):
    export = str(tiny_export(tmp_path / "export"))
    prompts = ["ab", "ghijk"]
    settings = {"max_new_tokens": 40, "temperature": 1.0, "seed": 3, "num_samples": 2}
    full = generate_text(export, prompts, **settings)
    news = [text[len(p):] for text, p in zip(full, [p for p in prompts for _ in range(2)])]
    stops = sorted({new[4:6] for new in news})  # a two-character string from each sample's new text
    first = [min(new.find(s) for s in stops if s in new) for new in news]
    spy = GenerateSpy(monkeypatch)
    cut = generate_text(export, prompts, stop=stops, **settings)
    for text, whole, at in zip(cut, full, first):
        assert text == whole[: len(whole) - 40 + at]
        assert not any(s in text[len(whole) - 40:] for s in stops)
    # Generation ends once every sample holds a stop string (one character per token here).
    assert spy.new_tokens == [max(min(new.find(s) + len(s) for s in stops if s in new) for new in news)]
    assert spy.new_tokens[0] < 40


def test_one_prompt_prints_as_before_and_several_are_grouped(tmp_path, capsys):
    export = str(tiny_export(tmp_path / "export"))
    base = ["--ckpt", export, "--max_new_tokens", "5", "--temperature", "0"]
    samples = cli.run_generate([*base, "--prompt", "abc"])
    assert capsys.readouterr().out == samples[0] + "\n" and len(samples) == 1
    samples = cli.run_generate([*base, "--prompt", "abc", "--prompt", "de", "--num_samples", "2"])
    assert capsys.readouterr().out.splitlines() == [
        "=== prompt 1 ===", "--- sample 1 ---", samples[0], "--- sample 2 ---", samples[1],
        "=== prompt 2 ===", "--- sample 1 ---", samples[2], "--- sample 2 ---", samples[3],
    ]
    assert samples[2].startswith("de") and len(samples) == 4


def test_generate_flags_parse(monkeypatch):
    seen = {}

    @functools.wraps(generate_text)  # the parser reads the real signature and docstring
    def fake_generate_text(**kwargs):
        seen.update(kwargs)
        return ["x"] * 2

    monkeypatch.setattr(cli, "generate_text", fake_generate_text)
    cli.run_generate([
        "--ckpt", "c", "--prompt", "one", "--prompt", "[two]", "--stop", ".", "--stop", "\n",
        "--repetition_penalty", "1.3", "--num_samples", "1",
    ])
    # Repeated flags collect, and values are taken literally (not "[two]" as a YAML list).
    assert seen["prompt"] == ["one", "[two]"] and seen["stop"] == [".", "\n"]
    assert seen["repetition_penalty"] == 1.3 and seen["prompts_file"] is None
    cli.run_generate(["--ckpt", "c", "--prompts_file", "p.txt", "--num_samples", "2"])
    assert seen["prompts_file"] == "p.txt" and seen["prompt"] is None and seen["stop"] is None


def test_prompts_file_and_bad_settings(tmp_path):
    export = str(tiny_export(tmp_path / "export"))
    (tmp_path / "p.txt").write_text("abc\n\nghij kl\n")
    from_file = generate_text(export, prompts_file=str(tmp_path / "p.txt"), max_new_tokens=4, temperature=0)
    assert from_file == generate_text(export, ["abc", "ghij kl"], max_new_tokens=4, temperature=0)
    with pytest.raises(ConfigError, match="both prompt and prompts_file are given"):
        generate_text(export, "a", prompts_file=str(tmp_path / "p.txt"))
    with pytest.raises(ConfigError, match="repetition_penalty=0.0 is invalid"):
        generate_text(export, "a", repetition_penalty=0.0)
    with pytest.raises(ConfigError, match="contains an empty string"):
        generate_text(export, "a", stop=[""])


class SaysItTakesAMask(AlwaysToken):
    accepts_attention_mask = True  # but its forward takes none


def test_a_model_reads_a_left_padded_batch_only_if_it_says_it_takes_a_mask():
    ids, mask = left_pad([prompt(1, 4)[0], prompt(1, 2)[0]])
    assert not supports_attention_mask(AlwaysToken(3)) and supports_attention_mask(FixedLogits({3: 1.0}))
    for model in (AlwaysToken(3), SaysItTakesAMask(3)):
        with pytest.raises(ValueError, match=f"{type(model).__name__}.forward takes no attention_mask, so it cannot read"):
            generate(model, ids, 2, attention_mask=mask)
        assert generate(model, prompt(), 2, temperature=0).shape == (2, 7)  # one length: no mask needed
    assert generate(FixedLogits({3: 1.0}), ids, 2, attention_mask=mask).shape == (2, 6)
