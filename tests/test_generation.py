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


def greedy_reference(model: nn.Module, ids: torch.Tensor, steps: int) -> torch.Tensor:
    block_size = model.config.block_size
    with torch.no_grad():
        for _ in range(steps):
            next_token = model(ids[:, -block_size:])[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat((ids, next_token), dim=1)
    return ids


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
def test_cached_and_uncached_agree_past_block_size(position):
    model = tiny_gpt(position=position, block_size=8)
    ids = prompt(length=5)
    cached = generate(model, ids, 20, temperature=0, use_cache=True)
    uncached = generate(model, ids, 20, temperature=0, use_cache=False)
    assert cached.shape == (2, 25)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, greedy_reference(model, ids, 20))


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


def test_lstm_generation_recomputes_cropped_context():
    torch.manual_seed(0)
    model = LSTMLM(ModelConfig(arch="lstm", n_layer=1, n_embd=16, block_size=8, vocab_size=VOCAB))
    ids = prompt(length=6)
    out = generate(model, ids, 12, temperature=0)
    assert out.shape == (2, 18)
    assert torch.equal(out, greedy_reference(model, ids, 12))


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
    assert torch.all(out[:, -1] == 3)
