"""Files and folders that are either complete or not there: never cut short, never half replaced.

A write goes to a temporary name in the target's own folder (so the final step is a rename on one
filesystem, never a copy), is flushed to disk with ``fsync``, then renamed over the target, and
the folder is fsynced so the rename itself survives a power cut. Until that rename the previous
file is untouched; a failure (a full disk, a kill) leaves it as it was. A temporary file a killed
process leaves behind starts with ``.lmexp-tmp-`` and is removed by the next write to the same
folder once its process is gone (``lmexp runs clean`` removes them too).

A full disk or a missing permission becomes a ``StorageError`` that names the path and the space
the write needed, instead of ``OSError: N requested and M written``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from lmexp.errors import StorageError
from lmexp.faults import fault_point

__all__ = [
    "TEMPORARY_PREFIX",
    "atomic_write",
    "fsync_folder",
    "process_alive",
    "remove_stale_temporaries",
    "replace_folder",
    "stale_temporary",
    "storage_error",
    "temporary_sibling",
    "write_bytes",
    "write_text",
]

TEMPORARY_PREFIX = ".lmexp-tmp-"


def temporary_sibling(path: Path, shared: bool = False) -> Path:
    """A name beside ``path`` for its temporary version, unique to this process. ``shared``
    (a folder several machines write, such as a token cache built by many hosts) also names this
    machine, so that another machine never takes it for a dead process's leftover."""
    owner = f"{os.getpid()}@{host_tag()}" if shared else str(os.getpid())
    return path.with_name(f"{TEMPORARY_PREFIX}{owner}-{path.name}")


def host_tag() -> str:
    """A short name for this machine that contains no ``-``."""
    return hashlib.blake2b(socket.gethostname().encode(), digest_size=4).hexdigest()


FOREIGN_STALE_SECONDS = 24 * 3600  # another machine's temporary untouched this long was left by a dead process


def stale_temporary(path: Path) -> bool:
    """Whether a temporary file or folder was left by a process that no longer runs. Whether
    another machine's process still runs cannot be asked from here: its temporary is stale once
    nothing in it has changed for ``FOREIGN_STALE_SECONDS``."""
    owner = path.name[len(TEMPORARY_PREFIX):].split("-", 1)[0]
    pid, _, host = owner.partition("@")
    if host and host != host_tag():
        try:
            files = [path, *path.rglob("*")] if path.is_dir() else [path]
            newest = max(file.stat().st_mtime for file in files)
        except OSError:
            return False  # changing under us: someone is at work
        return time.time() - newest > FOREIGN_STALE_SECONDS
    return not (pid.isdigit() and process_alive(int(pid)))


