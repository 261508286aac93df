"""What one stored tensor is and where it lives, read from a header only (no data).

Shared by every checkpoint reader (safetensors, pickles, GGUF, SAT folders): they sit above this module,
so none of them has to import another to describe a tensor.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

# safetensors header dtype names -> torch dtypes
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorInfo:
    """Where one stored tensor lives and what it is, read from a header only."""

    file: Path
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    # Rows [start, stop) of the stored tensor's first dimension, for fused tensors stored as one
    # (SAT's query_key_value, open_clip's in_proj); ``shape`` is then the part's shape.
    part: tuple[int, int] | None = None
    # GGUF block-quantised types (``Q8_0``, ``Q4_K`` ...): ``dtype`` is uint8 and ``shape`` the real one.
    quant: str | None = None
    stored_bytes: int | None = None

    def rows(self, start: int, stop: int) -> TensorInfo:
        """The same stored tensor, restricted to rows ``start:stop`` of its first dimension."""
        if self.part is not None or not 0 <= start < stop <= self.shape[0]:
            raise ValueError(f"cannot take rows {start}:{stop} of {self.key} {list(self.shape)}")
        return dataclasses.replace(self, part=(start, stop), shape=(stop - start, *self.shape[1:]))

    @property
    def nbytes(self) -> int:
        if self.stored_bytes is not None:
            return self.stored_bytes
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()
