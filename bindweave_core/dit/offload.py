"""Block-wise offload of the DiT: keep some transformer blocks on the GPU, stream the others.

``enable_block_offload(dit, resident_blocks=k, device="cuda")`` puts everything except the
transformer blocks on ``device``, keeps the first ``k`` blocks there too, and leaves the other
blocks on ``offload_device`` (page-locked CPU memory). A forward pre-hook on each streamed block
points its weights at a device copy just before it runs and a forward hook drops the copy
afterwards; while a block runs, the next ``prefetch_blocks`` streamed blocks are already being
copied on a separate CUDA stream, so the copies overlap the compute.

Memory, host side: the tensors of each streamed block live in **one flat buffer** (the parameters
are views into it), page-locked by registering that buffer (``cudaHostRegister``) rather than with
``Tensor.pin_memory()``: PyTorch's pinned allocator rounds every allocation up to a power of two,
1.5x the RAM for Wan's block tensors. One buffer also means one host-to-device copy per block.

Memory, device side: at most ``prefetch_blocks + 1`` streamed blocks are ever on the device. The
CPU would otherwise run ahead of the GPU and queue every upload at once, so before uploading a
block the host waits for the block ``prefetch_blocks + 1`` uploads earlier to have finished
computing (an event recorded after it ran). Peak weight memory on the device: the non-block
modules + ``k`` blocks + ``prefetch_blocks + 1`` streamed blocks. Prefetching runs in a cycle: the
last streamed block prefetches the first ones for the next call, so block 0's copy overlaps the
end of the previous step (call :meth:`BlockOffload.reset` after changing weights in place between
calls, e.g. patching a LoRA in, so no stale prefetched copy is used).

Weights are read-only at inference, so "dropping" a block is only pointing its parameters back at
the offloaded views: nothing is ever copied back. The arithmetic is unchanged (the same values,
copied), so outputs are identical for every ``k``. The device specifics (page-locking, copy stream,
events) sit behind :class:`Transfers`, so the CPU tests run the same schedule with plain copies and
a fake GPU can check the window.

Why not diffusers' group offloading (``apply_group_offloading``, diffusers 0.42): it offloads every
block group and onloads one group ahead, with no way to keep ``k`` blocks resident. A 24 GB card at
480p wants 36 of 40 blocks resident (4 streamed, not 40), and the memory estimate needs
the exact window (``prefetch + 1`` blocks), so the schedule is ours.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

log = logging.getLogger("BindWeave")

_ALIGN = 64  # bytes: every tensor view in a block's flat buffer starts at a multiple of this


# ---------------------------------------------------------------------------------- device layer
class Transfers:
    """Host-to-device copies without a GPU (CPU to CPU): plain copies, nothing asynchronous.

    :class:`CudaTransfers` is the GPU version; tests pass a fake one to check the schedule.
    """

    def pin(self, buffer: torch.Tensor) -> bool:
        """Page-lock ``buffer`` in place; False when it cannot be (then copies do not overlap)."""
        return False

    def unpin(self, buffer: torch.Tensor) -> None:
        pass

    def upload(self, buffer: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, Any]:
        """Start copying ``buffer`` to ``device``: ``(device copy, event that completes with it)``."""
        return buffer.to(device, copy=True), None

    def use(self, copy: torch.Tensor, event: Any) -> None:
        """Make the compute stream wait for the copy before using it."""

    def block_done(self, copy: torch.Tensor) -> Any:
        """An event that completes when the compute queued so far (the block that used ``copy``) is done."""
        return None

    def host_wait(self, event: Any) -> None:
        """Block the host until ``event`` has completed."""


class CudaTransfers(Transfers):
    """Registered (page-locked) host buffers, a side copy stream, CUDA events."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)

    def pin(self, buffer: torch.Tensor) -> bool:
        if buffer.numel() == 0:
            return True
        cudart = torch.cuda.cudart()
        status = cudart.cudaHostRegister(buffer.data_ptr(), buffer.numel(), 0)
        if int(status) != 0:
            log.warning("could not page-lock an offloaded DiT block (cudaHostRegister error %s, e.g. a host that "
                        "limits locked memory: raise `ulimit -l`); its copies will not overlap compute", int(status))
            return False
        return True

    def unpin(self, buffer: torch.Tensor) -> None:
        if buffer.numel():
            torch.cuda.cudart().cudaHostUnregister(buffer.data_ptr())

    def upload(self, buffer: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, Any]:
        with torch.cuda.stream(self.stream):
            copy = torch.empty(buffer.shape, dtype=buffer.dtype, device=device)
            copy.copy_(buffer, non_blocking=True)
            return copy, self.stream.record_event()

    def use(self, copy: torch.Tensor, event: Any) -> None:
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(event)
        copy.record_stream(compute)  # allocated on the copy stream: not reused before compute is past it

    def block_done(self, copy: torch.Tensor) -> Any:
        return torch.cuda.current_stream(self.device).record_event()

    def host_wait(self, event: Any) -> None:
        event.synchronize()


