"""Chat templates: how a conversation (system/user/assistant messages) becomes the text a causal
model is trained on and continues.

A template is one format string per role with ``{content}`` in it. The assistant's format is split
at ``{content}``: the text before it is the response header (part of the prompt, so it carries no
loss); the text after it is the end marker, trained with the response and where generation stops.
Training data and generation both encode each segment on its own and concatenate the ids, so a
prompt encodes to the same ids at training and at generation whatever the tokenizer does at the
boundary between prompt and response.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields

from tokenizers import Tokenizer

from lmexp.errors import ConfigError, DataError

__all__ = ["ROLES", "TEMPLATES", "ChatTemplate", "check_messages", "encode_segments", "end_of_text_id", "join_segments"]

ROLES = ("system", "user", "assistant")
CONTENT = "{content}"


@dataclass(frozen=True)
class ChatTemplate:
    """How a conversation becomes text: one format string per role with {content}."""

    system: str = "{content}\n\n"
    """The system message, rendered first when there is one."""
    user: str = "{content}\n"
    """Each user message."""
    assistant: str = "{content}\n"
    """Each assistant message: text before {content} is the response header (prompt, no loss); text
    after it is the end marker, trained with the response and where generation stops."""

    def __post_init__(self) -> None:
        for role in ROLES:
            value = getattr(self, role)
            if not isinstance(value, str) or value.count(CONTENT) != 1:
                raise ConfigError(
                    f"data.template.{role}={value!r} must contain {CONTENT} exactly once: e.g. "
                    f"{getattr(ChatTemplate, role)!r}"
                )

    @property
    def header(self) -> str:
        """The assistant text before the response: the end of every prompt."""
        return self.assistant.split(CONTENT)[0]

    @property
    def stop(self) -> str | None:
        """The end marker (assistant text after {content}), or None when it is empty."""
        return self.assistant.split(CONTENT)[1] or None

    def render(self, role: str, content: str) -> str:
        """One message as text (replace, not str.format: braces in data or templates stay as they are)."""
        return getattr(self, role).replace(CONTENT, content)

    def segments(self, messages: Sequence[Mapping[str, str]]) -> list[tuple[str, bool]]:
        """(text, trained) in order: trained=True for each assistant message's content + end marker.

        Consecutive untrained texts are joined into one segment, so a one-turn prompt is a single
        segment that encodes as ``prompt()``'s text does.
        """
        out: list[tuple[str, bool]] = []
        for role, content in check_messages(messages):
            if role == "assistant":
                _append(out, self.header, False)
                out.append((content + (self.stop or ""), True))
            else:
                _append(out, self.render(role, content), False)
        return out

    def prompt(self, messages: Sequence[Mapping[str, str]]) -> str:
        """What a model continues to answer: the messages rendered, then the assistant header."""
        checked = check_messages(messages)
        return "".join(self.render(role, content) for role, content in checked) + self.header

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def from_value(cls, value: str | Mapping[str, str] | ChatTemplate | None) -> ChatTemplate:
        """A template from a name in TEMPLATES, a mapping of role -> format (roles left out keep the
        plain template's), an instance, or None (the plain template)."""
        if value is None:
            return cls()
        if isinstance(value, ChatTemplate):
            return value
        if isinstance(value, str):
            if value not in TEMPLATES:
                raise ConfigError(
                    f"data.template={value!r} is unknown: choose one of {', '.join(TEMPLATES)}, or give "
                    "{system: ..., user: ..., assistant: ...} with {content} in each"
                )
            return TEMPLATES[value]
        if isinstance(value, Mapping):
            unknown = sorted(set(value) - {field.name for field in fields(cls)})
            if unknown:
                raise ConfigError(
                    f"data.template has unknown role(s) {', '.join(map(repr, unknown))}: use system, user, assistant"
                )
            return cls(**{key: str(text) for key, text in value.items()})
        raise ConfigError(f"data.template={value!r} is not a template: give a name or a mapping of role -> format")


TEMPLATES: dict[str, ChatTemplate] = {
    "plain": ChatTemplate(),
    "chatml": ChatTemplate(
        system="<|im_start|>system\n{content}<|im_end|>\n",
        user="<|im_start|>user\n{content}<|im_end|>\n",
        assistant="<|im_start|>assistant\n{content}<|im_end|>\n",
    ),
    "alpaca": ChatTemplate(
        system="{content}\n\n",
        user="### Instruction:\n{content}\n\n",
        assistant="### Response:\n{content}\n\n",
    ),
}
"""Named templates for data.template (and what checkpoints may name)."""


def _append(out: list[tuple[str, bool]], text: str, trained: bool) -> None:
    if not text:
        return
    if out and out[-1][1] == trained:
        out[-1] = (out[-1][0] + text, trained)
    else:
        out.append((text, trained))


def check_messages(messages: Sequence[Mapping[str, str]]) -> list[tuple[str, str]]:
    """(role, content) of each message, refusing an unknown role or a message without content."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise DataError(f"messages={messages!r:.80} is not a list: give [{{role: user, content: ...}}, ...]")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise DataError(f"message {i} ({message!r:.80}) needs a role and a content: give {{role: user, content: ...}}")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise DataError(f"message {i} has role {role!r}: use one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise DataError(f"message {i} has content {content!r:.80}, not text: give a string")
        checked.append((role, content))
    return checked


END_OF_TEXT_TOKENS = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|eot_id|>", "<|im_end|>", "[EOS]")
"""Tokens that mark the end of a text in common tokenizers, looked up in this order."""


def end_of_text_id(tokenizer: Tokenizer) -> int | None:
    """The tokenizer's end-of-text id (<|endoftext|>, </s>, <eos>, ...), or None if it has none."""
    for token in END_OF_TEXT_TOKENS:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token_id
    return None


def encode_segments(
    tokenizer: Tokenizer, segments: Sequence[tuple[str, bool]], eos_id: int | None
) -> tuple[list[int], list[bool]]:
    """(ids, trained) of segments each encoded on its own, ``eos_id`` appended after each trained
    (response) segment and counted as trained."""
    pieces = [tokenizer.encode(text, add_special_tokens=False).ids for text, _ in segments]
    return join_segments(pieces, [trained for _, trained in segments], eos_id)


def join_segments(
    pieces: Sequence[Sequence[int]], trained: Sequence[bool], eos_id: int | None
) -> tuple[list[int], list[bool]]:
    """Concatenate encoded segments (as ``encode_segments`` does, for callers that encode many
    segments in one batch)."""
    ids: list[int] = []
    flags: list[bool] = []
    for piece, is_trained in zip(pieces, trained, strict=True):
        piece = [*piece, eos_id] if is_trained and eos_id is not None else list(piece)
        ids += piece
        flags += [is_trained] * len(piece)
    return ids, flags
