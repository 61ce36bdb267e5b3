"""Generation speed with and without the KV cache: what the cache buys per model size and length.

    python benchmarks/bench_generate.py [--repeats 3] [--slow-repeats 1]

Greedy decoding of a batch of one short prompt with randomly initialised models (speed does not
depend on the weights). The main rows use a context (block_size) that holds the prompt and every
new token, so cached and uncached decoding see the same tokens. The last rows run past the
context, where both paths use generate's moving window: window_shift=1 is the exact sliding
window (the cache is rebuilt every token), the default rebuilds it once per block_size // 4
tokens. Each cell is the median of a few timed runs after a short warm-up; runs whose uncached
side takes seconds per run are timed --slow-repeats times. Appends the table to BENCHMARKS.md.

About a minute on an idle 2-core CPU. Run it on an idle machine: when another process holds a
core, torch's worker threads wait for each other inside every small operator and decoding got
about 60x slower here, which swamps the cache's effect.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import BENCHMARKS_FILE, append_entry, markdown_table  # noqa: E402
from lmexp.generation import _window_shift, generate  # noqa: E402
from lmexp.models import GPT, from_name  # noqa: E402

VOCAB = 65  # character-level Shakespeare
MODELS = {"gpt-nano (4L/4H/128)": "gpt-nano", "gpt-mini (6L/6H/384)": "gpt-mini"}


def tokens_per_second(
    model: GPT, prompt: torch.Tensor, new_tokens: int, use_cache: bool, window_shift: int | None, repeats: int
) -> tuple[float, torch.Tensor]:
    """Median new tokens per second over `repeats` runs, and the tokens of the last run."""
    generate(model, prompt, 8, temperature=0, use_cache=use_cache)  # warm-up: allocator, kernel choice
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        out = generate(model, prompt, new_tokens, temperature=0, use_cache=use_cache, window_shift=window_shift)
        times.append(time.perf_counter() - started)
    return new_tokens / statistics.median(times), out


def row(
    label: str, preset: str, block_size: int, prompt: torch.Tensor, new_tokens: int,
    window_shift: int | None, repeats: int, slow_repeats: int,
) -> list[str]:
    """One table row: uncached and cached speed of one model, context and length."""
    torch.manual_seed(0)
    model = GPT(from_name(preset, vocab_size=VOCAB, block_size=block_size, dropout=0.0)).eval()
    slow = new_tokens > 64
    uncached, uncached_out = tokens_per_second(
        model, prompt, new_tokens, False, window_shift, slow_repeats if slow else repeats
    )
    exact_window = window_shift == 1 and prompt.size(1) + new_tokens > block_size
    cached, cached_out = tokens_per_second(
        model, prompt, new_tokens, True, window_shift, slow_repeats if exact_window else repeats
    )
    shift = "-" if prompt.size(1) + new_tokens <= block_size else str(_window_shift(window_shift, block_size))
    same = "yes" if torch.equal(cached_out, uncached_out) else "no"
    print(f"{label}, block {block_size}, {new_tokens} new: {uncached:,.0f} -> {cached:,.0f} tok/s", flush=True)
    return [
        label, str(block_size), str(new_tokens), shift,
        f"{uncached:,.0f}", f"{cached:,.0f}", f"{cached / uncached:.1f}x", same,
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-length", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--slow-repeats", type=int, default=1, help="repeats of runs that take seconds each")
    parser.add_argument("--output", default=str(BENCHMARKS_FILE))
    args = parser.parse_args()

    prompt = torch.randint(0, VOCAB, (1, args.prompt_length), generator=torch.Generator().manual_seed(0))
    block_size = args.prompt_length + 512  # every new token fits: both paths see the same context
    rows = [
        row(label, preset, block_size, prompt, new_tokens, None, args.repeats, args.slow_repeats)
        for label, preset in MODELS.items()
        for new_tokens in (64, 512)
    ]
    # Past the context: 256 + 256 tokens beyond block_size.
    label, preset = next(iter(MODELS.items()))
    rows += [row(label, preset, 256, prompt, 512, shift, args.repeats, args.slow_repeats) for shift in (1, None)]
    append_entry(
        f"Generation with and without the KV cache (batch 1, {args.prompt_length}-token prompt, greedy)",
        f"python benchmarks/bench_generate.py --repeats {args.repeats} --slow-repeats {args.slow_repeats}",
        markdown_table(
            ["model", "block_size", "new tokens", "window_shift", "uncached tok/s", "cached tok/s",
             "cached / uncached", "same tokens"],
            rows,
        ),
        Path(args.output),
    )


if __name__ == "__main__":
    main()
