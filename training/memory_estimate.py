"""How much GPU memory a training config needs, printed before the run starts (an estimate).

Built from the core's inference estimate (:mod:`bindweave_core.memory`): the DiT weights on the
device (all blocks, or the resident ones plus the two-block streaming window of
``train.blocks_to_swap``), the LoRA with its gradient and optimizer states (AdamW: two float32
states; ``adamw8bit``: two 8-bit states), and the activations: with gradient checkpointing each
block's input is kept (in CPU memory with ``train.activation_offload``) and one block is
recomputed with its backward tensors (about 1.5 times the no-grad peak of one block); without
checkpointing every block keeps that much. It is an estimate from shapes, not a measurement.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bindweave_core.config import DiTConfig
from bindweave_core.dtypes import torch_dtype
from bindweave_core.families import family_for
from bindweave_core.memory import dit_activation_bytes, token_count, weight_bytes

from .config import TrainConfig

GiB = 1 << 30
CUDA_OVERHEAD = 2 * GiB  # context, cuBLAS/cuDNN workspaces, allocator slack
BACKWARD_FACTOR = 1.5  # a recomputed block's saved tensors for backward vs. its no-grad peak
STREAM_WINDOW = 2  # streamed blocks on the device at once (the running one + the first one, uploaded early)


@dataclass(frozen=True)
class TrainingEstimate:
    weights: int
    lora: int  # parameters + gradients + optimizer states
    activations: int
    overhead: int = CUDA_OVERHEAD

    @property
    def total(self) -> int:
        return self.weights + self.lora + self.activations + self.overhead

    def describe(self) -> str:
        return (f"~{self.total / GiB:.1f} GiB per GPU (DiT weights {self.weights / GiB:.1f}, LoRA + optimizer "
                f"{self.lora / GiB:.2f}, activations {self.activations / GiB:.1f}, CUDA overhead "
                f"{self.overhead / GiB:.0f}; an estimate)")


def estimate_training(cfg: TrainConfig, config: DiTConfig, width: int, height: int, num_frames: int,
                      lora_params: int) -> TrainingEstimate:
    """The estimate for the largest clip ``width x height x num_frames`` of the run."""
    t, m = cfg.train, cfg.model
    dtype = torch_dtype(m.dtype)
    other, block = weight_bytes(config, dtype, m.weight_format)
    n = config.num_layers
    swapped = min(t.blocks_to_swap, n)
    on_device = n - swapped + min(STREAM_WINDOW, swapped)
    state_bytes = 2 * 4 if t.optimizer == "adamw" else 2 * 1
    lora = lora_params * (4 + 4 + state_bytes)  # float32 weights and gradients, optimizer states
    element = 2 if t.mixed_precision in ("bf16", "fp16") or dtype != torch.float32 else 4
    slots = family_for(config).slot_frames(config)
    tokens = token_count(width, height, num_frames, slots) * t.batch_size
    one_block = BACKWARD_FACTOR * dit_activation_bytes(config, width, height, num_frames, t.batch_size, element)
    if t.gradient_checkpointing:
        stored = 0 if t.activation_offload else n * tokens * config.dim * element
        activations = int(stored + one_block)
    else:
        activations = int(n * one_block)
    return TrainingEstimate(other + on_device * block, lora, activations)
