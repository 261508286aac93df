"""User-facing errors. Each message names the problem and the fix."""

from __future__ import annotations


class BindWeaveError(Exception):
    """Base class for every error this package raises on purpose."""


class CheckpointError(BindWeaveError):
    """A model file is missing, broken, of the wrong kind or has the wrong keys."""


class InputError(BindWeaveError, ValueError):
    """A user input (image, size, frame count, prompt, ...) cannot be used as given."""


class GenerationCancelled(BindWeaveError):
    """The user cancelled a generation from the progress callback (or stopped a batch with Ctrl-C/SIGTERM)."""

    exit_code = 130  # what the command line exits with: 128 + SIGINT (a SIGTERM stop: 143)


class OutOfMemoryError(BindWeaveError):
    """A run would not fit (or did not fit) in device memory; the message lists what to change."""