# ---------------------------------------------------------------------------------- flat buffers
@dataclass
class _BlockStorage:
    """One streamed block: its flat host buffer and where each tensor's view sits in it."""

    buffer: torch.Tensor
    views: list[tuple[nn.Module, str, bool, int, torch.dtype, torch.Size]]  # module, name, is_param, offset, ...
    tensor_bytes: int
    pinned: bool = False


@dataclass
class _Upload:
    copy: torch.Tensor
    event: Any = None
    active: bool = False
    done: Any = None


def _block_tensors(block: nn.Module) -> list[tuple[nn.Module, str, bool]]:
    out = []
    for module in block.modules():
        out += [(module, name, True) for name, p in module._parameters.items() if p is not None]
        out += [(module, name, False) for name, b in module._buffers.items() if b is not None]
    return out


def _get(module: nn.Module, name: str, is_param: bool) -> torch.Tensor:
    return module._parameters[name].data if is_param else module._buffers[name]


def _set(module: nn.Module, name: str, is_param: bool, value: torch.Tensor) -> None:
    if is_param:
        module._parameters[name].data = value
    else:
        module._buffers[name] = value


def _view(buffer: torch.Tensor, offset: int, dtype: torch.dtype, shape: torch.Size) -> torch.Tensor:
    size = shape.numel() * dtype.itemsize
    return buffer[offset: offset + size].view(dtype).view(shape)


