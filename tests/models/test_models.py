import re

import pytest
import torch
import torch.nn.functional as F

from lmexp.errors import ConfigError
from lmexp.models import (
    BERT,
    GPT,
    LSTMLM,
    PRESETS,
    ModelConfig,
    build_model,
    count_parameters,
    from_name,
)

VOCAB = 50


def tiny(arch: str = "gpt", **overrides) -> ModelConfig:
    return from_name(f"{arch}-tiny", vocab_size=VOCAB, **overrides)


def random_ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# --- configuration ---------------------------------------------------------------------------

REFERENCE_SIZES = {"gpt2": 124_439_808, "bert-base": 110_106_428}
REFERENCE_VOCABS = {"gpt2": 50257, "bert-base": 30522}  # GPT-2's BPE, BERT's WordPiece


@pytest.mark.parametrize("name", [n for n in PRESETS if n not in REFERENCE_SIZES])
def test_preset_builds(name):
    model = build_model(from_name(name, vocab_size=VOCAB))
    assert count_parameters(model) > 0


@pytest.mark.parametrize("name", REFERENCE_SIZES)
def test_reference_preset_parameter_count(name):
    # BERT-base: 109,482,240 of HF BertModel (pooler included) + 622,650 for the MLM head + 1,538
    # for the two-way sentence head: HF BertForPreTraining's 110,106,428.
    with torch.device("meta"):
        model = build_model(from_name(name, vocab_size=REFERENCE_VOCABS[name]))
    assert count_parameters(model) == REFERENCE_SIZES[name]


def test_from_name_overrides_and_replace():
    config = from_name("gpt-nano", vocab_size=65, dropout=0.1)
    assert (config.n_layer, config.vocab_size, config.dropout) == (4, 65, 0.1)
    assert config.replace(position="rotary").position == "rotary"
    assert config.to_dict()["n_embd"] == 128


def test_unknown_preset_lists_valid_names():
    message = "unknown model preset 'gpt-huge': choose one of gpt-tiny, gpt-nano, gpt-mini, gpt2, bert-tiny"
    with pytest.raises(ConfigError, match=message):
        from_name("gpt-huge")


