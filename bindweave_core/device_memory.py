"""The two device-memory questions the core asks: "free what you cached" and "how much is free".

Standalone, PyTorch's CUDA caching allocator answers them. A host with its own memory manager
(ComfyUI) installs its functions with :func:`use_host_memory_manager`, so the core never empties
caches or reads free memory behind the host's back.
"""

from __future__ import annotations

import gc
from collections.abc import Callable

import torch

ReleaseFn = Callable[[], None]
FreeBytesFn = Callable[[torch.device], int]


def _torch_release() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _torch_free_bytes(device: torch.device) -> int:
    # The driver's free memory plus what PyTorch's allocator holds unused.
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


_release: ReleaseFn = _torch_release
_free_bytes: FreeBytesFn = _torch_free_bytes


def use_host_memory_manager(release: ReleaseFn | None = None, free_bytes: FreeBytesFn | None = None) -> None:
    """Route cache release and free-memory queries to a host's memory manager (None: PyTorch's)."""
    global _release, _free_bytes
    _release = release or _torch_release
    _free_bytes = free_bytes or _torch_free_bytes


def release_memory() -> None:
    """Collect garbage and drop cached allocator blocks (after a cancelled, failed or offloaded stage)."""
    gc.collect()
    _release()


def free_device_memory(device: torch.device) -> int | None:
    """Bytes a new allocation can use on ``device``; None off CUDA (no limit the core can check)."""
    if device.type != "cuda":
        return None
    return int(_free_bytes(device))
