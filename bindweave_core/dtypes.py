"""Torch dtypes by the names the CLI, the nodes and the sidecars use (``constants.DTYPE_NAMES``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import constants as C
from .errors import InputError

if TYPE_CHECKING:
    import torch


def torch_dtype(name: str) -> torch.dtype:
    """``"bf16"`` (or torch's own name, ``"bfloat16"``) -> ``torch.bfloat16`` (torch is imported only here, so
    option parsing stays light)."""
    import torch

    table = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    short = C.DTYPE_ALIASES.get(name, name)
    if short not in table:
        raise InputError(f"unknown dtype {name!r}; choose one of {C.DTYPE_NAMES}.")
    return table[short]
