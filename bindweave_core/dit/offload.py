"""Block-wise offload of the DiT: keep some transformer blocks on the GPU, stream the others.

``enable_block_offload(dit, resident_blocks=k, device="cuda")`` puts everything except the
transformer blocks on ``device``, keeps the first ``k`` blocks there too, and leaves the other
blocks on ``offload_device`` (pinned CPU memory). A forward pre-hook on each streamed block brings
its weights over just before it runs and a forward hook drops the copy afterwards; while a block
runs, the next ``prefetch_blocks`` streamed blocks are already being copied on a separate CUDA
stream, so the copies overlap the compute. Peak weight memory on the device: the non-block modules
+ ``k`` blocks + ``prefetch_blocks + 1`` streamed blocks.

Weights are read-only at inference, so "dropping" a block is only pointing its parameters back at
the offloaded tensors: nothing is ever copied back. The arithmetic is unchanged (the same tensors,
copied), so outputs are identical for every ``k``. With both devices the CPU the copies are real
copies too, which is how the tests check the schedule.

Why not diffusers' group offloading (``apply_group_offloading``, diffusers 0.42): it offloads every
block group and onloads one group ahead, with no way to keep ``k`` blocks resident. A 24 GB card at
480p wants 36 of 40 blocks resident (4 streamed, not 40), and the memory estimate needs
the exact window (``prefetch + 1`` blocks), so the schedule is ours.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

import torch
from torch import nn

log = logging.getLogger("BindWeave")


@dataclass
class _Upload:
    """One block's device copies: ``(module, name, is_parameter, offloaded tensor, device tensor)``."""

    tensors: list[tuple[nn.Module, str, bool, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    event: torch.cuda.Event | None = None
    active: bool = False


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


class BlockOffload:
    """The offload state of one DiT (see the module docstring); made by :func:`enable_block_offload`."""

    def __init__(self, model: nn.Module, resident_blocks: int, device: str | torch.device,
                 offload_device: str | torch.device = "cpu", prefetch_blocks: int = 1,
                 pin_memory: bool | None = None):
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
        self.pin_memory = (self.device.type == "cuda" and self.offload_device.type == "cpu") \
            if pin_memory is None else pin_memory
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._tensors = {i: _block_tensors(self.blocks[i]) for i in self.streamed}
        self._uploads: dict[int, _Upload] = {}
        self._handles: list = []
        # statistics (tests, benchmarks): block uploads so far, most streamed blocks on the device at once
        self.uploads = 0
        self.max_streamed_on_device = 0
        for i in self.streamed:
            block = self.blocks[i]
            self._handles.append(block.register_forward_pre_hook(self._pre_hook(i)))
            self._handles.append(block.register_forward_hook(self._post_hook(i)))
        if self.streamed and self.streamed[0] != 0:
            # start copying the first streamed blocks while the resident ones run
            self._handles.append(self.blocks[0].register_forward_pre_hook(self._prefetch_start))

    # ------------------------------------------------------------------------------ placement
    def place(self) -> "BlockOffload":
        """Non-block modules and resident blocks on the device, streamed blocks on the offload device."""
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
            block.to(self.device if i < self.resident_blocks else self.offload_device)
        if self.pin_memory:
            self._pin()
        return self

    def _pin(self) -> None:
        try:
            for entries in self._tensors.values():
                for module, name, is_param in entries:
                    t = _get(module, name, is_param)
                    if t.device.type == "cpu" and not t.is_pinned():
                        _set(module, name, is_param, t.pin_memory())
        except RuntimeError as e:  # e.g. a host that limits page-locked memory
            log.warning("could not pin the offloaded DiT blocks (%s); copies will not overlap compute", e)
            self.pin_memory = False

    def streamed_block_bytes(self) -> int:
        """Bytes of the largest streamed block (what each slot of the streaming window holds)."""
        sizes = [sum(_get(m, n, p).nbytes for m, n, p in entries) for entries in self._tensors.values()]
        return max(sizes, default=0)

    # ------------------------------------------------------------------------------ streaming
    def _upload(self, i: int) -> _Upload:
        upload = self._uploads.get(i)
        if upload is not None:
            return upload
        upload = _Upload()
        stream = torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext()
        with stream:
            for module, name, is_param in self._tensors[i]:
                src = _get(module, name, is_param)
                dst = src.to(self.device, non_blocking=self.pin_memory, copy=True)
                upload.tensors.append((module, name, is_param, src, dst))
            if self._stream is not None:
                upload.event = self._stream.record_event()
        self._uploads[i] = upload
        self.uploads += 1
        self.max_streamed_on_device = max(self.max_streamed_on_device, len(self._uploads))
        return upload

    def _activate(self, i: int) -> None:
        upload = self._upload(i)
        if upload.event is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(upload.event)
            for *_, dst in upload.tensors:
                # the copy was allocated on the side stream: keep the allocator from reusing it early
                dst.record_stream(compute)
        for module, name, is_param, _, dst in upload.tensors:
            _set(module, name, is_param, dst)
        upload.active = True
        position = self.streamed.index(i)
        for j in self.streamed[position + 1: position + 1 + self.prefetch_blocks]:
            self._upload(j)

    def _release(self, i: int) -> None:
        upload = self._uploads.pop(i, None)
        if upload is not None and upload.active:
            for module, name, is_param, src, _ in upload.tensors:
                _set(module, name, is_param, src)

    def reset(self) -> None:
        """Point every streamed block back at its offloaded weights (after an interrupted forward)."""
        for i in list(self._uploads):
            self._release(i)

    def _pre_hook(self, i: int):
        @torch.compiler.disable
        def hook(module, args):
            if i == 0:
                self.reset()
            self._activate(i)

        return hook

    def _post_hook(self, i: int):
        @torch.compiler.disable
        def hook(module, args, output):
            self._release(i)

        return hook

    @torch.compiler.disable
    def _prefetch_start(self, module, args) -> None:
        self.reset()
        for j in self.streamed[: self.prefetch_blocks + 1]:
            self._upload(j)

    def remove(self) -> None:
        """Remove the hooks (weights stay where they are: move the model with ``.to()`` afterwards)."""
        self.reset()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def enable_block_offload(model: nn.Module, resident_blocks: int, device: str | torch.device,
                         offload_device: str | torch.device = "cpu", prefetch_blocks: int = 1,
                         pin_memory: bool | None = None) -> BlockOffload:
    """Stream the DiT's blocks from ``offload_device`` (see the module docstring); returns the state,
    also kept as ``model.block_offload``. Calling it again replaces the previous settings."""
    disable_block_offload(model)
    offload = BlockOffload(model, resident_blocks, device, offload_device, prefetch_blocks, pin_memory)
    model.block_offload = offload
    offload.place()
    log.info("DiT block offload: %d of %d blocks resident on %s, %d streamed from %s (%s), prefetch %d",
             resident_blocks, len(offload.blocks), offload.device, len(offload.streamed), offload.offload_device,
             "pinned" if offload.pin_memory else "not pinned", offload.prefetch_blocks)
    return offload


def disable_block_offload(model: nn.Module) -> None:
    """Undo :func:`enable_block_offload` (the weights stay where they are)."""
    offload = getattr(model, "block_offload", None)
    if offload is not None:
        offload.remove()
        model.block_offload = None
