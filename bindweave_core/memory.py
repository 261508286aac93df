"""Device-memory estimates: shown before a run, used to decide batching, and to refuse a run that
cannot fit with the settings that would.

The peak of the DiT stage is the sum of

* weights on the device: the non-block modules plus every block, or with block offload the
  ``k`` resident blocks plus the streaming window (``prefetch + 1`` blocks); bytes per element by
  weight format (bf16/fp16 2, fp32 4, fp8 1 for the block linears, norm/time tables kept fp32);
* activations of one block (the blocks run one at a time, nothing is kept for backward):
  :func:`dit_activation_bytes`, times the DiT batch (2 when cond and uncond are batched), divided by
  the context-parallel ranks;
* conditioning: both branches' contexts and condition latents, latents and sampler state, rotary tables;
* a fixed workspace for cuBLAS / attention kernels and allocator rounding.

These are estimates from shapes; no GPU has calibrated them yet. The activation term is calibrated
on the CPU (``benchmarks/memory_estimate.py``: what a forward allocates, against the estimate, three
configurations); GPU kernels' own workspaces are in the fixed workspace term. A run
the check refuses can still be tried with ``memory_check=False`` (CLI ``--no-memory-check``).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass
from typing import Any

import torch

from . import constants as C
from .device_memory import free_device_memory, make_room
from .errors import OutOfMemoryError
from .families import family_for

log = logging.getLogger("BindWeave")

GiB = 1024 ** 3
WORKSPACE_BYTES = GiB // 2
FIT_MARGIN = 1.05  # the estimate must fit in free memory with 5% to spare (allocator fragmentation)
TYPICAL_PLANNER_TOKENS = 600  # Qwen2.5-VL states: ~500 tokens for one image, more for several
SAMPLER_LATENT_COPIES = 5  # latents, velocity, UniPC's model-output history and its update


def token_count(width: int, height: int, num_frames: int, slots: int = C.NUM_REF_SLOTS) -> int:
    """Tokens of the DiT sequence: (slots + T) x (h/2) x (w/2)."""
    t = C.latent_frames(num_frames) + slots
    h, w = height // C.VAE_SPATIAL_FACTOR // 2, width // C.VAE_SPATIAL_FACTOR // 2
    return t * h * w


def dit_activation_bytes(config: Any, width: int, height: int, num_frames: int, batch: int = 1,
                         element_size: int = 2) -> int:
    """Peak activation memory of one block of a no-grad DiT forward (the blocks run one at a time).

    About ``S * (4 * dim + 2 * ffn_dim)`` elements (the residual stream, normed input, the attention's
    inputs/outputs that are alive together, the FFN's hidden layer and its activation) plus the fp32
    residual/modulation copies diffusers' block makes (``2 * S * dim`` floats): 13.4 block-sized
    tensors (``S * dim * element_size``) at the 14B model's proportions. Calibrated by
    ``benchmarks/memory_estimate.py``, which measured 12.4-13.4 on the CPU (live tensor bytes of
    every op, three configurations); the first count, ``6 * dim``, gave 15.4.
    """
    s = token_count(width, height, num_frames, family_for(config).slot_frames(config))
    elements = s * (4 * config.dim + 2 * config.ffn_dim)
    return batch * (elements * element_size + 2 * s * config.dim * 4)


# ---------------------------------------------------------------------------------- the estimate
@dataclass(frozen=True)
class RunShape:
    """What the DiT stage's memory depends on."""

    width: int
    height: int
    num_frames: int
    batch: int = 1  # DiT batch: 2 when cond and uncond run batched
    dtype: torch.dtype = torch.bfloat16
    weight_format: str = "default"  # default | fp8 | fp8_fast
    resident_blocks: int | None = None  # block offload: blocks kept on the device (None: no offload)
    prefetch_blocks: int = 1
    cp_degree: int = 1  # context-parallel ranks sharing the sequence
    planner_tokens: int = TYPICAL_PLANNER_TOKENS

    def replace(self, **changes: Any) -> "RunShape":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class VramEstimate:
    shape: RunShape
    weights: int
    activations: int
    conditioning: int
    workspace: int = WORKSPACE_BYTES

    @property
    def total(self) -> int:
        return self.weights + self.activations + self.conditioning + self.workspace

    def fits(self, free_bytes: int) -> bool:
        return self.total * FIT_MARGIN <= free_bytes

    def describe(self) -> str:
        return (f"{self.total / GiB:.1f} GiB (weights {self.weights / GiB:.1f}, activations "
                f"{self.activations / GiB:.1f} at batch {self.shape.batch}, conditioning "
                f"{self.conditioning / GiB:.2f}, workspace {self.workspace / GiB:.1f})")


@functools.lru_cache(maxsize=16)
def weight_bytes(config: Any, dtype: torch.dtype = torch.bfloat16, weight_format: str = "default") -> tuple[int, int]:
    """``(bytes outside the blocks, bytes of one block)`` of a DiT loaded with ``dtype``/``weight_format``,
    counted on a meta-device model with the loader's rules (fp32 tables, fp8 block linears)."""
    from .checkpoints.materialize import target_dtype
    from .dit.transformer import BindWeaveTransformer
    from .fp8 import fp8_candidate_modules

    with torch.device("meta"):  # every block is alike: one is enough (a 40-block meta model takes seconds)
        model = BindWeaveTransformer(config.replace(num_layers=1))
    keep = tuple(BindWeaveTransformer._keep_in_fp32_modules)
    fp8 = {name + ".weight" for name in fp8_candidate_modules(model)} if weight_format != "default" else set()
    other = block = 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        size = t.numel() + 4 if name in fp8 else t.numel() * target_dtype(name, t.dtype, dtype, keep).itemsize
        if name.startswith("blocks.0."):
            block += size
        elif not name.startswith("blocks."):
            other += size
    return other, block


def estimate_vram(config: Any, shape: RunShape) -> VramEstimate:
    """Peak device memory of the DiT stage for ``shape`` (see the module docstring)."""
    other, block = weight_bytes(config, shape.dtype, shape.weight_format)
    n = config.num_layers
    if shape.resident_blocks is None:
        on_device = n
    else:
        streamed = n - shape.resident_blocks
        on_device = shape.resident_blocks + min(shape.prefetch_blocks + 1, streamed)
    element = shape.dtype.itemsize
    cp = max(shape.cp_degree, 1)
    activations = -(-dit_activation_bytes(config, shape.width, shape.height, shape.num_frames, shape.batch,
                                          element) // cp)
    slots = family_for(config).slot_frames(config)
    tokens = -(-token_count(shape.width, shape.height, shape.num_frames, slots) // cp)
    t, h, w = (C.latent_frames(shape.num_frames), shape.height // C.VAE_SPATIAL_FACTOR,
               shape.width // C.VAE_SPATIAL_FACTOR)
    context_tokens = C.CLIP_CONTEXT_TOKENS + shape.planner_tokens + C.TEXT_LEN
    inputs = (C.TEXT_LEN * config.text_dim + C.CLIP_CONTEXT_TOKENS * (config.image_dim or 0)
              + shape.planner_tokens * (config.planner_dim or 0))
    per_branch = (context_tokens * config.dim + inputs + C.CONDITION_CHANNELS * (slots + t) * h * w) * element
    conditioning = (2 * per_branch  # cond and uncond are both on the device
                    + SAMPLER_LATENT_COPIES * C.LATENT_CHANNELS * t * h * w * 4
                    + tokens * config.head_dim // 2 * 16)  # cos, sin and the complex table (float32)
    return VramEstimate(shape, other + on_device * block, activations, conditioning)


# ---------------------------------------------------------------------------------- the check
def _suggestions(config: Any, shape: RunShape, free: int) -> list[tuple[str, VramEstimate]]:
    """Setting changes, each with its estimate, those that fit first."""
    out: list[tuple[str, VramEstimate]] = []
    if shape.batch > 1:
        out.append(("--cfg-batch separate (cond and uncond one after the other)", estimate_vram(config, shape.replace(batch=1))))
    if shape.weight_format == "default":
        out.append(("--weight-format fp8 (fp8 block weights)", estimate_vram(config, shape.replace(weight_format="fp8"))))
    if shape.resident_blocks is None or shape.resident_blocks > 0:
        start = config.num_layers if shape.resident_blocks is None else shape.resident_blocks
        k = next((k for k in range(start - 1, -1, -1)
                  if estimate_vram(config, shape.replace(resident_blocks=k)).fits(free)), 0)
        out.append((f"--block-offload {k} (keep {k} of {config.num_layers} blocks on the GPU, stream the rest)",
                    estimate_vram(config, shape.replace(resident_blocks=k))))
    if shape.width * shape.height > 832 * 480:
        w, h = (832, 480) if shape.width >= shape.height else (480, 832)
        out.append((f"--width {w} --height {h} (lower resolution)",
                    estimate_vram(config, shape.replace(width=w, height=h))))
    if shape.num_frames > 33:
        frames = (shape.num_frames - 1) // 8 * 4 + 1
        out.append((f"--frames {frames} (shorter video)", estimate_vram(config, shape.replace(num_frames=frames))))
    combined = shape.replace(batch=1, weight_format="fp8" if shape.weight_format == "default" else shape.weight_format)
    if combined != shape:
        k = next((k for k in range(config.num_layers, -1, -1)
                  if estimate_vram(config, combined.replace(resident_blocks=k)).fits(free)), 0)
        label = "--cfg-batch separate --weight-format fp8" + (f" --block-offload {k}" if k < config.num_layers else "")
        out.append((label, estimate_vram(config, combined.replace(resident_blocks=None if k == config.num_layers
                                                                  else k))))
    out.sort(key=lambda item: not item[1].fits(free))
    return out


def memory_message(config: Any, shape: RunShape, free: int, device: Any, during_run: str | None = None) -> str:
    """The user-facing text of an :class:`~bindweave_core.errors.OutOfMemoryError`."""
    est = estimate_vram(config, shape)
    head = (f"ran out of GPU memory on {device} during sampling ({during_run}). " if during_run else
            f"this run will not fit on {device}: ")
    lines = [head + f"estimated peak {est.describe()}, {free / GiB:.1f} GiB free "
             f"({shape.width}x{shape.height}, {shape.num_frames} frames, {str(shape.dtype).replace('torch.', '')}, "
             f"weights {shape.weight_format}"
             + (f", block offload {shape.resident_blocks}" if shape.resident_blocks is not None else "") + ")."]
    lines.append("Change one of these (estimated peak each; * = fits):")
    for label, alt in _suggestions(config, shape, free):
        lines.append(f"  {'*' if alt.fits(free) else ' '} {label}: {alt.total / GiB:.1f} GiB")
    lines.append("Free GPU memory used by other programs, or, if the estimate is too cautious, try anyway "
                 "with --no-memory-check (RuntimeOptions(memory_check=False)).")
    return "\n".join(lines)


def check_fits(config: Any, shape: RunShape, free: int, device: Any) -> VramEstimate:
    """The estimate, or :class:`OutOfMemoryError` naming the settings to change when it does not fit."""
    est = estimate_vram(config, shape)
    if not est.fits(free):
        raise OutOfMemoryError(memory_message(config, shape, free, device))
    return est


def fits_batched_cfg(dit: Any, settings: Any, device: torch.device, margin: float = FIT_MARGIN) -> bool:
    """Whether cond and uncond fit in one batch on ``device`` next to the DiT already placed there.

    The same arithmetic as the pre-run check: what batch 2 needs beyond the weights already on
    the device (activations, conditioning, workspace and any block-streaming window). A host with a
    memory manager first frees what idle models hold (``device_memory.make_room``): the slower
    separate mode is chosen only for memory that cannot be had.
    """
    if device.type != "cuda":
        return True
    shape = RunShape(settings.width, settings.height, getattr(settings, "condition_frames", settings.num_frames),
                     batch=2,
                     dtype=dit.patch_embedding.weight.dtype, weight_format="default")
    est = estimate_vram(dit.dit_config, shape)
    offload = getattr(dit, "block_offload", None)
    window = offload.streamed_block_bytes() * (offload.prefetch_blocks + 1) if offload and offload.streamed else 0
    need = int(margin * (est.activations + est.conditioning + est.workspace + window))
    make_room(device, need)
    return free_device_memory(device) >= need
