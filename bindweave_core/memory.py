"""Rough device-memory estimates, used to decide batching and to warn before a run that won't fit."""

from __future__ import annotations

from typing import Any

import torch

from . import constants as C


def token_count(width: int, height: int, num_frames: int, slots: int = C.NUM_REF_SLOTS) -> int:
    """Tokens of the DiT sequence: (slots + T) x (h/2) x (w/2)."""
    t = C.latent_frames(num_frames) + slots
    h, w = height // C.VAE_SPATIAL_FACTOR // 2, width // C.VAE_SPATIAL_FACTOR // 2
    return t * h * w


def dit_activation_bytes(config: Any, width: int, height: int, num_frames: int, batch: int = 1,
                         element_size: int = 2) -> int:
    """Peak activation memory of one block of a no-grad DiT forward (the blocks run one at a time).

    Live at the peak: the residual stream, the normed input, q/k/v, the attention output and the
    FFN's hidden layer and its activation: about ``S * (6 * dim + 2 * ffn_dim)`` elements, plus the
    fp32 residual/modulation copies diffusers' block makes (``2 * S * dim`` floats).
    """
    s = token_count(width, height, num_frames, config.num_ref_slots if config.uses_slots else 0)
    elements = s * (6 * config.dim + 2 * config.ffn_dim)
    return batch * (elements * element_size + 2 * s * config.dim * 4)


def fits_batched_cfg(dit: Any, settings: Any, device: torch.device, margin: float = 1.2) -> bool:
    """Whether cond and uncond fit in one batch on ``device`` next to the loaded model."""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    element = dit.patch_embedding.weight.element_size()
    extra = dit_activation_bytes(dit.dit_config, settings.width, settings.height, settings.num_frames, 1, element)
    return free > margin * 2 * extra
