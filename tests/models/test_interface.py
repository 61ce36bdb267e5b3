"""GPT, BERT and LSTMLM answer the same calls, each giving what the network's parts give when run
by hand, and the finders name each block's layers by role."""

from __future__ import annotations

import pytest
import torch

from lmexp.models import (
    BLOCK_ROLES,
    block_linears,
    build_model,
    from_name,
    keep_heads_and_neurons,
    key_in_blocks,
    linear_layers,
    transformer_blocks,
)

VOCAB = 50


def network(arch: str, labels: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    config = from_name(f"{arch}-tiny" if arch != "lstm" else "lstm-small", vocab_size=VOCAB,
                       **({"labels": ["no", "yes"]} if labels else {}))
    if arch == "lstm":
        config = config.replace(n_layer=1, n_embd=16)
    return build_model(config).eval()


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # right padding
    return ids, mask, torch.zeros_like(ids)


@pytest.mark.parametrize("arch", ["gpt", "bert", "lstm"])
def test_every_network_answers_hidden_states_and_logits_with_the_same_arguments(arch):
    model, (ids, mask, types) = network(arch), batch()
    hidden = model.hidden_states(ids, attention_mask=mask, token_type_ids=types)
    logits = model.logits(ids, attention_mask=mask, token_type_ids=types)
    assert hidden.shape[:2] == ids.shape and logits.shape == (*ids.shape, VOCAB)
    assert isinstance(model.accepts_attention_mask, bool)


def blocks_by_hand(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor | None = None,
                   types: torch.Tensor | None = None) -> torch.Tensor:
    """A transformer's final hidden states computed from its parts one by one: embeddings
    (positions 0..T-1), each block, the final norm. A causal model is run without a mask (its
    attention is causal by itself); a bidirectional one hides the masked keys."""
    trunk = model.trunk
    assert mask is None or not trunk.causal
    x = trunk.tok_emb(ids) + trunk.pos_emb(torch.arange(ids.size(1)))
    if trunk.type_emb is not None:
        x = x + trunk.type_emb(types if types is not None else torch.zeros_like(ids))
    if trunk.emb_norm is not None:
        x = trunk.emb_norm(x)
    keys = None if mask is None else mask.bool()[:, None, None, :]
    for block in trunk.blocks:
        x = block(x, None, keys)
    return trunk.ln_f(x) if trunk.ln_f is not None else x


def differ(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two outputs differ by more than rounding (the tiny networks' outputs are small)."""
    return not torch.allclose(a, b, rtol=1e-3, atol=1e-6)


close = torch.testing.assert_close


@torch.no_grad()
def test_gpt_answers_with_its_head_on_the_blocks_run_by_hand():
    gpt, (ids, mask, types) = network("gpt", labels=True), batch()
    hidden = blocks_by_hand(gpt, ids)
    close(gpt.hidden_states(ids), hidden)
    close(gpt.hidden_states(ids, token_type_ids=types + 1), hidden)  # a GPT has no segments
    close(gpt.logits(ids), gpt.lm_head(hidden))
    close(gpt(ids), gpt.lm_head(hidden))
    # Right padding never reaches a real token: each row pools its last real token's state.
    last = hidden[torch.arange(2), mask.sum(dim=1) - 1]
    close(gpt.pooled(ids, mask, types), last)
    close(gpt.classify(ids, mask, types), gpt.classifier.out_proj(last))


@torch.no_grad()
def test_gpt_pools_a_right_padded_row_as_the_row_alone():
    gpt, (ids, mask, _) = network("gpt", labels=True), batch()
    alone = ids[1:, :5]  # row 1 without its padding
    close(gpt.pooled(ids, mask)[1], gpt.pooled(alone)[0])
    close(gpt.classify(ids, mask)[1], gpt.classify(alone)[0])
    assert differ(gpt.pooled(ids)[1], gpt.pooled(alone)[0])  # unmasked, the last position is padding


@torch.no_grad()
def test_gpt_reads_a_left_padded_row_with_its_mask_as_the_row_alone():
    gpt, (ids, _, _) = network("gpt"), batch()
    alone = ids[1:, :5]
    padded = torch.cat([torch.full((1, 2), 3), alone], dim=1)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1]])
    expected = blocks_by_hand(gpt, alone)
    close(gpt.hidden_states(padded, mask)[:, 2:], expected)
    close(gpt.logits(padded, mask)[:, 2:], gpt.lm_head(expected))
    close(gpt(padded, mask)[:, 2:], gpt.lm_head(expected))
    assert differ(gpt.hidden_states(padded)[:, 2:], expected)  # unmasked, the padding is read


@torch.no_grad()
def test_gpt_logits_with_a_cache_continue_the_full_run():
    gpt, (ids, _, _) = network("gpt"), batch()
    cache = gpt.make_cache(2)
    steps = [gpt.logits(ids[:, :4], cache=cache), gpt.logits(ids[:, 4:], cache=cache)]
    close(torch.cat(steps, dim=1), gpt.lm_head(blocks_by_hand(gpt, ids)))


