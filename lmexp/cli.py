"""Command line: ``lmexp fit|validate|test`` (LightningCLI) and ``lmexp generate``.

``lmexp`` (the console script), ``python -m lmexp`` and tests all call ``main``. Lightning is
imported only for the trainer verbs, so ``lmexp generate`` starts without it.
"""

from __future__ import annotations

import signal
import sys
from typing import Any, NoReturn

import torch

from lmexp.checkpoints import load_checkpoint
from lmexp.data.tokenizer import describe_unknown, encode_prompt, load_tokenizer
from lmexp.arguments import OneLineErrors, one_line, summarize_parse_error  # noqa: F401  (summarize_parse_error: old path)
from lmexp.errors import CheckpointError, ConfigError, find_user_error
from lmexp.generation import cut_at_stop, first_nonfinite, generate, stop_string_check, supports_attention_mask
from lmexp.hardware import check_device, process_rank

DESCRIPTION = (
    "Train and use language models. Verbs: fit, validate, test (each with --help); "
    "generate: sample text from a checkpoint (lmexp generate --help); "
    "predict: label a table of texts with a fine-tuned classifier (lmexp predict --help); "
    "prompt: classify by prompting a GPT, zero- or few-shot (lmexp prompt --help); "
    "export: write a checkpoint as a Hugging Face transformers folder (lmexp export --help); "
    "probe: time a run's training steps in 32-true and bf16-mixed and print what --trainer.precision auto "
    "would choose (lmexp probe --help); "
    "runs: list tracked runs (lmexp runs --help); "
    "chaos: inject kills, full disks and NaNs into short runs of a config and check nothing is lost (lmexp chaos --help)."
)


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
    encoded = []
    for text in prompts:
        ids, unknown = encode_prompt(tok, text)
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
        stopping = stop_string_check(decode, stops, width) if stops else None
        try:
            out = generate(
                model, prompt_ids, max_new_tokens, temperature, top_k, top_p, generator=generator, use_cache=kv_cache,
                window_shift=window_shift, attention_mask=mask if any(pads) else None,
                repetition_penalty=repetition_penalty, stopping=stopping,
            )
        except ValueError as err:  # invalid sampling settings, or a prompt longer than the context
            raise ConfigError(str(err)) from None
        for i, pad, row in zip(group, pads, out.tolist()):
            head, full = decode(row[pad:width]), decode(row[pad:])
            if not stops:
                texts[i] = full
                continue
            # Decoding prompt and continuation together joins them as the tokenizer would; decode
            # apart in the rare case that changes the prompt's text (a decoder merging across).
            new_text = full[len(head):] if full.startswith(head) else decode(row[width:])
            texts[i] = head + cut_at_stop(new_text, stops)
    return texts


def run_generate(argv: list[str]) -> list[str]:
    from jsonargparse import ArgumentParser

    class Parser(OneLineErrors, ArgumentParser):
        pass

    parser = Parser(prog="lmexp generate", description=generate_text.__doc__.splitlines()[0])
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


def list_tracked_runs(experiment: str | None = None, limit: int = 20, tracking_uri: str | None = None) -> list[dict]:
    """List the newest tracked runs with their key metrics and checkpoints.

    Args:
        experiment: Only this experiment's runs (default: all).
        limit: How many runs, newest first.
        tracking_uri: The tracking store (default: $MLFLOW_TRACKING_URI, else ./mlflow.db).
    """
    from lmexp.mlflow_store import list_runs

    return list_runs(tracking_uri, experiment, limit)


def sync_journal_file(journal: str, tracking_uri: str | None = None) -> str:
    """Send the records a run kept while its tracking store was unreachable.

    Args:
        journal: The ``tracking-journal.jsonl`` file the run's warning named.
        tracking_uri: Send them to this store instead of the one the journal names.
    """
    from lmexp.mlflow_store import sync_journal

    return sync_journal(journal, tracking_uri)


