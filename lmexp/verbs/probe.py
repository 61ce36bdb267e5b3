"""``lmexp probe --config X.yaml``: print what ``--trainer.precision auto`` would choose for a run.

The run is configured as ``lmexp fit`` would configure it (lmexp.runs.configure: one-line errors
included), without a trainer or a run folder; lmexp.precision times it.
"""

from __future__ import annotations

from lmexp.arguments import OneLineArgumentParser
from lmexp.errors import ConfigError, check_positive
from lmexp.precision import TIMED_STEPS, WARMUP_STEPS, PrecisionChoice, probe_run

__all__ = ["run", "run_probe"]


def run(argv: list[str]) -> PrecisionChoice:
    """``lmexp probe --config X.yaml [fit options]``: measure and print what precision auto would choose."""
    parser = OneLineArgumentParser(
        prog="lmexp probe",
        allow_abbrev=False,
        description="Time a few training steps of a run in 32-true and bf16-mixed and print what "
        "--trainer.precision auto would choose; nothing is trained or saved. Takes the "
        "options of lmexp fit (--config, --model.*, --data.*, --trainer.*; see lmexp fit --help).",
    )
    parser.add_argument(
        "--warmup_steps", type=int, default=WARMUP_STEPS, help="untimed steps first (default %(default)s)"
    )
    parser.add_argument("--steps", type=int, default=TIMED_STEPS, help="timed steps (default %(default)s)")
    options, fit_args = parser.parse_known_args(argv)
    check_positive("--steps", options.steps)
    if options.warmup_steps < 0:
        raise ConfigError(f"--warmup_steps={options.warmup_steps} is negative: use 0 or more")
    from lmexp.runs import configure

    configured = configure("fit", args=fit_args)  # as lmexp fit parses it; no trainer, nothing written
    choice = probe_run(
        configured.model,
        configured.data,
        configured.trainer,
        configured.config.get("seed_everything"),
        warmup_steps=options.warmup_steps,
        steps=options.steps,
    )
    print(choice.line())
    return choice


run_probe = run  # the verb's entry point under its descriptive name
