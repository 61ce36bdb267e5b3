"""Command line: ``lmexp fit|validate|test`` (LightningCLI) and the other verbs (lmexp.verbs).

``lmexp`` (the console script), ``python -m lmexp`` and tests all call ``main``. A verb's module
is imported only when it is called, and Lightning only for the trainer verbs (and probe), so
``lmexp generate`` starts without it. Nothing in lmexp imports this module: it is the top.
``lmexp --help`` prints ``lmexp.lightning_cli.DESCRIPTION``, which lists every verb.
"""

from __future__ import annotations

import importlib
import signal
import sys
from typing import Any, NoReturn

from lmexp.arguments import one_line
from lmexp.deprecation import moved_names
from lmexp.errors import find_user_error
from lmexp.hardware import process_rank

# Verbs that make no training run: name -> the module whose run(argv) serves it, imported on use.
# fit, validate and test, the others, go to lmexp.runs.command_line_run.
VERB_MODULES = {
    "generate": "lmexp.verbs.generate",
    "runs": "lmexp.verbs.runs",
    "predict": "lmexp.verbs.predict",
    "prompt": "lmexp.verbs.prompt",
    "export": "lmexp.verbs.export",
    "data": "lmexp.verbs.data",
    "probe": "lmexp.verbs.probe",
    "chaos": "lmexp.verbs.chaos",
}

MOVED = {
    "generate_text": "lmexp.verbs.generate",
    "run_generate": "lmexp.verbs.generate",
    "list_tracked_runs": "lmexp.verbs.runs",
    "sync_journal_file": "lmexp.verbs.runs",
    "run_runs": "lmexp.verbs.runs",
    "run_export": "lmexp.verbs.export",
    "OneLineErrors": "lmexp.arguments",
    "summarize_parse_error": "lmexp.arguments",
    "DESCRIPTION": "lmexp.lightning_cli",
}
__getattr__ = moved_names(__name__, MOVED)


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


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``lmexp`` and ``python -m lmexp``: user errors become one line and exit 2;
    a run stopped by SIGTERM or Ctrl-C exits 143 or 130 once its checkpoint is written."""
    words = sys.argv[1:] if argv is None else list(argv)
    if words and words[0] in VERB_MODULES:
        try:
            importlib.import_module(VERB_MODULES[words[0]]).run(words[1:])
        except Exception as err:  # noqa: BLE001  (re-raised unless it is the user's error)
            _exit_on_user_error(err)
        return
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from lmexp.runs import command_line_run

    try:
        # None lets LightningCLI read sys.argv itself (and keep its own checks quiet).
        command_line_run(None if argv is None else words).execute()
    except SystemExit as stop:
        raise SystemExit(_stop_status(stop)) from None
    except KeyboardInterrupt:  # before or after the trainer, which handles its own
        print("interrupted", file=sys.stderr)
        raise SystemExit(128 + signal.SIGINT) from None
    except MisconfigurationException as err:  # Lightning's own check of a trainer setting
        _user_error_exit(one_line(str(err)))
    except Exception as err:  # noqa: BLE001  (re-raised unless it is the user's error)
        _exit_on_user_error(err)


def _exit_on_user_error(err: Exception) -> NoReturn:
    user_error = find_user_error(err)
    if user_error is None:
        raise err
    _user_error_exit(str(user_error))


def _user_error_exit(message: str) -> NoReturn:
    # Every rank of a multi-process run meets the same bad setting: one report is enough.
    if process_rank() == 0:
        print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2) from None
