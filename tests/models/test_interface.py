"""GPT, BERT and LSTMLM answer the same calls, and the finders name each block's layers by role."""

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


def test_the_interface_gives_what_forward_and_the_heads_gave():
    ids, mask, types = batch()
    gpt = network("gpt")
    torch.testing.assert_close(gpt.logits(ids, mask), gpt(ids, mask))
    torch.testing.assert_close(gpt.hidden_states(ids), gpt.trunk(ids))
    bert = network("bert")
    torch.testing.assert_close(bert.hidden_states(ids, mask, types), bert(ids, mask, types))
    torch.testing.assert_close(bert.logits(ids, mask, types), bert.mlm_logits(bert(ids, mask, types)))
    lstm = network("lstm")
    torch.testing.assert_close(lstm.logits(ids), lstm(ids))


@pytest.mark.parametrize("arch", ["gpt", "bert"])
def test_classify_takes_the_same_arguments_in_gpt_and_bert(arch):
    model, (ids, mask, types) = network(arch, labels=True), batch()
    assert model.pooled(ids, mask, types).shape == (2, model.config.n_embd)
    assert model.classify(ids, mask, types).shape == (2, 2)
    torch.testing.assert_close(model.classify(ids, mask, types), model.classifier(model.pooled(ids, mask, types)))


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