def _flatten_block(block: nn.Module, device: torch.device) -> _BlockStorage:
    """Move every tensor of ``block`` into one flat buffer on ``device``; the tensors become views."""
    entries = _block_tensors(block)
    layout, offset, tensor_bytes = [], 0, 0
    for module, name, is_param in entries:
        t = _get(module, name, is_param)
        layout.append((module, name, is_param, offset, t.dtype, t.shape))
        tensor_bytes += t.nbytes
        offset += -(-t.nbytes // _ALIGN) * _ALIGN
    buffer = torch.empty(offset, dtype=torch.uint8, device=device)
    for module, name, is_param, off, dtype, shape in layout:
        view = _view(buffer, off, dtype, shape)
        view.copy_(_get(module, name, is_param))
        _set(module, name, is_param, view)
    return _BlockStorage(buffer, layout, tensor_bytes)


# ---------------------------------------------------------------------------------- the schedule
class BlockOffload:
    """The offload state of one DiT (see the module docstring); made by :func:`enable_block_offload`."""

    def __init__(self, model: nn.Module, resident_blocks: int, device: str | torch.device,
                 offload_device: str | torch.device = "cpu", prefetch_blocks: int = 1,
                 pin_memory: bool | None = None, transfers: Transfers | None = None):
        self.blocks: list[nn.Module] = list(model.blocks)
        n = len(self.blocks)
        if not 0 <= resident_blocks <= n:
            raise ValueError(f"resident_blocks must be between 0 and {n} (the DiT has {n} blocks), got {resident_blocks}")
        if prefetch_blocks < 0:
            raise ValueError(f"prefetch_blocks must be >= 0, got {prefetch_blocks}")
        self.model = model
        self.resident_blocks = resident_blocks
        self.streamed = list(range(resident_blocks, n))
        self.prefetch_blocks = min(prefetch_blocks, max(len(self.streamed) - 1, 0))
        self.device = torch.device(device)
        self.offload_device = torch.device(offload_device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if transfers is None:
            transfers = CudaTransfers(self.device) if self.device.type == "cuda" else Transfers()
        self.transfers = transfers
        self.pin_memory = (self.device.type == "cuda" and self.offload_device.type == "cpu") \
            if pin_memory is None else pin_memory
        self._storage: dict[int, _BlockStorage] = {}
        self._uploads: dict[int, _Upload] = {}
        self._done: dict[int, Any] = {}  # streamed block -> event of its last run's end
        self._handles: list = []
        # statistics (tests, benchmarks): block uploads so far, most streamed blocks held on the device at once
        self.uploads = 0
        self.max_streamed_on_device = 0
        for i in self.streamed:
            block = self.blocks[i]
            self._handles.append(block.register_forward_pre_hook(self._pre_hook(i)))
            self._handles.append(block.register_forward_hook(self._post_hook(i)))
        if self.streamed and self.streamed[0] != 0:
            # first call: start copying the first streamed blocks while the resident ones run
            self._handles.append(self.blocks[0].register_forward_pre_hook(self._prefetch_start))

    # ------------------------------------------------------------------------------ placement
    def place(self) -> "BlockOffload":
        """Non-block modules and resident blocks on the device, streamed blocks in flat offload buffers."""
        self.reset()
        for child in self.model.children():
            if child is not self.model.blocks:
                child.to(self.device)
        for p in self.model._parameters.values():
            if p is not None:
                p.data = p.data.to(self.device)
        for name, b in self.model._buffers.items():
            if b is not None:
                self.model._buffers[name] = b.to(self.device)
        for i, block in enumerate(self.blocks):
            if i < self.resident_blocks:
                block.to(self.device)
        self._unpin()
        for i in self.streamed:
            storage = _flatten_block(self.blocks[i], self.offload_device)
            if self.pin_memory and self.offload_device.type == "cpu":
                storage.pinned = self.transfers.pin(storage.buffer)
                if not storage.pinned:
                    self.pin_memory = False
            self._storage[i] = storage
        return self

    def _unpin(self) -> None:
        for storage in self._storage.values():
            if storage.pinned:
                self.transfers.unpin(storage.buffer)
                storage.pinned = False

    def streamed_block_bytes(self) -> int:
        """Bytes of the largest streamed block (what each slot of the streaming window holds)."""
        return max((s.buffer.numel() for s in self._storage.values()), default=0)

    def pinned_bytes(self) -> int:
        """Page-locked host bytes (the flat buffers, alignment included)."""
        return sum(s.buffer.numel() for s in self._storage.values() if s.pinned)

    def host_bytes(self) -> int:
        """Bytes of the streamed blocks' flat host buffers (page-locked or not)."""
        return sum(s.buffer.numel() for s in self._storage.values())

    def streamed_bytes(self) -> int:
        """Bytes of the streamed blocks' tensors themselves."""
        return sum(s.tensor_bytes for s in self._storage.values())

    # ------------------------------------------------------------------------------ streaming
    def _upload(self, i: int) -> _Upload:
        upload = self._uploads.get(i)
        if upload is not None:
            return upload
        # bounded window: the block p+1 uploads back (cyclically) must have finished before this copy
        position = self.streamed.index(i)
        before = self.streamed[(position - (self.prefetch_blocks + 1)) % len(self.streamed)]
        done = self._done.pop(before, None)
        if done is not None:
            self.transfers.host_wait(done)
        copy, event = self.transfers.upload(self._storage[i].buffer, self.device)
        upload = _Upload(copy, event)
        self._uploads[i] = upload
        self.uploads += 1
        self.max_streamed_on_device = max(self.max_streamed_on_device, len(self._uploads))
        return upload

    def _activate(self, i: int) -> None:
        upload = self._upload(i)
        self.transfers.use(upload.copy, upload.event)
        for module, name, is_param, offset, dtype, shape in self._storage[i].views:
            _set(module, name, is_param, _view(upload.copy, offset, dtype, shape))
        upload.active = True
        position = self.streamed.index(i)
        for step in range(1, self.prefetch_blocks + 1):  # cyclic: the last blocks prefetch the next call's first
            self._upload(self.streamed[(position + step) % len(self.streamed)])

    def _release(self, i: int) -> None:
        upload = self._uploads.pop(i, None)
        if upload is None:
            return
        if upload.active:
            storage = self._storage[i]
            for module, name, is_param, offset, dtype, shape in storage.views:
                _set(module, name, is_param, _view(storage.buffer, offset, dtype, shape))
            self._done[i] = self.transfers.block_done(upload.copy)

    def reset(self) -> None:
        """Drop every device copy, prefetched ones included (after an interrupted forward, or after
        the weights were changed in place)."""
        for i in list(self._uploads):
            self._release(i)
        for event in self._done.values():
            if event is not None:
                self.transfers.host_wait(event)
        self._done.clear()

    def _release_active(self) -> None:
        for i in [i for i, u in self._uploads.items() if u.active]:  # left over by an interrupted forward
            self._release(i)

    def _pre_hook(self, i: int):
        @torch.compiler.disable
        def hook(module, args):
            if i == 0:
                self._release_active()
            self._activate(i)

        return hook

    def _post_hook(self, i: int):
        @torch.compiler.disable
        def hook(module, args, output):
            self._release(i)

        return hook

    @torch.compiler.disable
    def _prefetch_start(self, module, args) -> None:
        self._release_active()
        for j in self.streamed[: self.prefetch_blocks + 1]:
            self._upload(j)

    def remove(self) -> None:
        """Remove the hooks and un-register the host buffers (weights stay where they are: move the model
        with ``.to()`` afterwards)."""
        self.reset()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._unpin()


def enable_block_offload(model: nn.Module, resident_blocks: int, device: str | torch.device,
                         offload_device: str | torch.device = "cpu", prefetch_blocks: int = 1,
                         pin_memory: bool | None = None, transfers: Transfers | None = None) -> BlockOffload:
    """Stream the DiT's blocks from ``offload_device`` (see the module docstring); returns the state,
    also kept as ``model.block_offload``. Calling it again replaces the previous settings."""
    disable_block_offload(model)
    offload = BlockOffload(model, resident_blocks, device, offload_device, prefetch_blocks, pin_memory, transfers)
    model.block_offload = offload
    offload.place()
    log.info("DiT block offload: %d of %d blocks resident on %s, %d streamed from %s (%s), prefetch %d",
             resident_blocks, len(offload.blocks), offload.device, len(offload.streamed), offload.offload_device,
             "page-locked" if offload.pin_memory else "not page-locked", offload.prefetch_blocks)
    return offload


def disable_block_offload(model: nn.Module) -> None:
    """Undo :func:`enable_block_offload` (the weights stay where they are)."""
    offload = getattr(model, "block_offload", None)
    if offload is not None:
        offload.remove()
        model.block_offload = None