@torch.no_grad()
def test_bert_answers_with_its_heads_on_the_blocks_run_by_hand():
    bert, (ids, mask, _) = network("bert", labels=True), batch()
    types = torch.zeros_like(ids)
    types[:, 3:] = 1
    hidden = blocks_by_hand(bert, ids, mask, types)
    close(bert.hidden_states(ids, mask, types), hidden)
    close(bert(ids, mask, types), hidden)
    head = bert.mlm_head
    close(bert.logits(ids, mask, types), head.decoder(head.ln(head.act(head.dense(hidden)))) + head.bias)
    cls = torch.tanh(bert.pooler(hidden[:, 0]))
    close(bert.pooled(ids, mask, types), cls)
    close(bert.classify(ids, mask, types), bert.classifier.out_proj(cls))


@torch.no_grad()
def test_bert_reads_the_token_types_and_hides_masked_tokens():
    bert, (ids, mask, zeros) = network("bert", labels=True), batch()
    pair = zeros.clone()
    pair[:, 3:] = 1
    close(bert.hidden_states(ids, mask), bert.hidden_states(ids, mask, zeros))
    assert differ(bert.hidden_states(ids, mask, pair), bert.hidden_states(ids, mask, zeros))
    assert differ(bert.pooled(ids, mask, pair), bert.pooled(ids, mask, zeros))
    assert differ(bert.classify(ids, mask, pair), bert.classify(ids, mask, zeros))
    # Row 1's real tokens see only each other: what its padding holds does not reach them.
    alone = ids[1:, :5]
    other = ids.clone()
    other[1, 5:] = (other[1, 5:] + 1) % VOCAB
    for padded in (ids, other):
        close(bert.hidden_states(padded, mask)[1, :5], bert.hidden_states(alone)[0])
        close(bert.logits(padded, mask)[1, :5], bert.logits(alone)[0])
        close(bert.pooled(padded, mask)[1], bert.pooled(alone)[0])
        close(bert.classify(padded, mask)[1], bert.classify(alone)[0])
    assert differ(bert.hidden_states(ids)[1, :5], bert.hidden_states(alone)[0])  # unmasked, the padding is read


@torch.no_grad()
def test_lstm_answers_with_its_head_on_the_recurrence_run_by_hand():
    lstm, (ids, mask, types) = network("lstm"), batch()
    hidden, _ = lstm.lstm(lstm.tok_emb(ids))
    close(lstm.hidden_states(ids, mask, types), hidden)
    close(lstm.logits(ids, mask, types), lstm.lm_head(hidden))
    close(lstm(ids), lstm.lm_head(hidden))


@pytest.mark.parametrize("arch", ["gpt", "bert"])
def test_classify_takes_the_same_arguments_in_gpt_and_bert(arch):
    model, (ids, mask, types) = network(arch, labels=True), batch()
    assert model.pooled(ids, mask, types).shape == (2, model.config.n_embd)
    assert model.classify(ids, mask, types).shape == (2, 2)


def test_finders_name_each_blocks_layers_by_role():
    model = network("gpt")
    blocks = block_linears(model)
    assert len(blocks) == len(transformer_blocks(model)) == model.config.n_layer
    assert set(blocks[1].names) == set(BLOCK_ROLES)
    modules = dict(model.named_modules())
    for block in blocks:
        for role, name in block.names.items():
            assert modules[name] is block.layers[role]
    assert list(linear_layers(model)) == [name for block in blocks for name in block.names.values()]
    assert key_in_blocks(f"{blocks[1].names['mlp_in']}.weight", [0, 1]) == f"{blocks[1].names['mlp_in']}.weight"
    assert key_in_blocks(f"{blocks[1].names['mlp_in']}.weight", [0, 0]) == f"{blocks[0].names['mlp_in']}.weight"


def test_a_network_without_blocks_is_refused_in_one_line():
    with pytest.raises(ValueError, match="LSTMLM has no transformer blocks"):
        transformer_blocks(network("lstm"))


def test_keeping_every_head_and_neuron_changes_nothing():
    model, (ids, mask, _) = network("bert"), batch()
    heads = [torch.arange(block.n_head) for block in block_linears(model)]
    neurons = [torch.arange(block.layers["mlp_in"].out_features) for block in block_linears(model)]
    config, same = keep_heads_and_neurons(model, model.config, heads, neurons)
    assert config == model.config
    torch.testing.assert_close(same.eval().logits(ids, mask), model.logits(ids, mask))
    config, smaller = keep_heads_and_neurons(model, model.config, [h[:1] for h in heads], [n[:4] for n in neurons])
    assert config.layer_heads == [1] * config.n_layer and config.layer_mlp_hidden == [4] * config.n_layer
    assert smaller.logits(ids, mask).shape == (2, 7, VOCAB)
