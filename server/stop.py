"""A request to stop the run (Ctrl-C), seen by every loop that waits for devices.

A signal handler may only set a flag; the server's loops run in the main thread (in-process
simulation) or in Flower's ServerApp thread (Ray simulation, deployment), so each place
that waits for devices checks the flag and raises :class:`RunInterrupted`, which unwinds
through the stores' ``finally`` blocks: what was recorded is flushed, the run stays
marked unfinished.
"""

from __future__ import annotations

import threading

_STOP = threading.Event()


class RunInterrupted(Exception):
    """The run was asked to stop before it finished."""


def request_stop() -> None:
    """Ask every waiting loop to stop (safe to call from a signal handler)."""
    _STOP.set()


def stop_requested() -> bool:
    """Whether a stop was requested."""
    return _STOP.is_set()


def clear_stop() -> None:
    """Forget a stop request (before a new run in the same process)."""
    _STOP.clear()


def check_stop() -> None:
    """Raise :class:`RunInterrupted` if a stop was requested."""
    if _STOP.is_set():
        raise RunInterrupted("the run was interrupted")