def run_runs(argv: list[str]) -> None:
    from jsonargparse import ArgumentParser

    class Parser(OneLineErrors, ArgumentParser):
        pass

    if argv and argv[0] == "clean":
        from lmexp.cleanup import run_clean

        run_clean(argv[1:])
        return
    if argv and argv[0] == "sync":
        parser = Parser(prog="lmexp runs sync", description=sync_journal_file.__doc__.splitlines()[0])
        parser.add_function_arguments(sync_journal_file, as_positional=True)
        config = parser.parse_args(argv[1:])
        run_id = sync_journal_file(config.journal, config.tracking_uri)
        print(f"sent {config.journal} to MLflow run {run_id}")
        return
    parser = Parser(prog="lmexp runs", description=list_tracked_runs.__doc__.splitlines()[0]
                    + " (lmexp runs sync JOURNAL: send records kept during a tracking outage)")
    parser.add_function_arguments(list_tracked_runs, as_positional=False)
    config = parser.parse_args(argv)
    rows = list_tracked_runs(**{k: v for k, v in config.as_dict().items() if k != "config"})
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    columns = ["run", "experiment", "status", "started", "minutes", "steps", "train/loss", "val/loss", "test/loss",
               "checkpoint"]
    for column in columns:
        table.add_column(column, no_wrap=column == "checkpoint")
    for row in rows:
        table.add_row(*[_cell(row.get(column)) for column in columns])
    console = Console(width=None if sys.stdout.isatty() else 400)
    if rows:
        console.print(table)
    else:
        print("no tracked runs yet: train one with lmexp fit --config CONFIG")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _stop_status(stop: SystemExit) -> Any:
    """The exit status for a stop: 128 + the signal number for SIGTERM and Ctrl-C.

    Lightning ends a run stopped by SIGTERM with a SystemExit of status 0 and one stopped by
    Ctrl-C with status 1 (after saving the interrupted checkpoint); a scheduler then reads a
    pre-empted run as a success, or as an ordinary failure.
    """
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    if isinstance(stop, SIGTERMException):
        return 128 + signal.SIGTERM
    if isinstance(stop.__context__, KeyboardInterrupt):
        return 128 + signal.SIGINT
    return stop.code


def run_export(argv: list[str]) -> None:
    from jsonargparse import ArgumentParser

    from lmexp.huggingface import export_checkpoint

    class Parser(OneLineErrors, ArgumentParser):
        pass

    parser = Parser(prog="lmexp export", description=export_checkpoint.__doc__.splitlines()[0])
    parser.add_function_arguments(export_checkpoint, as_positional=True)
    config = parser.parse_args(argv)
    folder = export_checkpoint(config.checkpoint, config.output, config.overwrite)
    print(f"wrote {folder}: load it with transformers' AutoModel*.from_pretrained({str(folder)!r}) and AutoTokenizer")


def _prompt_verb() -> Any:
    from lmexp.prompting import run_prompt

    return run_prompt


def _predict_verb() -> Any:
    from lmexp.predict import run_predict

    return run_predict


def _probe_verb() -> Any:
    from lmexp.precision import run_probe

    return run_probe


def _chaos_verb() -> Any:
    from lmexp.chaos import run_chaos

    def chaos(argv: list[str]) -> None:
        raise SystemExit(run_chaos(argv))

    return chaos


# Verbs that need no trainer (nor Lightning's import time, but for probe): name -> its entry point,
# imported on use.
PLAIN_VERBS = {
    "generate": lambda: run_generate, "runs": lambda: run_runs, "predict": _predict_verb, "prompt": _prompt_verb,
    "export": lambda: run_export, "probe": _probe_verb, "chaos": _chaos_verb,
}


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``lmexp`` and ``python -m lmexp``: user errors become one line and exit 2;
    a run stopped by SIGTERM or Ctrl-C exits 143 or 130 once its checkpoint is written."""
    words = sys.argv[1:] if argv is None else list(argv)
    if words and words[0] in PLAIN_VERBS:
        try:
            PLAIN_VERBS[words[0]]()(words[1:])
        except Exception as err:
            _exit_on_user_error(err)
        return
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from lmexp.lightning_cli import LmexpCLI

    try:
        # None lets LightningCLI read sys.argv itself (and keep its own checks quiet).
        cli = LmexpCLI(args=None if argv is None else words)
        if cli.built is not None:
            cli.built.execute()
    except SystemExit as stop:
        raise SystemExit(_stop_status(stop)) from None
    except KeyboardInterrupt:  # before or after the trainer, which handles its own
        print("interrupted", file=sys.stderr)
        raise SystemExit(128 + signal.SIGINT) from None
    except MisconfigurationException as err:  # Lightning's own check of a trainer setting
        _user_error_exit(one_line(str(err)))
    except Exception as err:
        _exit_on_user_error(err)


def _exit_on_user_error(err: Exception) -> None:
    user_error = find_user_error(err)
    if user_error is None:
        raise err
    _user_error_exit(str(user_error))


def _user_error_exit(message: str) -> NoReturn:
    # Every rank of a multi-process run meets the same bad setting: one report is enough.
    if process_rank() == 0:
        print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2) from None
