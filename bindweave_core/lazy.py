"""A component given as a function that loads it, so a pipeline can hold models it has not loaded yet."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Lazy:
    """A component given as a function that loads it (see ``offload="release"``)."""

    load: Callable[[], Any]
    description: str = ""
    family: str | None = None  # DiT only: known from the checkpoint header without loading
    meta: dict[str, Any] = field(default_factory=dict)  # DiT only: config/dtype/weight_format (memory estimate)