def fsync_folder(folder: Path) -> None:
    """Make a rename or a new file in ``folder`` durable (a no-op where folders cannot be opened)."""
    with contextlib.suppress(OSError):
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def storage_error(err: OSError, path: Path, needed_bytes: int | None = None) -> OSError:
    """A one-line ``StorageError`` for a full disk or a refused write; other errors unchanged."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = shutil.disk_usage(path.parent if not path.is_dir() else path).free
            space = f"{_size(free)} free"
        except OSError:
            space = "free space unknown"
        need = f"needed {_size(needed_bytes)}, " if needed_bytes else ""
        return StorageError(f"disk full while writing {str(path)!r} ({need}{space}): free space on that "
                            "filesystem or write elsewhere; the previous file, if any, is unchanged")
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return StorageError(f"cannot write {str(path)!r} ({err.strerror}): choose a writable folder")
    return err


def _size(n: int | None) -> str:
    value = float(n or 0)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Remove temporary files and folders in ``folder`` left by processes that no longer run.

    An old folder set aside by a replacement that was killed before its new folder moved in
    is put back under its name instead (see ``replace_folder``)."""
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        if not entry.name.startswith(TEMPORARY_PREFIX):
            continue
        rest = entry.name[len(TEMPORARY_PREFIX):].partition("-")[2]
        if not stale_temporary(entry):
            continue
        if rest.startswith("old-") and not (folder / rest[4:]).exists():
            with contextlib.suppress(OSError):
                os.replace(entry, folder / rest[4:])
            continue
        with contextlib.suppress(OSError):
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
            removed.append(entry)
    return removed


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (this process counts; a zombie does not)."""
    if pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # an ended process its parent has not reaped yet is gone too
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb", fault: str | None = None,
                 needed_bytes: int | None = None, shared: bool = False) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on leaving the block, fsync it and rename it onto
    ``path``. On any error the temporary file is removed and ``path`` keeps its old contents.

    ``fault``: the fault point (lmexp.faults) hit once the first bytes are on disk, and
    ``<fault>``'s ``.commit`` sibling just before the rename. ``shared``: a folder several
    machines write (``temporary_sibling``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent)
    temporary = temporary_sibling(path, shared)
    try:
        with open(temporary, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as handle:
            yield _Tripwire(handle, fault, path) if fault else handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, 0o666 & ~_umask())
        if fault:
            fault_point(f"{fault.rsplit('.', 1)[0]}.commit", path=path)
        os.replace(temporary, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise storage_error(err, path, needed_bytes) from None
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
    fsync_folder(path.parent)


class _Tripwire:
    """A file whose first write is followed by the fault point ``fault``: the moment a crash
    leaves a file partly written."""

    def __init__(self, handle: IO[Any], fault: str, path: Path) -> None:
        self._handle, self._fault, self._path, self._tripped = handle, fault, path, False

    def write(self, data: Any) -> int:
        written = self._handle.write(data)
        if not self._tripped:
            self._tripped = True
            self._handle.flush()
            fault_point(self._fault, path=self._path)
        return written

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)


def write_bytes(path: str | Path, data: bytes, fault: str | None = None, shared: bool = False) -> None:
    """``path`` holds exactly ``data`` afterwards, or (on any failure) what it held before."""
    with atomic_write(path, "wb", fault=fault, needed_bytes=len(data), shared=shared) as handle:
        half = len(data) // 2
        handle.write(data[:half])  # a fault armed at ``fault`` strikes here, half written
        handle.write(data[half:])


def write_text(path: str | Path, text: str, fault: str | None = None, shared: bool = False) -> None:
    write_bytes(path, text.encode("utf-8"), fault, shared)


def replace_folder(folder: str | Path, fill: Callable[[Path], Any], fault: str | None = None,
                   shared: bool = False) -> Path:
    """Make ``folder`` anew as a whole: ``fill(temporary)`` writes its files into a sibling
    temporary folder, every file is fsynced, and the folder is swapped into place. Whoever reads
    ``folder`` sees the old one or the new one, never a mix; a failure leaves the old one.

    On Linux the swap is one atomic exchange (``renameat2(RENAME_EXCHANGE)``). Elsewhere it is two
    renames (old aside, new in); a kill between them leaves the old folder under a temporary
    name, which the next write to the parent folder (or ``lmexp runs clean``) puts back.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(folder.parent)
    temporary = temporary_sibling(folder, shared)
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    try:
        fill(temporary)
        for file in temporary.rglob("*"):
            if file.is_file():
                with open(file, "rb") as handle:
                    os.fsync(handle.fileno())
                os.chmod(file, 0o666 & ~_umask())
        fsync_folder(temporary)
        if fault:
            fault_point(fault.rsplit(".", 1)[0] + ".commit", path=folder)
        if folder.exists() and _exchange(temporary, folder):
            old = temporary  # the exchange left the old folder under the temporary name
        else:
            old = temporary_sibling(folder.with_name(f"old-{folder.name}"), shared)
            if folder.exists():
                os.replace(folder, old)
            os.replace(temporary, folder)
        fsync_folder(folder.parent)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as err:
        needed = sum(f.stat().st_size for f in temporary.rglob("*") if f.is_file()) if temporary.exists() else None
        shutil.rmtree(temporary, ignore_errors=True)
        raise storage_error(err, folder, needed) from None
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return folder


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2``); False where the system cannot."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    result = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return result == 0
