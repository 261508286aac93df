"""Reading stored tensors one at a time: memory-mapped views, file by file (safetensors, pickles, GGUF).

Below ``safetensors_io`` (headers, checkpoint files) and ``quant_formats`` (which reads the small
quantisation tags), so neither has to import the other to get at tensor data.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import CheckpointError
from . import in_memory, pickle_io
from .file_type import GGUF, sniff
from .tensor_info import TensorInfo


def is_gguf(file: Path) -> bool:
    return not in_memory.is_in_memory(file) and file.is_file() and sniff(file) == GGUF


def open_safetensors(file: Path):
    try:
        return safe_open(str(file), framework="pt")
    except (SafetensorError, OSError, ValueError) as e:
        size = file.stat().st_size if file.exists() else 0
        raise CheckpointError(
            f"{file}: not a readable safetensors file ({e}; {size:,} bytes). It is probably truncated or "
            "not a model file: download it again.") from e


def iter_tensors(infos: list[TensorInfo], release_bytes: int = 256 << 20) -> Iterator[tuple[TensorInfo, torch.Tensor]]:
    """Yield ``(info, tensor)`` as memory-mapped views, file by file.

    Each file is re-opened after every ``release_bytes`` of data so that the pages of tensors the
    caller has already converted (and dropped) leave the process; views the caller keeps stay valid.
    """
    by_file: dict[Path, list[TensorInfo]] = {}
    for info in infos:
        by_file.setdefault(info.file, []).append(info)
    for file, items in by_file.items():
        if in_memory.is_in_memory(file):  # a host's loaded model: its own tensors
            for info in items:
                yield info, _select(info, in_memory.tensor(info))
            continue
        if is_gguf(file):
            from .gguf_io import iter_gguf

            yield from iter_gguf(file, items)
            continue
        if pickle_io.is_pickle(file):
            stored = pickle_io.iter_state_dict(file, [i.key for i in items], release_bytes)
            for info, (_, tensor) in zip(items, stored):
                yield info, _select(info, tensor)
            continue
        start = 0
        while start < len(items):
            with open_safetensors(file) as f:
                read = 0
                while start < len(items) and (read == 0 or read < release_bytes):
                    info = items[start]
                    yield info, _select(info, f.get_tensor(info.key))
                    read += info.nbytes
                    start += 1


def _select(info: TensorInfo, tensor: torch.Tensor) -> torch.Tensor:
    return tensor if info.part is None else tensor.narrow(0, info.part[0], info.part[1] - info.part[0])
