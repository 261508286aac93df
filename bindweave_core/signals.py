"""SIGTERM handled like Ctrl-C, and disk errors worded in one line.

Schedulers, ``docker stop`` and ``kill`` send SIGTERM; Python's default for it ends the process at once
(exit -15), with no ``finally`` run, so temporary files stay behind and the trainer keeps no checkpoint.
Inside :func:`terminate_as_interrupt`, SIGTERM raises :class:`Terminated`, a ``KeyboardInterrupt``: every
cleanup written for Ctrl-C (temporary files removed, the trainer's checkpoint) runs for it too, and the
command exits with the shell's code for the signal (:func:`exit_code`: 130 for SIGINT, 143 for SIGTERM).
"""

from __future__ import annotations

import errno
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130: what shells report for Ctrl-C
EXIT_TERMINATED = 128 + signal.SIGTERM  # 143: what shells report for SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C raises ``KeyboardInterrupt`` (so the same cleanup runs)."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` (only the main thread can own a handler;
    elsewhere nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def signal_name(signum_or_error: int | BaseException) -> str:
    """"SIGTERM" or "Ctrl-C" (SIGINT), for messages."""
    term = (isinstance(signum_or_error, Terminated) if isinstance(signum_or_error, BaseException)
            else signum_or_error == signal.SIGTERM)
    return "SIGTERM" if term else "Ctrl-C"


def exit_code(signum_or_error: int | BaseException) -> int:
    """143 for SIGTERM (or :class:`Terminated`), 130 for Ctrl-C."""
    return EXIT_TERMINATED if signal_name(signum_or_error) == "SIGTERM" else EXIT_INTERRUPTED


def describe_os_error(e: OSError, what: str) -> str:
    """One line for a failed write: what was being written, the reason, and the fix for a full disk."""
    reason = e.strerror or str(e)
    where = f" ({e.filename})" if getattr(e, "filename", None) else ""
    fix = " Free some space or choose another folder, then run again." if e.errno in (errno.ENOSPC, errno.EDQUOT) \
        else ""
    return f"cannot write {what}{where}: {reason}.{fix}"
