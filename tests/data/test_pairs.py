"""Supervised fine-tuning data: templates, reading pairs, loss masking, truncation, batches."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lmexp import CausalLM, SFTDataModule
from lmexp.data.chat import TEMPLATES, ChatTemplate, encode_segments, end_of_text_id
from lmexp.data.contract import DataContract
from lmexp.data.pairs import IGNORE, Conversation, encode_conversations, read_conversations
from lmexp.data.tokenizer import train_tokenizer
from lmexp.errors import ConfigError, DataError

SST = ChatTemplate.from_value({"user": "Review: {content}\nSentiment:", "assistant": " {content}\n"})
ALPHABET = "abcdefghijklmnopqrstuvwxyzRSv:.' \n"


def char_tokenizer(end_of_text: bool = True):
    specials = ["[UNK]", "<|endoftext|>"] if end_of_text else ["[UNK]"]
    tokenizer = train_tokenizer([ALPHABET], "char", 64, specials)
    tokenizer.encode_special_tokens = True
    return tokenizer


def pair(prompt: str, response: str, origin: str = "t:2") -> Conversation:
    return Conversation(({"role": "user", "content": prompt}, {"role": "assistant", "content": response}), origin)


def write_tsv(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------- templates
def test_template_segments_train_responses_and_end_markers_only():
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "yo"}, {"role": "user", "content": "bye"},
                {"role": "assistant", "content": "ok"}]
    chatml = TEMPLATES["chatml"]
    assert chatml.segments(messages) == [
        ("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", False),
        ("yo<|im_end|>\n", True),
        ("<|im_start|>user\nbye<|im_end|>\n<|im_start|>assistant\n", False),
        ("ok<|im_end|>\n", True),
    ]
    assert chatml.stop == "<|im_end|>\n"
    assert SST.prompt(messages[1:2]) == "Review: hi\nSentiment: "
    assert SST.stop == "\n" and ChatTemplate(assistant="{content}").stop is None
    assert ChatTemplate.from_value(None) == TEMPLATES["plain"] == ChatTemplate.from_value("plain")
    assert ChatTemplate.from_value(SST.to_dict()) == SST


@pytest.mark.parametrize(("value", "words"), [
    ({"user": "Review:"}, ["data.template.user", "{content}"]),
    ("llama9", ["'llama9'", "plain"]),
    ({"bot": "{content}"}, ["'bot'", "assistant"]),
])
def test_bad_templates_are_refused_in_one_line(value, words):
    with pytest.raises(ConfigError) as err:
        ChatTemplate.from_value(value)
    assert "\n" not in str(err.value) and all(word in str(err.value) for word in words)


def test_unknown_role_is_refused_in_one_line():
    with pytest.raises(DataError, match=r"role 'tool': use one of system, user, assistant"):
        SST.segments([{"role": "tool", "content": "x"}])


def test_end_of_text_id_and_segments_encoded_separately():
    tokenizer = char_tokenizer()
    eos = end_of_text_id(tokenizer)
    assert eos == tokenizer.token_to_id("<|endoftext|>")
    assert end_of_text_id(char_tokenizer(end_of_text=False)) is None
    ids, trained = encode_segments(tokenizer, [("ab", False), ("c", True)], eos)
    assert ids == [*tokenizer.encode("ab").ids, *tokenizer.encode("c").ids, eos] and trained == [False, False, True, True]


# ------------------------------------------------------------------------------------------------ reading
def test_read_pairs_with_column_alternatives_and_response_values(tmp_path: Path):
    train = write_tsv(tmp_path / "train.tsv", "label\tsentence", ["1\tgood film", "0\tdull"])
    dev = write_tsv(tmp_path / "dev.tsv", "label\tcontent", ["0\tbad"])
    values = {"0": "negative", "1": "positive"}
    read = lambda path: read_conversations(path, ["sentence", "content"], "label", None, "judge", values)
    first, second = read(train)
    assert first.messages == ({"role": "system", "content": "judge"}, {"role": "user", "content": "good film"},
                              {"role": "assistant", "content": "positive"})
    assert second.response == "negative" and first.origin.endswith("train.tsv:2")
    assert read(dev)[0].context[-1] == {"role": "user", "content": "bad"}


def test_read_messages_from_jsonl_and_csv(tmp_path: Path):
    messages = [{"role": "user", "content": "2+2"}, {"role": "assistant", "content": "4"}]
    jsonl = tmp_path / "chat.jsonl"
    jsonl.write_text(json.dumps({"messages": messages}) + "\n", encoding="utf-8")
    csv = tmp_path / "chat.csv"
    csv.write_text('messages\n"' + json.dumps(messages).replace('"', '""') + '"\n', encoding="utf-8")
    for path in (jsonl, csv):
        assert read_conversations(path)[0].messages == tuple(messages)


@pytest.mark.parametrize(("header", "row", "words"), [
    ("text\tlabel", "good\t1", ["no column 'prompt'", "data.prompt_column"]),
    ("prompt\tresponse", "good\t ", ["empty 'response' cell"]),
    ("prompt\tresponse", "good\tmaybe", ["response 'maybe'", "data.response_values"]),
])
def test_bad_pairs_are_refused_in_one_line(tmp_path: Path, header, row, words):
    path = write_tsv(tmp_path / "bad.tsv", header, [row])
    values = {"0": "negative", "1": "positive"} if "maybe" in row else None
    with pytest.raises(DataError) as err:
        read_conversations(path, response_values=values)
    assert "\n" not in str(err.value) and all(word in str(err.value) for word in words), str(err.value)


@pytest.mark.parametrize(("messages", "words"), [
    ([{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}], ["role 'robot'"]),
    ([{"role": "user", "content": "x"}], ["must end with an assistant message"]),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}], ["empty assistant message"]),
    ([{"role": "assistant", "content": "y"}], ["only the assistant's answer"]),
])
def test_bad_conversations_are_refused_in_one_line(tmp_path: Path, messages, words):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": messages}) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as err:
        read_conversations(path)
    assert "\n" not in str(err.value) and all(word in str(err.value) for word in words) and "chat.jsonl:1" in str(err.value)


# ----------------------------------------------------------------------------------------------- encoding
def test_labels_mask_the_prompt_and_end_with_the_end_of_text():
    tokenizer = char_tokenizer()
    eos = end_of_text_id(tokenizer)
    encoded = encode_conversations(tokenizer, SST, [pair("good", "positive")], max_length=64)
    ids = tokenizer.encode("Review: good\nSentiment: ").ids + tokenizer.encode("positive\n").ids + [eos]
    assert encoded.inputs[0] == ids[:-1]
    n_prompt = len(tokenizer.encode("Review: good\nSentiment: ").ids)
    # labels[t] is the token at t + 1: the prompt's tokens (predicted from the prompt) carry none.
    assert encoded.labels[0] == [IGNORE] * (n_prompt - 1) + ids[n_prompt:]
    assert encoded.labels[0][-2:] == [tokenizer.token_to_id("\n"), eos]  # end marker, then end-of-text
    with_prompt = encode_conversations(tokenizer, SST, [pair("good", "positive")], 64, include_prompt_loss=True)
    assert with_prompt.labels[0] == ids[1:]


def test_a_template_without_end_marker_needs_an_end_of_text_token():
    bare = ChatTemplate(assistant="{content}")
    with pytest.raises(ConfigError, match=r"data.template.assistant='\{content\}' has no end marker"):
        encode_conversations(char_tokenizer(end_of_text=False), bare, [pair("a", "b")], 32)
    assert encode_conversations(char_tokenizer(), bare, [pair("a", "b")], 32).labels[0][-1] == end_of_text_id(char_tokenizer())


def test_truncation_cuts_the_prompt_first_and_counts_what_it_cut():
    tokenizer = char_tokenizer()
    long_prompt, response = "v" * 40, "positive"  # response: "positive\n" + eos = 10 tokens
    n_prompt = len(SST.prompt([{"role": "user", "content": long_prompt}]))
    encoded = encode_conversations(tokenizer, SST, [pair(long_prompt, response), pair("ok", response)], max_length=31)
    inputs, labels = encoded.inputs[0], encoded.labels[0]
    assert len(inputs) == 31 and encoded.inputs[1] == tokenizer.encode("Review: ok\nSentiment: positive\n").ids
    assert tokenizer.decode(inputs).startswith("vvvv") and "Sentiment: positive" in tokenizer.decode(inputs)
    assert sum(label != IGNORE for label in labels) == 10  # the whole response is trained
    cut = encoded.truncation
    assert (cut.pairs, cut.prompt_tokens, cut.response_tokens, cut.examples) == (1, n_prompt - 22, 0, 2)
    # A response that does not fit alone keeps half the budget for the prompt's end and loses its tail.
    alone = encode_conversations(tokenizer, SST, [pair("ok", "x" * 30)], max_length=20)  # 22 + 32 tokens
    assert alone.truncation.response_tokens == 32 - 11 and len(alone.inputs[0]) == 20
    assert sum(label == IGNORE for label in alone.labels[0]) == 9


# ----------------------------------------------------------------------------------- the data module
def sst_files(tmp_path: Path, n: int = 24) -> dict:
    rows = [f"{i % 2}\t{'a good film' if i % 2 else 'a dull film'} {'v' * (i % 5)}" for i in range(n)]
    train = write_tsv(tmp_path / "train.tsv", "label\tsentence", rows)
    dev = write_tsv(tmp_path / "dev.tsv", "label\tcontent", rows[:6])
    return {"train": str(train), "test": str(dev), "prompt_column": ["sentence", "content"],
            "response_column": "label", "template": SST.to_dict(), "response_values": {"0": "negative", "1": "positive"},
            "tokenizer": "char"}


def ready(data: SFTDataModule, block_size: int = 64, arch: str = "gpt", stage: str = "fit") -> SFTDataModule:
    data.accept(DataContract("causal_lm", block_size, arch))
    data.setup(stage)
    return data


def test_data_module_answers_choices_settings_and_truncation_report(tmp_path: Path, caplog):
    with caplog.at_level(logging.INFO):
        data = ready(SFTDataModule(**sst_files(tmp_path), max_length=24, val_fraction=0.25), stage="fit")
        data.setup("test")
    assert len(data.splits["train"]) == 18 and len(data.splits["val"]) == 6
    assert data.answers("test")[0] == ("Review: a dull film \nSentiment: ", "negative")
    assert data.answer_messages("test")[1] == [{"role": "user", "content": "a good film v"}]
    assert data.choices == ["negative", "positive"]
    assert data.input_settings() == {"kind": "sft", "template": SST.to_dict(), "system": None,
                                     "response_values": {"0": "negative", "1": "positive"}, "max_length": 24}
    assert data.tokenizer.token_to_id("<|endoftext|>") is not None  # a tokenizer trained here ends responses
    cut = data.truncation["test"]
    assert cut.pairs > 0 and cut.response_tokens == 0 and cut.prompt_tokens > 0
    assert any("truncation: " in message and "test:" in message and "examples cut" in message
               for message in caplog.messages)


def test_padded_batches_and_packed_rows(tmp_path: Path):
    padded = ready(SFTDataModule(**sst_files(tmp_path), batch_size=4, val_fraction=0))
    batch = next(iter(padded.train_dataloader()))
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    assert ((batch["attention_mask"] == 0) <= (batch["labels"] == IGNORE)).all()  # padding carries no loss
    packed = ready(SFTDataModule(**sst_files(tmp_path), batch_size=2, val_fraction=0, packing=True), block_size=128)
    batches = list(packed._dataset("train", shuffle=True))  # every row (the loader drops none either)
    documents = torch.cat([torch.nn.functional.pad(b["document_ids"], (0, 128 - b["document_ids"].shape[1]), value=-1)
                           for b in batches])
    assert documents.max() >= 1 and max(b["input_ids"].shape[1] for b in batches) <= 128
    # Every example is in exactly one row, whole.
    assert sum(int((row.diff() != 0).sum()) + 1 - int((row < 0).any()) for row in documents) == 24


def test_packing_refuses_an_lstm(tmp_path: Path):
    with pytest.raises(ConfigError, match="data.packing=false for an lstm"):
        ready(SFTDataModule(**sst_files(tmp_path), packing=True), arch="lstm")


def test_test_stage_reads_only_the_test_file_with_a_model_tokenizer(tmp_path: Path):
    files = {**sst_files(tmp_path), "train": str(tmp_path / "missing.tsv")}
    data = SFTDataModule(**files)
    data.accept(DataContract("causal_lm", 64, "gpt", char_tokenizer()))
    data.setup("test")
    assert set(data.splits) == {"test"} and len(data.encoded["test"].inputs) == 6


def test_resumed_epoch_continues_with_the_same_batches(tmp_path: Path):
    data = ready(SFTDataModule(**sst_files(tmp_path), batch_size=3, val_fraction=0, bucket_by_length=True))
    full = [b["input_ids"] for b in data._dataset("train", shuffle=True)]
    resumed = data._dataset("train", shuffle=True)
    resumed.resume_from(0, 2)
    assert all(torch.equal(a, b["input_ids"]) for a, b in zip(full[2:], resumed, strict=True))


# --------------------------------------------------------------------------------------- loss masking
def test_loss_is_the_mean_response_nll_computed_by_hand(tmp_path: Path):
    """The objective's loss over an SFT batch equals the mean NLL of the response tokens (and
    end-of-text) computed by hand, and prompt positions carry no loss whatever their logits."""
    data = ready(SFTDataModule(**sst_files(tmp_path), batch_size=4, val_fraction=0))
    batch = next(iter(data._dataset("train", shuffle=False)))
    torch.manual_seed(0)
    objective = CausalLM("gpt-tiny", network_overrides={"vocab_size": data.vocab_size, "n_layer": 1, "n_embd": 32,
                                                        "n_head": 2, "block_size": 64})
    objective.eval()
    logits = objective.model(batch["input_ids"]).detach()
    total, count = 0.0, 0
    for row, messages in enumerate(data.answer_messages("train")[:4]):
        prompt = len(SST.prompt(messages))  # characters = tokens (character tokenizer)
        length = int(batch["attention_mask"][row].sum())
        sequence = batch["input_ids"][row, :length].tolist() + [int(batch["labels"][row, length - 1])]
        for t in range(prompt - 1, length):  # predict the response, its end marker and end-of-text
            total -= torch.log_softmax(logits[row, t], -1)[sequence[t + 1]].item()
            count += 1
    hand = total / count
    assert count == int((batch["labels"] != IGNORE).sum())
    for stage in ("train", "val"):
        assert objective.lm_step(batch, stage).loss.item() == pytest.approx(hand, rel=1e-5)

    class PromptNoise(torch.nn.Module):
        """The same model with random logits wherever the label is ignored (prompt and padding)."""

        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, **kwargs):
            out = self.inner(input_ids, **kwargs)
            return torch.where((batch["labels"] == IGNORE)[..., None], torch.randn_like(out) * 100, out)

    objective.model = PromptNoise(objective.model)
    assert objective.lm_step(batch, "val").loss.item() == pytest.approx(hand, rel=1e-5)
    prompt_loss = ready(SFTDataModule(**sst_files(tmp_path), batch_size=4, val_fraction=0, include_prompt_loss=True))
    assert (next(iter(prompt_loss._dataset("train", shuffle=False)))["labels"] != IGNORE).sum() > count


def test_sft_fits_packed_and_padded(tmp_path: Path, cpu_trainer_kwargs: dict):
    for packing in (False, True):
        data = SFTDataModule(**sst_files(tmp_path), batch_size=4, packing=packing, val_fraction=0.25)
        objective = CausalLM("gpt-tiny", network_overrides={"n_layer": 1, "n_embd": 32, "n_head": 2, "block_size": 64},
                             warmup_steps=0)
        trainer = pl.Trainer(max_steps=3, val_check_interval=3, limit_val_batches=1, **cpu_trainer_kwargs)
        data.accept(objective.data_contract())
        trainer.fit(objective, datamodule=data)
        assert torch.isfinite(trainer.callback_metrics["val/loss"])
