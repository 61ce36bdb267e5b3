"""``lmexp prompt``: classify a table by prompting a causal GPT, zero- or few-shot (lmexp.prompting)."""

from __future__ import annotations

from lmexp.arguments import json_parser
from lmexp.prompting import PromptResult, evaluate_prompt, format_report

__all__ = ["run", "run_prompt"]


def run(argv: list[str]) -> PromptResult:
    """``lmexp prompt``: parse the flags, classify, print the report."""
    parser = json_parser(prog="lmexp prompt", description=(evaluate_prompt.__doc__ or "").splitlines()[0])
    switches = {
        "calibrate": "Contextual calibration against the content-free input N/A (--calibrate, or --calibrate false).",
        "length_normalize": "Score verbalizers by mean instead of summed token log-probability.",
    }
    parser.add_function_arguments(evaluate_prompt, as_positional=False, skip=set(switches))
    for name, help_text in switches.items():  # a bare --calibrate turns it on (a bool flag alone wants a value)
        parser.add_argument(f"--{name}", type=bool, nargs="?", const=True, default=False, help=help_text)
    config = parser.parse_args(argv)
    options = {k: v for k, v in config.as_dict().items() if k != "config"}
    result = evaluate_prompt(**options)
    shots = options["shots"]
    header = f"{'zero-shot' if not shots else f'{shots}-shot'} prompting"
    header += ", calibrated" if options["calibrate"] else ""
    header += ", length-normalized" if options["length_normalize"] else ""
    print(header)
    print(format_report(result))
    if options["output"]:
        print(f"wrote predictions to {options['output']}")
    if options["report_dir"]:
        print(f"wrote metrics.json and confusion.png to {options['report_dir']}")
    return result


run_prompt = run  # the verb's entry point under its descriptive name
