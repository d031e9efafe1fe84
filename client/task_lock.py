"""One training task at a time per device, across threads and processes.

A device's budget check reads what its ledger says it has spent, trains, and then appends the new
release. If two tasks for the same device ran that sequence at once (a deployed SuperNode may run
several ClientApp processes; a faulty or hostile server may send a device two tasks), both could
pass the check against the same history and together spend past the budget. :func:`exclusive_task`
makes the sequence atomic per device: it holds an exclusive advisory lock on a file beside the
device's store (``<store>.lock``) for the whole task, so a second task waits, then sees the first
one's release and is refused if the budget no longer allows it.

The lock is ``flock`` (POSIX) or ``msvcrt.locking`` (Windows). It is a separate file because
closing any descriptor of an SQLite database drops that process's POSIX locks on it.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

#: How long a task waits for another task of the same device before giving up.
DEFAULT_TIMEOUT_S = 600.0


class DeviceBusy(RuntimeError):
    """Another task of the same device held the lock for longer than the timeout."""


def lock_path(store: Path | str) -> Path:
    """The lock file that guards ``store``."""
    store = Path(store)
    return store.with_name(store.name + ".lock")


@contextmanager
def exclusive_task(store: Path | str, timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[None]:
    """Hold the device's task lock for the duration of the ``with`` block.

    Raises
    ------
    DeviceBusy
        If the lock is not free within ``timeout_s`` seconds (nothing has been read or spent).
    """
    path = lock_path(store)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        _acquire(fd, path, timeout_s)
        try:
            yield
        finally:
            _release(fd)
    finally:
        os.close(fd)


if sys.platform == "win32":  # pragma: no cover - exercised on Windows devices only
    import msvcrt

    def _try_lock(fd: int) -> bool:
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True

    def _release(fd: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)

else:
    import fcntl

    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def _release(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)


def _acquire(fd: int, path: Path, timeout_s: float) -> None:
    # Polling rather than a blocking lock, so that a stuck task cannot hang the next one forever.
    deadline = time.monotonic() + timeout_s
    delay = 0.005
    while not _try_lock(fd):
        if time.monotonic() >= deadline:
            raise DeviceBusy(
                f"another task of this device has held {path} for over {timeout_s:.0f} s; "
                "this task was not run and spent nothing"
            )
        time.sleep(delay)
        delay = min(delay * 2, 0.2)
