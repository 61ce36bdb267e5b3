"""Errors raised for bad user input.

Every error a user can cause by a config value, a path or a file's contents is one of these.
The CLI prints them as a single line (``error: ...``) instead of a traceback, so the message
must name the bad value and say how to fix it.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "LmexpError",
    "StorageError",
    "check_choice",
    "check_positive",
    "find_user_error",
]


class LmexpError(Exception):
    """Base class of the errors the CLI reports as one line."""


class ConfigError(LmexpError, ValueError):
    """A configuration value is invalid (unknown preset, impossible sizes, ...)."""


class DataError(LmexpError, ValueError):
    """Input data is missing, unreadable, or too small for the requested setup."""


class CheckpointError(LmexpError, ValueError):
    """A checkpoint is missing, unreadable, or does not match the tokenizer or model."""


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    """Refuse a value outside ``choices``, naming them."""
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not supported: choose one of {', '.join(choices)}")


def check_positive(name: str, value: int) -> None:
    """Refuse anything but an integer of at least 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}={value!r} must be a positive integer: set it to 1 or more")


def find_user_error(err: BaseException) -> LmexpError | None:
    """The LmexpError behind ``err``, if any: jsonargparse and Lightning wrap what they catch.
    A full disk met by a write of any library counts too: it is the user's to fix."""
    import errno

    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, LmexpError):
            return current
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            where = f"writing {current.filename!r}" if current.filename else "writing"
            return StorageError(f"disk full while {where} ({current.strerror}): free space on that filesystem "
                                "or write elsewhere, then resume with --ckpt_path last")
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


class StorageError(LmexpError, OSError):
    """A file could not be written (disk full, no permission): names the path and what it needed."""
