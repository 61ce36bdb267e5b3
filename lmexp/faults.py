"""Named fault points: kill, stop or fail this process at an exact place, for fault-injection tests.

Code that writes something a user cannot afford to lose (a checkpoint, an export, the token cache,
the tracking store) calls ``fault_point("checkpoint.write")`` at the moment a crash would hurt
most. Normally that is a dictionary look-up and nothing else. With the environment variable
``LMEXP_FAULT`` set, the named point acts::

    LMEXP_FAULT=checkpoint.write:kill        # SIGKILL at the first checkpoint write
    LMEXP_FAULT=checkpoint.write@3:kill      # ... at the third
    LMEXP_FAULT=export.write:enospc          # raise "No space left on device" there
    LMEXP_FAULT=train.step@5:term            # SIGTERM (a scheduler's pre-emption) at step 5
    LMEXP_FAULT=train.loss@5:nan             # the loss of step 5 becomes NaN (see ``poisoned``)
    LMEXP_FAULT=train.loss@5:diverge         # ... and of every step after it

Several faults are separated by commas. ``lmexp chaos`` and ``tests/faults`` drive them; a user can
set the variable on their own command to see what their setup does when that fault strikes.
"""

from __future__ import annotations

import errno
import os
import signal
from dataclasses import dataclass

FAULT_VARIABLE = "LMEXP_FAULT"
ACTIONS = ("kill", "term", "int", "enospc", "nan", "diverge")

# Every point lmexp calls, with what a fault there stands for (``lmexp chaos --list``).
POINTS = {
    "checkpoint.write": "half of a checkpoint's bytes are on disk (its temporary file)",
    "checkpoint.commit": "a checkpoint is complete in its temporary file, not yet renamed into place",
    "export.write": "an export's weights are half written (its temporary folder)",
    "export.commit": "an export is complete in its temporary folder, not yet swapped into place",
    "cache.write": "the token cache is half encoded (its temporary folder)",
    "store.create": "the MLflow store is being created (migrations half run on its temporary file)",
    "journal.write": "a tracking-journal line is half written",
    "train.step": "a training step has ended (use @N for step N)",
    "train.loss": "a training step's loss is computed (use @N for step N; action nan or diverge)",
}


@dataclass
class Fault:
    point: str
    at: int  # the hit (1-based) at which it acts; for train.* points the step
    action: str
    hits: int = 0


def _parse(text: str) -> dict[str, Fault]:
    faults: dict[str, Fault] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        where, _, action = item.partition(":")
        point, _, at = where.partition("@")
        action = action or "kill"
        if point not in POINTS or action not in ACTIONS or (at and not at.isdigit()):
            raise ValueError(
                f"{FAULT_VARIABLE}={text!r}: {item!r} is not POINT[@N][:ACTION] with POINT one of "
                f"{', '.join(POINTS)} and ACTION one of {', '.join(ACTIONS)}"
            )
        faults[point] = Fault(point, int(at or 1), action)
    return faults


_FAULTS: dict[str, Fault] = _parse(os.environ.get(FAULT_VARIABLE, ""))


def reload() -> None:
    """Read ``LMEXP_FAULT`` again (tests that set it in-process)."""
    global _FAULTS
    _FAULTS = _parse(os.environ.get(FAULT_VARIABLE, ""))


def armed(point: str) -> bool:
    return point in _FAULTS


def fault_point(point: str, step: int | None = None, path: str | os.PathLike | None = None) -> None:
    """Act here if ``LMEXP_FAULT`` names ``point``: at its N-th hit, or at training step N when
    ``step`` is given. ``kill`` and ``term`` signal this process; ``enospc`` raises the OSError
    a full disk raises (naming ``path``)."""
    fault = _FAULTS.get(point)
    if fault is None:
        return
    fault.hits += 1
    if (step if step is not None else fault.hits) != fault.at:
        return
    if fault.action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif fault.action == "term":
        os.kill(os.getpid(), signal.SIGTERM)
    elif fault.action == "int":
        os.kill(os.getpid(), signal.SIGINT)
    elif fault.action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), None if path is None else str(path))


def poisoned(point: str, step: int) -> bool:
    """True when ``LMEXP_FAULT`` asks for a non-finite value at ``point`` on this step (``nan``:
    step N only; ``diverge``: step N and every later one)."""
    fault = _FAULTS.get(point)
    if fault is None:
        return False
    return (fault.action == "nan" and step == fault.at) or (fault.action == "diverge" and step >= fault.at)
