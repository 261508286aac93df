"""The encoder stages' memory, checked before anything loads: a model whose weights alone cannot fit where it
would run is refused at once, not after the stages before it ran.

The DiT stage has its own estimate (weights + activations, ``bindweave_core.memory``). For the planner,
UMT5, CLIP vision and the VAE only the weights are counted, read from the file headers (no weights
read): a floating tensor at the precision it will be loaded in, a 1-byte (fp8, quantised) tensor as
stored. That is a lower bound of the stage's peak, so a run is refused only when it certainly cannot fit.
The room counted is what a new allocation can use now plus what the pipeline's own loaded models hold on
that device (the offload policy frees them between stages). Components handed over as loaded models
(the ComfyUI nodes', whose memory ComfyUI manages) are not checked here.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from .errors import OutOfMemoryError
from .lazy import Lazy

log = logging.getLogger("BindWeave")

GiB = 1024 ** 3
STAGES = {"planner": "the planner (Qwen2.5-VL)", "text_encoder": "the text encoder (UMT5-XXL)",
          "clip_vision": "the CLIP vision encoder", "vae": "the VAE"}


def file_weight_bytes(path: str, dtype: torch.dtype) -> int | None:
    """Bytes the weights in ``path`` take once loaded at ``dtype`` (from the headers); None if unreadable."""
    from .checkpoints.safetensors_io import read_header
    from .errors import CheckpointError

    try:
        infos, _ = read_header(path)
    except (CheckpointError, OSError, ValueError):
        return None  # the loader gives its own message for a file it cannot read
    target = torch.empty((), dtype=dtype).element_size()
    total = 0
    for info in infos.values():
        numel = 1
        for n in info.shape:
            numel *= int(n)
        if info.quant is not None:  # GGUF block-quantised: as stored
            total += int(info.stored_bytes or numel)
            continue
        stored = torch.empty((), dtype=info.dtype).element_size()
        total += numel * (target if info.dtype.is_floating_point and stored >= 2 else stored)
    return total


def _loaded_bytes(pipe: Any, device: torch.device) -> int:
    """What the pipeline's loaded models hold on ``device`` (freed between stages by the offload policy)."""
    total = 0
    for name in ("planner", "text_encoder", "clip_vision", "vae", "dit"):
        component = pipe.loaded(name)
        module = component if isinstance(component, torch.nn.Module) else getattr(component, "model", None)
        if isinstance(module, torch.nn.Module):
            total += sum(t.nbytes for t in list(module.parameters()) + list(module.buffers())
                         if t.device.type == device.type)
    return total


def _room(pipe: Any) -> int | None:
    from .device_memory import free_device_memory
    from .preflight import available_cpu_memory

    device = pipe.device
    free = available_cpu_memory() if device.type == "cpu" else free_device_memory(device)
    return None if free is None else free + _loaded_bytes(pipe, device)


def check_encoder_stages(pipe: Any, names: tuple[str, ...]) -> None:
    """Refuse (:class:`OutOfMemoryError`) when the weights of one of the encoders ``names``, given as files,
    are larger than the room there is for them on the pipeline's device."""
    lazies = {n: pipe.current(n) for n in names if n in STAGES}
    lazies = {n: c for n, c in lazies.items() if isinstance(c, Lazy) and c.meta.get("path") and c.meta.get("dtype")}
    if not lazies:
        return
    room = _room(pipe)
    if room is None:
        return
    for name, lazy in lazies.items():
        need = file_weight_bytes(lazy.meta["path"], lazy.meta["dtype"])
        if need is None:
            continue
        log.debug("%s: %.1f GiB of weights, %.1f GiB of room on %s", name, need / GiB, room / GiB, pipe.device)
        if need > room:
            precision = str(lazy.meta["dtype"]).replace("torch.", "")
            raise OutOfMemoryError(
                f"{STAGES[name]} cannot fit on {pipe.device}: its weights alone take {need / GiB:.1f} GiB in "
                f"{precision} ({lazy.meta['path']}), and {room / GiB:.1f} GiB is available there. Nothing was "
                "loaded. Free memory (close other programs), use a smaller precision (--dtype bf16), an fp8 file "
                "of this model, or a device with more memory; --no-memory-check tries anyway.")
