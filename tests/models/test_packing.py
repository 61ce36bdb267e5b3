"""Packed documents in one row: each attends only to itself, with positions restarting."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmexp import GPT, CausalLM, from_name
from lmexp.models.layers import document_positions


def tiny_gpt(position: str = "learned", qk_norm: bool = False) -> GPT:
    torch.manual_seed(0)
    config = from_name("gpt-tiny", vocab_size=40, n_layer=2, n_embd=32, n_head=2, block_size=32, dropout=0.0,
                       position=position, qk_norm=qk_norm)
    return GPT(config).eval()


def test_document_positions_restart_at_each_document():
    documents = torch.tensor([[0, 0, 0, 1, 1, 2, -1, -1], [0, 0, 0, 0, 0, 0, 0, 0]])
    assert document_positions(documents).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1], list(range(8))]


@pytest.mark.parametrize("position", ["learned", "rotary"])
def test_a_packed_document_gets_the_logits_it_gets_alone(position: str):
    model = tiny_gpt(position)
    first, second = torch.randint(0, 40, (1, 7)), torch.randint(0, 40, (1, 9))
    pad = torch.zeros(1, 4, dtype=torch.long)
    packed = torch.cat([first, second, pad], dim=1)
    documents = torch.tensor([[0] * 7 + [1] * 9 + [-1] * 4])
    with torch.no_grad():
        together = model(packed, document_ids=documents)
        alone_first, alone_second = model(first), model(second)
    assert torch.isfinite(together).all()  # padding attends only to padding: no NaN
    torch.testing.assert_close(together[:, :7], alone_first, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(together[:, 7:16], alone_second, atol=1e-5, rtol=1e-5)
    # Without document ids the second document would see the first: the test can tell them apart.
    with torch.no_grad():
        assert not torch.allclose(model(packed)[:, 7:16], alone_second, atol=1e-3)


def test_one_document_per_row_changes_nothing():
    model = tiny_gpt("rotary", qk_norm=True)
    tokens = torch.randint(0, 40, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, document_ids=torch.zeros_like(tokens)), model(tokens))


def test_document_ids_need_the_input_shape_and_no_cache():
    model = tiny_gpt()
    tokens = torch.randint(0, 40, (1, 6))
    with pytest.raises(ValueError, match="document_ids"):
        model(tokens, document_ids=torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="without a cache"):
        model(tokens, cache=model.make_cache(1), document_ids=torch.zeros_like(tokens))


def test_causal_lm_passes_document_ids_and_keeps_the_fused_kernel_without(monkeypatch: pytest.MonkeyPatch):
    torch.manual_seed(0)
    objective = CausalLM("gpt-tiny", network_overrides={"vocab_size": 40, "n_layer": 1, "n_embd": 32, "n_head": 2,
                                                        "block_size": 32, "dropout": 0.0})
    objective.eval()
    a, b = torch.randint(0, 40, (1, 8)), torch.randint(0, 40, (1, 6))
    packed = {"input_ids": torch.cat([a[:, :-1], b[:, :-1]], 1), "labels": torch.cat([a[:, 1:], b[:, 1:]], 1),
              "document_ids": torch.tensor([[0] * 7 + [1] * 5])}
    alone = [{"input_ids": x[:, :-1], "labels": x[:, 1:]} for x in (a, b)]
    calls: list[bool] = []
    sdpa = F.scaled_dot_product_attention

    def record(*args, **kwargs):
        calls.append(kwargs.get("is_causal", False) and kwargs.get("attn_mask") is None)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", record)
    with torch.no_grad():
        losses = [objective.lm_step(batch, "val").nll.item() for batch in alone]
        assert all(calls)  # batches without document ids: the fused causal kernel, no mask
        packed_loss = objective.lm_step(packed, "val").nll.item()
    assert not calls[-1]
    assert packed_loss == pytest.approx((losses[0] * 7 + losses[1] * 5) / 12, rel=1e-5)
