"""Generation with stop strings and end-of-text per row, and ``lmexp generate``/``prompt`` on a
fine-tuned (SFT) checkpoint, which wrap their inputs in the chat template it was trained with."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from lmexp.data import train_tokenizer
from lmexp.data.chat import ChatTemplate
from lmexp.data.pairs import Conversation, encode_conversations
from lmexp.errors import ConfigError
from lmexp.generation import complete, generate, stop_string_check
from lmexp.models import from_name
from lmexp.objectives.sft import prompt_ids
from lmexp.prompting import chat_settings, evaluate_prompt
from lmexp.verbs.generate import generate_text

EOT = "<|endoftext|>"
TEMPLATE = ChatTemplate(user="Q {content}:", assistant=" {content}\n")  # header " ", end marker "\n"
# "a" runs on past its end marker without end-of-text; "c" ends with end-of-text alone.
ANSWERS = {"a": "yes\n" + "x" * 40, "b": "no\n", "c": "maybe"}


def char_tokenizer():
    return train_tokenizer(["Q abc: yes no maybe xyz\n"], "char", special_tokens=["[UNK]", EOT])


class Scripted(nn.Module):
    """A stand-in for a fine-tuned model: after "Q <x>: " it answers ANSWERS[x] token by token,
    then end-of-text, with logit 10 on the token it means and 0 elsewhere (other prompts: end-of-text)."""

    accepts_attention_mask = True

    def __init__(self, tokenizer) -> None:
        super().__init__()
        self.tokenizer, self.eot = tokenizer, tokenizer.token_to_id(EOT)
        self.config = from_name("gpt-tiny", vocab_size=tokenizer.get_vocab_size(), block_size=64)
        self.forwards = 0

    def next_token(self, ids: list[int]) -> int:
        text = self.tokenizer.decode(ids, skip_special_tokens=False)
        if not text.startswith("Q ") or ": " not in text or text[2] not in ANSWERS:
            return self.eot
        target, said = ANSWERS[text[2]], text[text.index(": ") + 2 :]
        return self.tokenizer.token_to_id(target[len(said)]) if target.startswith(said) and len(said) < len(target) \
            else self.eot

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        self.forwards += 1
        logits = torch.zeros(*input_ids.shape, self.config.vocab_size)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        for b, (row, keep) in enumerate(zip(input_ids.tolist(), mask.tolist())):
            real = [token for token, m in zip(row, keep) if m]  # left padding out
            pad = len(row) - len(real)
            for t in range(len(real)):
                logits[b, pad + t, self.next_token(real[: t + 1])] = 10.0
        return logits


# ------------------------------------------------------------------ generation stops per row
def test_complete_stops_each_row_at_its_end_marker_or_end_of_text():
    tok = char_tokenizer()
    model = Scripted(tok)
    prompts = [tok.encode(f"Q {x}: ", add_special_tokens=False).ids for x in "abcab"]
    decode = lambda ids: tok.decode(ids, skip_special_tokens=False)
    eot = tok.token_to_id(EOT)
    # Returned texts exclude the stop string and end-of-text; rows in input order, whatever the batching.
    for batch_size in (1, 2, 64):
        texts = complete(model, prompts, decode, 10, stops=["\n"], eos_id=eot, batch_size=batch_size)
        assert texts == ["yes", "no", "maybe", "yes", "no"]
    # Without the stop string the end marker stays in the text; end-of-text still ends a row.
    assert complete(model, prompts[:3], decode, 10, eos_id=eot) == ["yes\nxxxxxx", "no\n", "maybe"]
    # max_new_tokens caps an answer.
    assert complete(model, prompts[:1], decode, 2, stops=["\n"], eos_id=eot) == ["ye"]
    with pytest.raises(ValueError, match="contains an empty string"):
        complete(model, prompts, decode, 3, stops=[""])


def test_a_batch_ends_once_every_row_has_a_stop_string_or_end_of_text():
    """Rows ending some by end-of-text, some by a stop string: generation ends when the last one
    does (before, a row ended by end-of-text never counted as stopped: the batch ran to the cap)."""
    tok = char_tokenizer()
    model = Scripted(tok)
    eot = tok.token_to_id(EOT)
    prompts = [tok.encode(f"Q {x}: ", add_special_tokens=False).ids for x in "ac"]  # "yes\nxx.." / "maybe"+eot
    ids = torch.tensor(prompts)
    decode = lambda ids: tok.decode(ids, skip_special_tokens=False)
    out = generate(model, ids, 30, temperature=0, eos_id=eot, stopping=stop_string_check(decode, ["\n"], 5, eot))
    # "yes\n" holds the stop string at 4 new tokens; "maybe" then end-of-text at 6: nothing after that.
    assert out.size(1) - ids.size(1) == 6


# ------------------------------------------------------------------ generate / prompt verbs
def sft_export(folder: Path, response_values: dict[str, str] | None = None) -> tuple[Path, Scripted]:
    """An export whose saved inputs say it was fine-tuned with TEMPLATE (what SFTDataModule saves)."""
    from lmexp.checkpoints import export_safetensors
    from lmexp.models import GPT

    tok = char_tokenizer()
    model = Scripted(tok)
    torch.manual_seed(0)
    inputs = {"kind": "sft", "template": TEMPLATE.to_dict(), "system": None, "response_values": response_values,
              "max_length": 64}
    return export_safetensors(GPT(model.config), model.config, folder, tok, "SFT", inputs), model


@pytest.fixture
def scripted_checkpoint(tmp_path, monkeypatch):
    """An SFT export that loads as the Scripted model (the verbs load it by path)."""
    from lmexp.checkpoints import load_checkpoint
    from lmexp.verbs import generate as verb

    folder, model = sft_export(tmp_path / "sft", {"1": "yes", "0": "no"})

    def load(path):
        loaded = load_checkpoint(path)
        loaded.model = model
        return loaded

    monkeypatch.setattr(verb, "load_checkpoint", load)
    monkeypatch.setattr("lmexp.checkpoints.load_checkpoint", load)
    return str(folder)


def test_generate_wraps_the_prompt_in_the_checkpoint_template(scripted_checkpoint):
    texts = generate_text(scripted_checkpoint, ["a", "c"], max_new_tokens=10, temperature=0)
    # The prompt as the model read it, then its answer up to end-of-text: with an end-of-text
    # token, the end marker (a newline) may occur inside an answer and does not end it ("a" runs
    # on to max_new_tokens).
    assert texts == ["Q a: yes\n" + "x" * 6, "Q c: maybe"]
    # --chat_template none: the raw text, which this model does not answer.
    raw = generate_text(scripted_checkpoint, "a", max_new_tokens=10, temperature=0, chat_template="none")
    assert raw == ["a"]
    with pytest.raises(ConfigError, match="chat_template='nope' is unknown"):
        generate_text(scripted_checkpoint, "a", chat_template="nope")


def test_prompt_defaults_to_the_checkpoint_template_and_answers(scripted_checkpoint, tmp_path):
    dev = tmp_path / "dev.tsv"
    dev.write_text("text\tlabel\na\t1\nb\t0\nb\t1\n", encoding="utf-8")
    # No --verbalizers, no --template: the user's message is the text, the answers the trained ones.
    result = evaluate_prompt(scripted_checkpoint, str(dev))
    assert result.predictions == ["1", "0", "0"] and result.metrics["accuracy"] == pytest.approx(2 / 3)
    assert result.prompts[0] == "Q a: "


def test_prompt_ids_encode_segments_as_training_does():
    tok = char_tokenizer()
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "yes"},
                {"role": "user", "content": "b"}]
    ids = prompt_ids(TEMPLATE, tok, messages)
    encode = lambda text: tok.encode(text, add_special_tokens=False).ids
    # user, (header), trained answer + end marker + end-of-text, user + header: each piece on its own.
    assert ids == encode("Q a: ") + encode("yes\n") + [tok.token_to_id(EOT)] + encode("Q b: ")
    # ... which is how the training data encodes the same conversation up to its last answer.
    conversation = Conversation((*messages, {"role": "assistant", "content": "no"}), "row 1")
    trained = encode_conversations(tok, TEMPLATE, [conversation], max_length=64)
    assert trained.inputs[0][: len(ids)] == ids
    settings = chat_settings({"kind": "sft", "template": TEMPLATE.to_dict(), "system": "be brief"}, "checkpoint")
    assert settings.messages("x")[0] == {"role": "system", "content": "be brief"}
    assert chat_settings({"kind": "classification"}, "checkpoint") is None  # not fine-tuned on a template
    assert chat_settings(None, "chatml").template.stop == "<|im_end|>\n"
