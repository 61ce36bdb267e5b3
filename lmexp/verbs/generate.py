"""``lmexp generate``: sample text from a trained causal language model, without Lightning."""

from __future__ import annotations

import sys

import torch

from lmexp.arguments import json_parser
from lmexp.checkpoints import load_checkpoint
from lmexp.data.chat import end_of_text_id
from lmexp.data.tokenizer import describe_unknown, encode_prompt, load_tokenizer
from lmexp.errors import CheckpointError, ConfigError
from lmexp.generation import cut_at_stop, first_nonfinite, generate, stop_string_check, supports_attention_mask
from lmexp.hardware import check_device
from lmexp.prompting import chat_settings

__all__ = ["generate_text", "run", "run_generate"]


def generate_text(
    ckpt: str,
    prompt: str | list[str] | None = None,
    prompts_file: str | None = None,
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    stop: list[str] | None = None,
    seed: int = 0,
    num_samples: int = 1,
    kv_cache: bool = True,
    window_shift: int | None = None,
    tokenizer: str | None = None,
    device: str = "cpu",
    chat_template: str = "checkpoint",
) -> list[str]:
    """Generate text from a trained causal language model.

    Returns num_samples texts per prompt, prompt by prompt (all samples of the first prompt,
    then of the second, ...), each the prompt followed by its continuation.

    Args:
        ckpt: A ``.ckpt`` written by training, an export folder (``checkpoints/best``), or a
            transformers GPT-2 folder (``save_pretrained``).
        prompt: Text the samples continue, or several texts (a batch); default a newline.
        prompts_file: A text file with one prompt per line (blank lines skipped), instead of prompt.
        max_new_tokens: Tokens to generate per sample.
        temperature: Softmax temperature; 0 picks the most likely token (greedy).
        top_k: Sample only among the k most likely tokens.
        top_p: Sample only within the smallest set of tokens whose probability exceeds p.
        repetition_penalty: Above 1 makes tokens already in the text less likely (1.2 is common).
        stop: Strings that end a sample: each sample is cut before the first one in its new
            text, and generation ends once every sample has one.
        seed: Random seed of the sampling.
        num_samples: Independent samples to draw per prompt.
        kv_cache: Reuse attention keys and values between steps (much faster, same output).
        window_shift: Past the model's context, how many tokens the window moves at a time
            (1: always the last block_size tokens, slowest; default: a quarter of the context).
        tokenizer: A ``tokenizer.json`` to use instead of the one saved in the checkpoint.
        device: ``cpu`` or ``cuda``.
        chat_template: How a prompt is wrapped: ``checkpoint`` uses the chat template a
            fine-tuned (SFT) checkpoint was trained with (the prompt is the user's message; the
            sample stops at the template's end marker or end-of-text) and the raw text for other
            checkpoints; ``none`` the raw text always; ``plain``, ``chatml`` or ``alpaca`` that template.
    """
    if num_samples < 1:
        raise ConfigError(f"num_samples={num_samples} must be at least 1")
    if prompt is not None and prompts_file is not None:
        raise ConfigError("both prompt and prompts_file are given: use --prompt (repeatable) or --prompts_file, not both")
    if prompts_file is not None:
        try:
            with open(prompts_file, encoding="utf-8") as lines:
                prompts = [line.rstrip("\r\n") for line in lines if line.strip()]
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"prompts_file={prompts_file!r} cannot be read ({err}): pass a UTF-8 text file") from None
        if not prompts:
            raise ConfigError(f"prompts_file={prompts_file!r} has no prompts: write one prompt per line")
    else:
        prompts = ["\n"] if prompt is None else [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ConfigError("prompt=[] holds no prompts: give at least one, or leave it out for a newline")
    stops = list(stop or [])
    if "" in stops:
        raise ConfigError(f"stop={stops!r} contains an empty string, which would cut every sample at once: remove it")
    check_device(device)
    loaded = load_checkpoint(ckpt)
    if first_nonfinite(loaded.model) is not None:
        raise CheckpointError(
            f"{ckpt!r} holds non-finite weights (NaN/inf), trained past a divergence: use an earlier checkpoint"
        )
    if loaded.config.arch == "bert":
        raise ConfigError(f"{ckpt!r} holds a bert (masked LM) model, which does not generate text: use a GPT or LSTM checkpoint")
    tok = loaded.tokenizer
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)
        if tok.get_vocab_size() != loaded.config.vocab_size:
            raise CheckpointError(
                f"tokenizer {tokenizer!r} has {tok.get_vocab_size()} tokens but the checkpoint's model "
                f"has vocab_size={loaded.config.vocab_size}: use the tokenizer.json saved with that checkpoint"
            )
    if tok is None:
        raise CheckpointError(f"{ckpt!r} contains no tokenizer: pass --tokenizer PATH/tokenizer.json")
    chat = chat_settings(loaded.inputs, chat_template)
    eos_id = None
    if chat is not None:  # the model answers the prompt as it learnt to: up to the end marker or end-of-text
        eos_id = end_of_text_id(tok)
        # The end marker ends a sample where no end-of-text token does (with one, the marker, a
        # newline say, may also occur inside an answer).
        if eos_id is None and chat.template.stop and chat.template.stop not in stops:
            stops.append(chat.template.stop)
    encoded = []
    for text in prompts:
        # A one-turn prompt is one segment: its rendered text encodes as the training data encoded it.
        ids, unknown = encode_prompt(tok, text if chat is None else chat.template.prompt(chat.messages(text)))
        if unknown:
            print(f"warning: prompt {text!r}: {describe_unknown(unknown)}", file=sys.stderr)
        if not ids:
            raise ConfigError(f"prompt {text!r} encodes to no tokens: give a prompt of at least one known character")
        encoded.append(ids)
    model = loaded.model.to(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    rows = [ids for ids in encoded for _ in range(num_samples)]  # prompt-major, as returned
    # A model without an attention mask (LSTM) cannot read left padding: one batch per prompt length.
    if supports_attention_mask(model):
        groups = [list(range(len(rows)))]
    else:
        by_length: dict[int, list[int]] = {}
        for i, ids in enumerate(rows):
            by_length.setdefault(len(ids), []).append(i)
        groups = list(by_length.values())
    # A model vocabulary padded beyond the tokenizer's has ids with no text: they decode to nothing.
    known = tok.get_vocab_size()

    def decode(ids: list[int]) -> str:
        return tok.decode([i for i in ids if i < known])

    texts: list[str] = [""] * len(rows)
    for group in groups:
        width = max(len(rows[i]) for i in group)
        pads = [width - len(rows[i]) for i in group]
        prompt_ids = torch.tensor([[0] * pad + rows[i] for i, pad in zip(group, pads)], device=device)
        mask = torch.tensor([[0] * pad + [1] * len(rows[i]) for i, pad in zip(group, pads)], device=device)
        stopping = stop_string_check(decode, stops, width, eos_id) if stops else None
        try:
            out = generate(
                model, prompt_ids, max_new_tokens, temperature, top_k, top_p, generator=generator, use_cache=kv_cache,
                window_shift=window_shift, attention_mask=mask if any(pads) else None,
                repetition_penalty=repetition_penalty, stopping=stopping, eos_id=eos_id,
            )
        except ValueError as err:  # invalid sampling settings, or a prompt longer than the context
            raise ConfigError(str(err)) from None
        for i, pad, row in zip(group, pads, out.tolist()):
            if eos_id is not None and eos_id in row[width:]:
                row = row[: width + row[width:].index(eos_id)]
            head, full = decode(row[pad:width]), decode(row[pad:])
            if not stops:
                texts[i] = full
                continue
            # Decoding prompt and continuation together joins them as the tokenizer would; decode
            # apart in the rare case that changes the prompt's text (a decoder merging across).
            new_text = full[len(head):] if full.startswith(head) else decode(row[width:])
            texts[i] = head + cut_at_stop(new_text, stops)
    return texts


def run(argv: list[str]) -> list[str]:
    """``lmexp generate``: parse the flags, generate, print the samples (grouped when several)."""
    parser = json_parser(prog="lmexp generate", description=generate_text.__doc__.splitlines()[0])
    # Repeatable flags, taken literally (a list-typed flag would parse "[x]" as YAML and a repeated
    # one would keep only its last value).
    parser.add_function_arguments(generate_text, as_positional=False, skip={"prompt", "stop"})
    parser.add_argument(
        "--prompt", action="append", type=str, default=None,
        help="Text the samples continue; repeat the flag for a batch of prompts (default: a newline).",
    )
    parser.add_argument(
        "--stop", action="append", type=str, default=None,
        help="A string that ends a sample (cut before it); repeat the flag for several (bash: $'\\n' for a newline).",
    )
    config = parser.parse_args(argv)
    options = {k: v for k, v in config.as_dict().items() if k != "config"}
    samples = generate_text(**options)
    # One prompt and one sample prints just the text, as always; otherwise grouped per prompt
    # (each sample starts with its prompt).
    per_prompt = options["num_samples"]
    n_prompts = len(samples) // per_prompt
    for p in range(n_prompts):
        if n_prompts > 1:
            print(f"=== prompt {p + 1} ===")
        for i in range(per_prompt):
            if per_prompt > 1:
                print(f"--- sample {i + 1} ---")
            print(samples[p * per_prompt + i])
    return samples


run_generate = run  # the verb's entry point under its descriptive name