def test_unknown_field():
    with pytest.raises(ConfigError, match="unknown model config field.* n_layers: valid fields are arch"):
        from_name("gpt-tiny", n_layers=3)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            dict(n_embd=30, n_head=4),
            "n_embd=30 is not divisible by n_head=4: choose n_embd as a multiple of n_head",
        ),
        (
            dict(n_embd=12, n_head=4, position="rotary"),
            "rotary positions need an even head dimension but n_embd/n_head=3: "
            "choose n_embd as a multiple of 2*n_head",
        ),
        (dict(dropout=1.0), "dropout=1.0 is outside [0, 1)"),
        (dict(dropout=-0.1), "dropout=-0.1 is outside [0, 1)"),
        (dict(n_layer=0), "n_layer=0 must be a positive integer"),
        (dict(vocab_size=0), "vocab_size=0 must be a positive integer"),
        (dict(arch="rnn"), "arch='rnn' is not supported: choose one of gpt, bert, lstm"),
        (dict(position="alibi"), "position='alibi' is not supported: choose one of learned, rotary"),
        (dict(norm_position="sandwich"), "norm_position='sandwich' is not supported: choose one of pre, post"),
        (dict(activation="relu"), "activation='relu' is not supported: choose one of gelu, gelu_tanh"),
        (dict(norm_eps=0.0), "norm_eps=0.0 is outside (0, 1)"),
    ],
)
def test_invalid_config(fields, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        ModelConfig(**fields)


def test_lstm_ignores_head_divisibility():
    """n_head means nothing to an LSTM: n_embd=30 with n_head=4 is refused for gpt (above) but
    builds and runs as an lstm."""
    config = ModelConfig(arch="lstm", n_embd=30, n_head=4, vocab_size=VOCAB)
    assert (config.n_embd, config.n_head) == (30, 4)
    model = build_model(config)
    assert isinstance(model, LSTMLM)
    assert model(random_ids(2, 5)).shape == (2, 5, VOCAB)


def test_build_requires_vocab_size():
    with pytest.raises(ConfigError, match="vocab_size is not set: it comes from the tokenizer"):
        build_model(from_name("gpt-tiny"))


def test_build_dispatches_on_arch():
    assert isinstance(build_model(tiny("gpt")), GPT)
    assert isinstance(build_model(tiny("bert")), BERT)
    assert isinstance(build_model(from_name("lstm-small", vocab_size=VOCAB, n_embd=16)), LSTMLM)


# --- GPT -------------------------------------------------------------------------------------


@pytest.mark.parametrize("position", ["learned", "rotary"])
def test_gpt_is_causal(position):
    model = GPT(tiny(position=position)).eval()
    ids = random_ids(2, 16)
    changed = ids.clone()
    changed[:, 8] = (changed[:, 8] + 1) % VOCAB
    a, b = model(ids), model(changed)
    assert a.shape == (2, 16, VOCAB)
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_gpt_rejects_too_long_input():
    model = GPT(tiny())
    with pytest.raises(ValueError, match="input has 33 tokens but block_size=32"):
        model(random_ids(1, 33))


def test_gpt_init_scales_residual_projections():
    model = GPT(from_name("gpt-nano", vocab_size=VOCAB))
    block = model.trunk.blocks[0]
    assert block.attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert block.mlp.out_proj.weight.std().item() == pytest.approx(0.02 / (2 * 4) ** 0.5, rel=0.05)
    assert torch.all(block.attn.qkv.bias == 0)


@pytest.mark.parametrize("arch", ["gpt", "bert", "lstm"])
def test_weight_tying_shares_storage_and_counts_once(arch):
    config = from_name(f"{arch}-tiny" if arch != "lstm" else "lstm-small", vocab_size=VOCAB, n_embd=32)
    tied, untied = build_model(config), build_model(config.replace(tie_embeddings=False))
    embedding = tied.tok_emb if arch == "lstm" else tied.trunk.tok_emb
    output = tied.mlm_head.decoder if arch == "bert" else tied.lm_head
    assert output.weight.data_ptr() == embedding.weight.data_ptr()
    assert count_parameters(untied) - count_parameters(tied) == VOCAB * 32


def test_count_parameters_trainable_only():
    model = GPT(tiny())
    total = count_parameters(model)
    model.trunk.tok_emb.weight.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == total - VOCAB * 32


@pytest.mark.parametrize("position", ["learned", "rotary"])
def test_kv_cache_matches_full_forward(position):
    model = GPT(tiny(position=position)).eval()
    ids = random_ids(2, 20)
    full = model(ids)
    cache = model.make_cache(batch_size=2)
    # Prefill, one chunk of several tokens after a prefix (offset causal mask), then single tokens.
    pieces = [model(ids[:, :5], cache=cache), model(ids[:, 5:9], cache=cache)]
    pieces += [model(ids[:, t : t + 1], cache=cache) for t in range(9, 20)]
    assert cache.length == 20
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


def test_kv_cache_overflow_is_reported():
    model = GPT(tiny()).eval()
    cache = model.make_cache(batch_size=1)
    model(random_ids(1, 30), cache=cache)
    with pytest.raises(ValueError, match="30 cached \\+ 3 new tokens exceed block_size=32"):
        model(random_ids(1, 3), cache=cache)


def test_activation_checkpointing_recomputes_blocks_and_gives_same_gradients(monkeypatch):
    """With the flag on, each block's forward runs again during backward (its activations were
    not kept); the gradients are the same as without."""
    ids = random_ids(2, 12)
    grads, runs = [], []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = GPT(tiny(activation_checkpointing=checkpointing)).train()
        block = model.trunk.blocks[0]
        calls, forward = [], block.forward

        def counted(*args, forward=forward, calls=calls, **kwargs):
            calls.append(1)
            return forward(*args, **kwargs)

        monkeypatch.setattr(block, "forward", counted)
        logits = model(ids)
        in_forward = len(calls)
        F.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()
        runs.append((in_forward, len(calls)))
        grads.append(block.attn.qkv.weight.grad)
    assert runs == [(1, 1), (1, 2)]  # (forward runs after forward, after backward): off, on
    torch.testing.assert_close(grads[0], grads[1])


# --- BERT ------------------------------------------------------------------------------------


def test_bert_is_bidirectional_and_heads_have_right_shapes():
    model = BERT(tiny("bert")).eval()
    ids = random_ids(2, 16)
    changed = ids.clone()
    changed[:, 8] = (changed[:, 8] + 1) % VOCAB
    a, b = model(ids), model(changed)
    assert a.shape == (2, 16, 32)
    assert not torch.allclose(a[:, :8], b[:, :8])
    assert model.mlm_logits(a).shape == (2, 16, VOCAB)
    assert model.pool(a).shape == (2, 32)


@pytest.mark.parametrize("position", ["learned", "rotary"])
@pytest.mark.parametrize("options", [{}, {"qk_norm": True, "activation": "relu2"}], ids=["plain", "qk_norm-relu2"])
def test_bert_padding_is_ignored(position, options):
    model = BERT(tiny("bert", position=position, **options)).eval()
    ids = random_ids(2, 10)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, 7:] = 0
    changed = ids.clone()
    changed[0, 7:] = (changed[0, 7:] + 1) % VOCAB
    a, b = model(ids, attention_mask=mask), model(changed, attention_mask=mask)
    torch.testing.assert_close(a[0, :7], b[0, :7])
    torch.testing.assert_close(a[1], b[1])


