"""Writing output files safely: a temporary name beside the target, renamed into place only when complete,
with the permissions any other new file of the user gets (0644 under umask 022)."""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputWriteError

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask (reading it means setting it: done under a lock and restored at once)."""
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def apply_user_mode(path: str | os.PathLike) -> None:
    """Give ``path`` the mode a plain ``open(path, "w")`` would: some writers (safetensors >= 0.8) create 0600."""
    os.chmod(path, 0o666 & ~current_umask())


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffix, so writers that look at it still work); when the
    block succeeds it gets the user's file mode and is renamed into place; otherwise it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        apply_user_mode(tmp)
        os.replace(tmp, path)
    except OSError as e:  # disk full, quota, I/O error: one clear line (the temp file goes below)
        if isinstance(e, OutputWriteError):
            raise
        raise OutputWriteError(write_error_message(path, e)) from None
    finally:
        if tmp.exists():
            tmp.unlink()


def write_error_message(path: Path, error: OSError) -> str:
    """One line for an output that could not be written: where, why, and what to do."""
    reason = os.strerror(error.errno) if error.errno else str(error)
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free some space there or choose another output folder"
    else:
        fix = "check the folder (permissions, the disk) or choose another output folder"
    return f"could not write {path}: {reason}; {fix}. No partial file was left behind."
