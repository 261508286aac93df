"""Regional ``torch.compile`` of the DiT: compile the repeated transformer block, not the whole model.

Every block has the same code, so one compiled graph serves all 40 of them (compile time of one
block, speed of compiling everything). We compile each block's ``forward`` rather than the whole
module call (what diffusers' ``compile_repeated_blocks`` does with ``module.compile()``): module hooks
-- the block offload's weight swaps, diffusers' context-parallel split on ``blocks.0`` -- then stay
outside the graph and run eagerly, and no graph breaks appear inside a block.

Numerics: inductor fuses elementwise chains (norms, modulation, rotary), which changes float32
rounding (~1e-6 relative); the ``eager`` / ``aot_eager`` backends change nothing and are what the CPU
tests use (inductor compiles for minutes on two cores). CUDA graphs (``mode="reduce-overhead"``) are
refused: the offload's weight swaps and the changing shapes of cond/uncond calls break them.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger("BindWeave")

COMPILE_MODES = (None, "default", "max-autotune-no-cudagraphs")


def compile_blocks(model: nn.Module, *, backend: str = "inductor", mode: str | None = None,
                   fullgraph: bool = False, dynamic: bool | None = None) -> int:
    """``torch.compile`` each block's ``forward`` in place; returns how many blocks were compiled.

    Call it before :func:`~bindweave_core.dit.parallel.enable_context_parallel` (whose hook on
    ``blocks.0`` then wraps the compiled forward). Calling it twice does nothing the second time.
    """
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {COMPILE_MODES}, got {mode!r} (CUDA-graph modes do not "
                         "work with block offload or with changing cond/uncond batch shapes)")
    if getattr(model, "_parallel_config", None) is not None:
        raise RuntimeError("compile the blocks before enabling context parallelism (its hooks must wrap the "
                           "compiled forward, not be compiled into it)")
    compiled = 0
    for block in model.blocks:
        if getattr(block, "_bindweave_compiled", False):
            continue
        block.forward = torch.compile(block.forward, backend=backend, mode=mode, fullgraph=fullgraph,
                                      dynamic=dynamic)
        block._bindweave_compiled = True
        compiled += 1
    if compiled:
        log.info("torch.compile: %d DiT blocks (backend %s, mode %s); the first step compiles", compiled, backend,
                 mode or "default")
    return compiled


def is_compiled(model: nn.Module) -> bool:
    return any(getattr(block, "_bindweave_compiled", False) for block in model.blocks)
