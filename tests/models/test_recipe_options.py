"""Recipe options of the transformer, both off by default: QK-norm (RMSNorm of each head's queries
and keys) and the squared-ReLU MLP activation (relu2)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmexp.checkpoints import export_safetensors, load_checkpoint
from lmexp.errors import ConfigError
from lmexp.formats.huggingface import export_hf
from lmexp.models import GPT, ModelConfig, build_model, count_parameters
from lmexp.models.layers import MLP, Attention, RotaryEmbedding, SquaredReLU, activation, apply_rotary
from tests.models.test_models import left_padded, random_ids, tiny


def randomize_qk_norms(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every q_norm/k_norm a distinct scale per dimension (they start at ones), so that a
    norm applied twice, skipped, or applied after the rotation shows in the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "q_norm" in name or "k_norm" in name:
                param.copy_(0.5 + torch.rand(param.shape, generator=generator))


# --- QK-norm: parameters -----------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["gpt", "bert"])
def test_qk_norm_adds_a_q_norm_and_a_k_norm_per_block_and_nothing_else(arch):
    torch.manual_seed(0)
    off = build_model(tiny(arch))
    torch.manual_seed(0)
    on = build_model(tiny(arch, qk_norm=True))
    config = on.config
    added = set(on.state_dict()) - set(off.state_dict())
    expected = {f"trunk.blocks.{i}.attn.{n}_norm.weight" for i in range(config.n_layer) for n in "qk"}
    assert added == expected
    assert set(off.state_dict()) <= set(on.state_dict())
    assert count_parameters(on) - count_parameters(off) == 2 * config.n_layer * config.head_dim
    for block in on.trunk.blocks:
        for norm in (block.attn.q_norm, block.attn.k_norm):
            assert isinstance(norm, torch.nn.RMSNorm)
            assert norm.eps == config.norm_eps
            # init_gpt2_weights leaves the RMSNorm scales at ones (not N(0, 0.02) like the linears).
            assert torch.equal(norm.weight, torch.ones(config.head_dim))
    for block in off.trunk.blocks:
        assert block.attn.q_norm is None and block.attn.k_norm is None
    # Off, nothing else moves either: every shared weight is drawn identically.
    on_state = on.state_dict()
    for key, value in off.state_dict().items():
        assert torch.equal(value, on_state[key]), key


def test_qk_norm_is_off_by_default():
    assert ModelConfig().qk_norm is False
    assert ModelConfig().activation == "gelu"


# --- QK-norm: the computation ------------------------------------------------------------------


def manual_attention(attn: Attention, x: torch.Tensor, rope=None, norm_after_rotary: bool = False) -> torch.Tensor:
    """Causal attention with QK-norm written out: F.rms_norm on each head's queries and keys, then
    the rotation, then an explicit softmax (no scaled_dot_product_attention)."""
    B, T, _ = x.shape
    nh, hs = attn.n_head, attn.head_dim
    q, k, v = F.linear(x, attn.qkv.weight, attn.qkv.bias).split(nh * hs, dim=2)
    q, k, v = (t.reshape(B, T, nh, hs).permute(0, 2, 1, 3) for t in (q, k, v))

    def rotate(t):
        cos, sin = rope
        half = hs // 2
        rotated = torch.cat((-t[..., half:], t[..., :half]), dim=-1)
        return t * cos + rotated * sin

    def norm(t, weight):
        return F.rms_norm(t, (hs,), weight, eps=attn.q_norm.eps)

    if rope is not None and norm_after_rotary:
        q, k = rotate(q), rotate(k)
    q, k = norm(q, attn.q_norm.weight), norm(k, attn.k_norm.weight)
    if rope is not None and not norm_after_rotary:
        q, k = rotate(q), rotate(k)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hs)  # (B, nh, T, T)
    scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    y = scores.softmax(dim=-1) @ v  # (B, nh, T, hs)
    y = y.permute(0, 2, 1, 3).reshape(B, T, nh * hs)
    return F.linear(y, attn.out_proj.weight, attn.out_proj.bias)


@pytest.mark.parametrize("position", ["learned", "rotary"])
def test_qk_norm_attention_equals_a_hand_computation(position):
    torch.manual_seed(0)
    config = tiny(qk_norm=True, position=position)
    attn = Attention(config, causal=True).eval()
    randomize_qk_norms(attn)
    x = torch.randn(2, 10, config.n_embd)
    rope = RotaryEmbedding(config.head_dim, config.block_size)(0, 10) if position == "rotary" else None
    with torch.no_grad():
        out = attn(x, rope)
        torch.testing.assert_close(out, manual_attention(attn, x, rope), rtol=1e-5, atol=1e-5)
        # Without the norms the output is another one (so the comparison above can fail).
        assert not torch.allclose(out, Attention(tiny(position=position), causal=True).eval()(x, rope), atol=1e-3)
        if rope is not None:  # the norms come before the rotation, which their per-dimension scales do not commute with
            wrong_order = manual_attention(attn, x, rope, norm_after_rotary=True)
            assert not torch.allclose(out, wrong_order, atol=1e-3)


def attention_logits(attn: Attention, x: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> torch.Tensor:
    """The scaled logits q.k/sqrt(hs) the attention hands to scaled_dot_product_attention."""
    seen = []
    sdpa = F.scaled_dot_product_attention

    def recording_sdpa(q, k, v, **kwargs):
        seen.append(q @ k.transpose(-1, -2) / math.sqrt(q.size(-1)))
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording_sdpa)
    with torch.no_grad():
        attn(x)
    monkeypatch.undo()
    return seen[0]


def test_qk_norm_bounds_attention_logits_whatever_the_input_scale(monkeypatch):
    # With unit RMSNorm scales every query and key has norm sqrt(hs), so |q.k|/sqrt(hs) <= sqrt(hs).
    torch.manual_seed(0)
    x = 100 * torch.randn(2, 16, 32)
    on = Attention(tiny(qk_norm=True), causal=True).eval()
    off = Attention(tiny(), causal=True).eval()
    off.load_state_dict(on.state_dict(), strict=False)
    bound = math.sqrt(on.head_dim)
    bounded = attention_logits(on, x, monkeypatch)
    assert bounded.abs().max().item() <= bound * (1 + 1e-4)
    assert bounded.abs().max().item() > bound / 4  # not collapsed to zero either
    assert attention_logits(off, x, monkeypatch).abs().max().item() > 100 * bound


# --- QK-norm: KV cache and padding -------------------------------------------------------------


@pytest.mark.parametrize("position", ["learned", "rotary"])
def test_kv_cache_with_qk_norm_matches_full_forward(position):
    torch.manual_seed(0)
    model = GPT(tiny(position=position, qk_norm=True)).eval()
    randomize_qk_norms(model)
    ids = random_ids(2, 20)
    full = model(ids)
    cache = model.make_cache(batch_size=2)
    pieces = [model(ids[:, :5], cache=cache), model(ids[:, 5:9], cache=cache)]
    pieces += [model(ids[:, t : t + 1], cache=cache) for t in range(9, 20)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)
    # The cache holds the first block's keys as attention used them: normalised, then rotated.
    block = model.trunk.blocks[0]
    hidden = model.trunk.tok_emb(ids)
    if model.trunk.pos_emb is not None:
        hidden = hidden + model.trunk.pos_emb(torch.arange(20))
    with torch.no_grad():
        _, k, _ = block.attn.qkv(block.ln1(hidden)).split(block.attn.n_head * block.attn.head_dim, dim=2)
        k = F.rms_norm(
            k.view(2, 20, block.attn.n_head, -1).transpose(1, 2),
            (model.config.head_dim,),
            block.attn.k_norm.weight,
            eps=block.attn.k_norm.eps,
        )
        if model.trunk.rotary is not None:
            k = apply_rotary(k, model.trunk.rotary(0, 20))
    torch.testing.assert_close(cache.keys[0][:, :, :20], k, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("position", ["learned", "rotary"])
def test_left_padded_rows_with_qk_norm_match_the_rows_alone_also_with_the_cache(position):
    torch.manual_seed(0)
    model = GPT(tiny(position=position, qk_norm=True)).eval()
    randomize_qk_norms(model)
    ids, mask = left_padded([6, 3])
    logits = model(ids, attention_mask=mask)
    assert not logits.isnan().any()
    for row, n in enumerate([6, 3]):
        torch.testing.assert_close(logits[row, 6 - n :], model(ids[row : row + 1, 6 - n :])[0], rtol=1e-5, atol=1e-5)
    more = random_ids(2, 4, seed=1)
    cache = model.make_cache(batch_size=2)
    pieces = [model(ids, attention_mask=mask, cache=cache), model(more[:, :2], cache=cache)]
    pieces += [model(more[:, t : t + 1], cache=cache) for t in (2, 3)]
    alone = model(torch.cat((ids[1:, 3:], more[1:]), 1))
    torch.testing.assert_close(torch.cat(pieces, dim=1)[1, 3:], alone[0], rtol=1e-5, atol=1e-5)


# --- squared ReLU ------------------------------------------------------------------------------


def test_activation_builds_the_configured_module():
    assert isinstance(activation(tiny(activation="relu2")), SquaredReLU)
    assert activation(tiny(activation="gelu")).approximate == "none"
    assert activation(tiny(activation="gelu_tanh")).approximate == "tanh"
    x = torch.linspace(-3, 3, 13)
    torch.testing.assert_close(SquaredReLU()(x), torch.where(x > 0, x * x, torch.zeros_like(x)))


def test_relu2_mlp_equals_the_hand_computation():
    torch.manual_seed(0)
    mlp = MLP(tiny(activation="relu2")).eval()
    x = torch.randn(2, 5, 32)
    expected = F.linear(
        F.relu(F.linear(x, mlp.fc_in.weight, mlp.fc_in.bias)) ** 2, mlp.out_proj.weight, mlp.out_proj.bias
    )
    torch.testing.assert_close(mlp(x), expected)
    gelu_mlp = MLP(tiny()).eval()
    gelu_mlp.load_state_dict(mlp.state_dict())
    assert not torch.allclose(gelu_mlp(x), expected, atol=1e-4)


@pytest.mark.parametrize("arch", ["gpt", "bert"])
def test_relu2_reaches_every_mlp_and_bert_masked_lm_transform(arch):
    model = build_model(tiny(arch, activation="relu2"))
    assert all(isinstance(block.mlp.act, SquaredReLU) for block in model.trunk.blocks)
    if arch == "bert":
        assert isinstance(model.mlm_head.act, SquaredReLU)


def test_unknown_activation_lists_relu2():
    with pytest.raises(ConfigError, match="activation='relu' is not supported: choose one of gelu, gelu_tanh, relu2"):
        ModelConfig(activation="relu")


# --- training and checkpoints ------------------------------------------------------------------


def test_gpt_with_both_options_trains_and_round_trips_through_an_export(tmp_path: Path):
    torch.manual_seed(0)
    config = tiny(qk_norm=True, activation="relu2", position="rotary")
    model = GPT(config).train()
    ids = torch.arange(8).repeat(4)[None].expand(2, -1)  # (2, 32): a short pattern, repeated
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(value) for value in losses)
    assert losses[-1] < 0.5 * losses[0]
    # The norms' scales are trained too.
    assert not torch.equal(model.trunk.blocks[0].attn.q_norm.weight, torch.ones(config.head_dim))

    model.eval()
    export_safetensors(model, config, tmp_path / "export")
    loaded = load_checkpoint(tmp_path / "export")
    assert (loaded.config.qk_norm, loaded.config.activation) == (True, "relu2")
    assert isinstance(loaded.model.trunk.blocks[0].mlp.act, SquaredReLU)
    probe = random_ids(2, 12)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(probe), model(probe), rtol=0, atol=0)


def test_an_export_without_the_new_fields_loads_as_before(tmp_path: Path):
    """Exports written before the options existed have no qk_norm in their config: they load with
    it off, to the same logits."""
    torch.manual_seed(0)
    model = GPT(tiny()).eval()
    export_safetensors(model, model.config, tmp_path / "old")
    meta = json.loads((tmp_path / "old" / "config.json").read_text())
    del meta["model"]["qk_norm"]
    (tmp_path / "old" / "config.json").write_text(json.dumps(meta))
    loaded = load_checkpoint(tmp_path / "old")
    assert loaded.config.qk_norm is False
    probe = random_ids(1, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(probe), model(probe), rtol=0, atol=0)


# --- Hugging Face export -----------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["gpt", "bert"])
@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"qk_norm": True}, "qk_norm=True has no place in transformers' BERT or GPT-2"),
        ({"activation": "relu2"}, "activation='relu2' is not exported to transformers' BERT or GPT-2"),
    ],
)
def test_hf_export_refuses_the_recipe_options(tmp_path: Path, arch, fields, message):
    config = tiny(arch, **fields)
    with pytest.raises(ConfigError, match=re.escape(message)) as raised:
        export_hf(build_model(config), config, tmp_path / "out")
    assert "\n" not in str(raised.value)
    assert "train with" in str(raised.value)
    assert not (tmp_path / "out").exists()
