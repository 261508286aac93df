"""What the DiT is conditioned on, and the spec's tensor assembly of it.

The encoders (``bindweave_core.encoders``) produce the pieces; this module puts them together
exactly as spec sections 6 and 8 describe, and holds them in small dataclasses that the sampler,
the nodes and the training cache pass around.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import constants as C
from .setting_bounds import check_reference_count


# ------------------------------------------------------------------------------------------ types
@dataclass
class PlannerStates:
    """Qwen2.5-VL final normed hidden states, unpadded (spec section 2)."""

    positive: torch.Tensor  # [1, L, planner_dim]
    negative: torch.Tensor  # [1, L', planner_dim]
    refined_prompt: str | None = None


@dataclass
class TextStates:
    """UMT5 states, 512 positions, zero past the real tokens (spec section 3)."""

    positive: torch.Tensor  # [1, 512, text_dim]
    negative: torch.Tensor  # [1, 512, text_dim]


@dataclass(frozen=True)
class VideoGeometry:
    """The video a node's references were encoded for, and the statistics of the VAE that encoded them
    (ComfyUI's LATENT is in that VAE's raw space; the DiT works on normalised latents)."""

    width: int
    height: int
    num_frames: int
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None


@dataclass
class ReferenceCondition:
    """The reference images as the DiT sees them (spec sections 5, 6, 8)."""

    clip_tokens: torch.Tensor | None  # [1, 1028, image_dim]: refs' penultimate CLIP states, zero padded
    slots: torch.Tensor | None  # [1, 20, 4, h, w]: [mask, 0, 0, 0, latent] per ref, zero padded
    canvases: torch.Tensor  # [n, H, W, 3] letterboxed references in 0..1 (what the model sees)
    masks: torch.Tensor  # [n, H, W] in {0, 1}
    # R-RoPE (Kaleido) families: clean reference latents [1, n, 16, h, w] instead of slots
    latents: torch.Tensor | None = None
    family: str = "bindweave"  # the model family whose reference layout this is (bindweave_core.families)
    video_condition: torch.Tensor | None = None  # slots: the all-zero video's condition [1, 20, T, h, w]
    geometry: VideoGeometry | None = None  # the video the references were encoded for (the nodes set it)

    @property
    def num_references(self) -> int:
        return int(self.canvases.shape[0])


# ------------------------------------------------------------------------------------------ assembly
def clip_context(ref_tokens: list[torch.Tensor], slots: int = C.NUM_REF_SLOTS) -> torch.Tensor:
    """Spec section 6: concatenate each reference's ``[1, 257, D]`` tokens, zero-pad to ``slots*257``.

    The padding is applied even for one reference (quirk of the released weights).
    """
    check_reference_count(len(ref_tokens), slots, "BindWeave")
    tokens = torch.cat(ref_tokens, dim=1)
    per_ref = ref_tokens[0].shape[1]
    pad = tokens.new_zeros(tokens.shape[0], (slots - len(ref_tokens)) * per_ref, tokens.shape[2])
    return torch.cat([tokens, pad], dim=1)


def slot_mask(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Spec section 8: a pixel mask ``[H, W]`` downsampled to the latent grid with nearest."""
    return F.interpolate(mask[None, None].float(), size=(height, width), mode="nearest")[0, 0]


def reference_slot(latent: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One slot ``[1, 20, 1, h, w]`` = channels ``[mask, 0, 0, 0, latent(16)]``.

    ``latent`` is the normalised VAE latent of the letterboxed reference ``[1, 16, 1, h, w]``,
    ``mask`` the letterbox mask in pixels ``[H, W]``.
    """
    h, w = latent.shape[-2:]
    m = slot_mask(mask, h, w).to(latent)
    mask_channels = torch.zeros(1, C.SLOT_MASK_CHANNELS, 1, h, w, dtype=latent.dtype, device=latent.device)
    mask_channels[0, 0, 0] = m
    return torch.cat([mask_channels, latent], dim=1)


def pad_slots(slots: list[torch.Tensor], num_slots: int = C.NUM_REF_SLOTS) -> torch.Tensor:
    """Concatenate reference slots in time and fill the unused ones with zeros: ``[1, 20, 4, h, w]``."""
    check_reference_count(len(slots), num_slots, "BindWeave")
    stacked = torch.cat(slots, dim=2)
    pad = stacked.new_zeros(*stacked.shape[:2], num_slots - len(slots), *stacked.shape[3:])
    return torch.cat([stacked, pad], dim=2)


def video_condition(zero_video_latent: torch.Tensor) -> torch.Tensor:
    """Spec section 8: the normalised latent of an all-zero video with 4 zero mask channels in front."""
    b, _, t, h, w = zero_video_latent.shape
    return torch.cat([zero_video_latent.new_zeros(b, C.SLOT_MASK_CHANNELS, t, h, w), zero_video_latent], dim=1)


def vae_condition(slots: torch.Tensor, video_cond: torch.Tensor) -> torch.Tensor:
    """``[1, 20, 4 + T, h, w]``: the reference slots then the video condition, in time."""
    return torch.cat([slots.to(video_cond), video_cond], dim=2)
