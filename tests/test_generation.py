import pytest
import torch
from torch import nn

from lmexp.generation import generate, sample_next_token
from lmexp.models import GPT, LSTMLM, ModelConfig, from_name

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
    model: nn.Module, ids: torch.Tensor, steps: int, shift: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """greedy_reference and the next-token logits of every step (steps, B, V)."""
    block_size = model.config.block_size
    start = 0
    step_logits = []
    with torch.no_grad():
        for _ in range(steps):
            while ids.size(1) - start > block_size:
                start += shift
            step_logits.append(model(ids[:, start:])[:, -1])
            ids = torch.cat((ids, step_logits[-1].argmax(-1, keepdim=True)), dim=1)
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


@pytest.mark.parametrize("position", ["learned", "rotary"])
@pytest.mark.parametrize(("window_shift", "shift"), [(1, 1), (None, 2), (3, 3), (8, 8)])
def test_cached_and_uncached_agree_past_block_size(monkeypatch, position, window_shift, shift):
    model = tiny_gpt(position=position, block_size=8)  # default shift: 8 // 4 = 2
    ids = prompt(length=5)
    expected, expected_logits = greedy_reference_with_logits(model, ids, 20, shift)
    recorder = ForwardRecorder(model, monkeypatch)
    for use_cache in (True, False):
        out = generate(model, ids, 20, temperature=0, use_cache=use_cache, window_shift=window_shift)
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
