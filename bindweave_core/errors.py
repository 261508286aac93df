"""User-facing errors. Each message names the problem and the fix."""

from __future__ import annotations


class BindWeaveError(Exception):
    """Base class for every error this package raises on purpose."""


class CheckpointError(BindWeaveError):
    """A model file is missing, broken, of the wrong kind or has the wrong keys."""


class InputError(BindWeaveError, ValueError):
    """A user input (image, size, frame count, prompt, ...) cannot be used as given."""


class GenerationCancelled(BindWeaveError):
    """The user cancelled a generation (the progress callback, Ctrl-C or SIGTERM). ``exit_code``: what the
    command line exits with (130 for Ctrl-C, 143 for SIGTERM: the shell's 128 + signal)."""

    def __init__(self, message: str, exit_code: int = 130) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class OutOfMemoryError(BindWeaveError):
    """A run would not fit (or did not fit) in device memory; the message lists what to change."""


class OutputWriteError(BindWeaveError):
    """An output (video, checkpoint, LoRA) could not be written, e.g. on a full disk; no partial file is left."""
