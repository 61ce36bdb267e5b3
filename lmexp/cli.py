"""Command line: ``lmexp fit|validate|test|predict`` (LightningCLI) and ``lmexp generate``.

``lmexp`` (the console script), ``python -m lmexp`` and tests all call ``main``. Lightning is
imported only for the trainer verbs, so ``lmexp generate`` starts without it.
"""

from __future__ import annotations

import sys

import torch

from lmexp.checkpoints import load_checkpoint
from lmexp.data.tokenizer import load_tokenizer
from lmexp.errors import CheckpointError, ConfigError, LmexpError
from lmexp.generation import generate


def generate_text(
    ckpt: str,
    prompt: str = "\n",
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    num_samples: int = 1,
    kv_cache: bool = True,
    window_shift: int | None = None,
    tokenizer: str | None = None,
    device: str = "cpu",
) -> list[str]:
    """Generate text from a trained causal language model.

    Args:
        ckpt: A ``.ckpt`` written by training, or an export folder (``checkpoints/best``).
        prompt: Text the samples continue.
        max_new_tokens: Tokens to generate per sample.
        temperature: Softmax temperature; 0 picks the most likely token (greedy).
        top_k: Sample only among the k most likely tokens.
        top_p: Sample only within the smallest set of tokens whose probability exceeds p.
        seed: Random seed of the sampling.
        num_samples: Independent samples to draw.
        kv_cache: Reuse attention keys and values between steps (much faster, same output).
        window_shift: Past the model's context, how many tokens the window moves at a time
            (1: always the last block_size tokens, slowest; default: a quarter of the context).
        tokenizer: A ``tokenizer.json`` to use instead of the one saved in the checkpoint.
        device: ``cpu`` or ``cuda``.
    """
    if num_samples < 1:
        raise ConfigError(f"num_samples={num_samples} must be at least 1")
    try:
        torch_device = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"device={device!r} is not a device name: use cpu or cuda") from None
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} but this machine has no usable CUDA GPU: use --device cpu")
    loaded = load_checkpoint(ckpt)
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
    ids = tok.encode(prompt, add_special_tokens=False).ids
    if not ids:
        raise ConfigError(f"prompt {prompt!r} encodes to no tokens: give a prompt of at least one known character")
    model = loaded.model.to(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    prompt_ids = torch.tensor([ids] * num_samples, device=device)
    try:
        out = generate(
            model, prompt_ids, max_new_tokens, temperature, top_k, top_p, generator=generator, use_cache=kv_cache,
            window_shift=window_shift,
        )
    except ValueError as err:  # invalid sampling settings, or a prompt longer than the context
        raise ConfigError(str(err)) from None
    # A model vocabulary padded beyond the tokenizer's has ids with no text: they decode to nothing.
    known = tok.get_vocab_size()
    return [tok.decode([i for i in row.tolist() if i < known]) for row in out]


def run_generate(argv: list[str]) -> list[str]:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="lmexp generate", description=generate_text.__doc__.splitlines()[0])
    parser.add_function_arguments(generate_text, as_positional=False)
    config = parser.parse_args(argv)
    samples = generate_text(**{k: v for k, v in config.as_dict().items() if k != "config"})
    for i, text in enumerate(samples):
        if len(samples) > 1:
            print(f"--- sample {i + 1} ---")
        print(text)
    return samples


def _user_error(err: BaseException) -> LmexpError | None:
    """The LmexpError behind ``err``, if any: jsonargparse and Lightning wrap what they catch."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, LmexpError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``lmexp`` and ``python -m lmexp``: user errors become one line and exit 2."""
    words = sys.argv[1:] if argv is None else list(argv)
    try:
        if words and words[0] == "generate":
            run_generate(words[1:])
        else:
            from lmexp.lightning_cli import LmexpCLI

            # None lets LightningCLI read sys.argv itself (and keep its own checks quiet).
            LmexpCLI(args=None if argv is None else words)
    except Exception as err:
        user_error = _user_error(err)
        if user_error is None:
            raise
        print(f"error: {user_error}", file=sys.stderr)
        raise SystemExit(2) from None
