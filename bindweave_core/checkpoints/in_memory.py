"""Tensors already in memory (another program's loaded model) read as if they were a checkpoint file.

A host application (ComfyUI) may already hold a model's weights. Registering its state dict under a
pseudo path lets every encoder's own ``load`` read it exactly as it reads the file the host loaded:
the same key mapping, checks and conversions, and tensors kept in their stored dtype are the very
same tensors (no copy). The registration lasts only for the ``with`` block.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch

from .tensor_info import TensorInfo

_ROOT = "<in-memory>"  # never a real folder: nothing on disk is read or written under it
_REGISTRY: dict[Path, Mapping[str, torch.Tensor]] = {}


def is_in_memory(path: str | Path) -> bool:
    return Path(path) in _REGISTRY


@contextmanager
def in_memory_checkpoint(tensors: Mapping[str, torch.Tensor], name: str) -> Iterator[Path]:
    """A pseudo checkpoint path for ``tensors`` (``{stored key: tensor}``), valid inside the block."""
    # a fresh name per registration: anything keyed by the path (caches) never mistakes one model for another
    path = Path(_ROOT) / uuid.uuid4().hex / name
    _REGISTRY[path] = tensors
    try:
        yield path
    finally:
        _REGISTRY.pop(path, None)


def header(path: Path) -> dict[str, TensorInfo]:
    """``{key: TensorInfo}`` of a registered checkpoint (its tensors' dtypes and shapes)."""
    return {k: TensorInfo(path, k, t.dtype, tuple(t.shape)) for k, t in _REGISTRY[path].items()}


def tensor(info: TensorInfo) -> torch.Tensor:
    return _REGISTRY[info.file][info.key]
