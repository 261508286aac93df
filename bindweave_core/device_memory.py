"""The device-memory requests the core makes: "free what you cached", "how much is free" and "make room
for this much".

Standalone, PyTorch's CUDA caching allocator answers the first two, and there is no room to make: every
model on the device belongs to the run. A host with its own memory manager (ComfyUI) installs its
functions with :func:`use_host_memory_manager`, so the core never empties caches or reads free memory
behind the host's back, and a memory decision counts what the host can free by unloading idle models.
"""

from __future__ import annotations

import gc
from collections.abc import Callable

import torch

ReleaseFn = Callable[[], None]
FreeBytesFn = Callable[[torch.device], int]
MakeRoomFn = Callable[[torch.device, int], None]


def _torch_release() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _torch_free_bytes(device: torch.device) -> int:
    # The driver's free memory plus what PyTorch's allocator holds unused.
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def _nothing_to_unload(device: torch.device, memory_required: int) -> None:
    pass


_release: ReleaseFn = _torch_release
_free_bytes: FreeBytesFn = _torch_free_bytes
_make_room: MakeRoomFn = _nothing_to_unload


def use_host_memory_manager(release: ReleaseFn | None = None, free_bytes: FreeBytesFn | None = None,
                            make_room: MakeRoomFn | None = None) -> None:
    """Route cache release, free-memory queries and room requests to a host's memory manager (None:
    PyTorch's, and no room to make)."""
    global _release, _free_bytes, _make_room
    _release = release or _torch_release
    _free_bytes = free_bytes or _torch_free_bytes
    _make_room = make_room or _nothing_to_unload


def make_room(device: torch.device, memory_required: int) -> None:
    """Ask the host to free memory held by models no one is using (ComfyUI unloads idle models) until
    ``memory_required`` bytes are free on ``device``, so that a decision taken on the free memory next
    is about memory that cannot be had."""
    if device.type == "cuda":
        _make_room(device, int(memory_required))


def release_memory() -> None:
    """Collect garbage and drop cached allocator blocks (after a cancelled, failed or offloaded stage)."""
    gc.collect()
    _release()


def free_device_memory(device: torch.device) -> int | None:
    """Bytes a new allocation can use on ``device``; None off CUDA (no limit the core can check)."""
    if device.type != "cuda":
        return None
    return int(_free_bytes(device))