def test_bert_token_types_change_hidden_states():
    model = BERT(tiny("bert")).eval()
    ids = random_ids(1, 8)
    types = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1]])
    assert not torch.allclose(model(ids), model(ids, token_type_ids=types))


# --- LSTM ------------------------------------------------------------------------------------


def test_lstm_shape_and_training_step():
    torch.manual_seed(0)
    model = LSTMLM(ModelConfig(arch="lstm", n_layer=2, n_embd=32, vocab_size=VOCAB, dropout=0.1))
    ids = random_ids(4, 16)
    assert model(ids).shape == (4, 16, VOCAB)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3


# --- left padding (batched generation) -------------------------------------------------------


def left_padded(lengths: list[int], pad_id: int = VOCAB - 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts of the given lengths, left-padded with a real token id, and their mask."""
    width = max(lengths)
    ids = random_ids(len(lengths), width)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, : width - n] = pad_id
        mask[row, width - n :] = 1
    return ids, mask


@pytest.mark.parametrize("position", ["learned", "rotary"])
def test_gpt_left_padded_rows_match_the_rows_alone(position):
    model = GPT(tiny(position=position)).eval()
    ids, mask = left_padded([9, 4, 1])
    logits = model(ids, attention_mask=mask)
    assert not logits.isnan().any()
    for row, n in enumerate([9, 4, 1]):
        torch.testing.assert_close(logits[row, 9 - n :], model(ids[row : row + 1, 9 - n :])[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("position", ["learned", "rotary"])
def test_kv_cache_keeps_the_padding_mask(position):
    model = GPT(tiny(position=position)).eval()
    ids, mask = left_padded([6, 3])
    more = random_ids(2, 5, seed=1)
    full = model(torch.cat((ids, more), 1), attention_mask=torch.cat((mask, torch.ones_like(more)), 1))
    cache = model.make_cache(batch_size=2)
    pieces = [model(ids, attention_mask=mask, cache=cache), model(more[:, :2], cache=cache)]
    pieces += [model(more[:, t : t + 1], cache=cache) for t in range(2, 5)]
    torch.testing.assert_close(torch.cat(pieces, dim=1)[:, 6:], full[:, 6:], rtol=1e-5, atol=1e-5)
    # The padded row's new tokens see only its 3 real tokens, as the row alone would.
    alone = model(torch.cat((ids[1:, 3:], more[1:]), 1))
    torch.testing.assert_close(torch.cat(pieces, dim=1)[1, 3:], alone[0], rtol=1e-5, atol=1e-5)
    cache.reset()
    assert cache.mask is None and cache.length == 0


def test_no_query_has_every_key_masked(monkeypatch):
    """A fully masked query row gives NaN on some backends (and NaN times a zero attention weight
    spreads to real rows in the next layer), so pad queries must at least see themselves."""
    rows_without_keys = []
    sdpa = F.scaled_dot_product_attention

    def checking_sdpa(q, k, v, attn_mask=None, **kwargs):
        if attn_mask is not None:
            full = attn_mask.expand(q.size(0), 1, q.size(2), k.size(2))
            if kwargs.get("is_causal") is False:
                full = full & torch.ones(q.size(2), k.size(2), dtype=torch.bool).tril(k.size(2) - q.size(2))
            rows_without_keys.append(int((~full.any(-1)).sum()))
        return sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", checking_sdpa)
    model = GPT(tiny()).eval()
    ids, mask = left_padded([7, 2])
    model(ids, attention_mask=mask)
    cache = model.make_cache(batch_size=2)
    model(ids, attention_mask=mask, cache=cache)
    model(random_ids(2, 3), cache=cache)
    assert rows_without_keys and rows_without_keys == [0] * len(rows_without_keys)


def test_unmasked_gpt_keeps_the_fused_causal_kernel(monkeypatch):
    calls = []
    sdpa = F.scaled_dot_product_attention

    def recording_sdpa(q, k, v, attn_mask=None, is_causal=False, **kwargs):
        calls.append((attn_mask is None, is_causal))
        return sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording_sdpa)
    model = GPT(tiny())
    model(random_ids(2, 8))
    assert calls == [(True, True)] * 2  # both layers: no mask tensor, is_causal=True


def test_post_norm_bert_normalises_each_residual_sum_and_has_no_final_norm():
    """BERT's layout: the embeddings are normalised, every block ends in a LayerNorm (its output
    has zero mean and unit variance per token before the affine), and there is no ln_f."""
    config = from_name("bert-tiny", vocab_size=50)
    assert (config.norm_position, config.embedding_norm, config.norm_eps) == ("post", True, 1e-12)
    model = build_model(config).eval()
    assert model.trunk.ln_f is None and model.trunk.emb_norm is not None
    hidden = model(torch.randint(0, 50, (2, 8)))
    assert torch.allclose(hidden.mean(-1), torch.zeros(2, 8), atol=1e-5)
    assert torch.allclose(hidden.var(-1, unbiased=False), torch.ones(2, 8), atol=1e-3)
    pre = build_model(config.replace(norm_position="pre", embedding_norm=False))
    assert pre.trunk.ln_f is not None and pre.trunk.emb_norm is None
    assert count_parameters(pre) == count_parameters(model)  # one LayerNorm moved, none added


# --- per-layer shapes (structurally pruned networks) -------------------------------------------


@pytest.mark.parametrize("arch", ["gpt", "bert"])
def test_per_layer_heads_and_mlp_widths_shrink_the_weights(arch):
    config = tiny(arch, layer_heads=[1, 2], layer_mlp_hidden=[24, 128])
    model = build_model(config)
    blocks = model.trunk.blocks
    head_dim = config.head_dim
    assert blocks[0].attn.qkv.weight.shape == (3 * head_dim, config.n_embd)
    assert blocks[0].attn.out_proj.weight.shape == (config.n_embd, head_dim)
    assert blocks[1].attn.qkv.weight.shape == (3 * config.n_embd, config.n_embd)
    assert blocks[0].mlp.fc_in.weight.shape == (24, config.n_embd)
    assert blocks[1].mlp.out_proj.weight.shape == (config.n_embd, 128)
    assert count_parameters(model) < count_parameters(build_model(tiny(arch)))
    ids = random_ids(2, 8)
    out = model(ids)
    assert out.shape[:2] == (2, 8) and torch.isfinite(out).all()


def test_per_layer_heads_decode_with_the_kv_cache_as_without():
    model = build_model(tiny("gpt", layer_heads=[1, 2])).eval()
    ids = random_ids(1, 6)
    full = model(ids)
    cache = model.make_cache(1)
    steps = [model(ids[:, :4], cache=cache)] + [model(ids[:, i : i + 1], cache=cache) for i in (4, 5)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(layer_heads=[2]), "one positive size per block"),
        (dict(layer_heads=[0, 2]), "one positive size per block"),
        (dict(layer_heads=[3, 2]), "more than n_head=2"),
        (dict(layer_mlp_hidden=[64, 64, 64]), "one positive size per block"),
    ],
)
def test_bad_per_layer_shapes_are_one_line_errors(fields, message):
    with pytest.raises(ConfigError, match=message):
        tiny("gpt", **fields)
