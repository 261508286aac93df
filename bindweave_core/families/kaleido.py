"""Kaleido (``kaleido``, R-RoPE): UMT5 only, 1-3 clean reference latents in front of the video at
shifted rotary positions. The building blocks (white letterbox, DiT inputs, training draw, sigma grid,
download layout) are in :mod:`bindweave_core.kaleido`; sources in docs/kaleido-rrope.md."""

from __future__ import annotations

import logging
from typing import Any

import torch

from .. import constants as C
from .. import kaleido as K
from ..condition_cache import tensor_digest
from ..conditioning import PlannerStates, ReferenceCondition, TextStates
from ..denoiser import DiTBranch
from ..errors import InputError
from .base import ModelFamily, ReferenceHost

log = logging.getLogger("BindWeave")


class KaleidoFamily(ModelFamily):
    name = "kaleido"
    conditioning = "rrope"
    max_references = C.KALEIDO_MAX_REFERENCES
    reference_model = "Kaleido-14B-S2V"
    encoders = ("text_encoder", "vae")  # no CLIP, no planner
    reference_encoders = ("vae",)
    smoke_preset = "tiny-kaleido"
    canvas_colour = C.KALEIDO_CANVAS_COLOUR
    letterbox_upscales = True
    needs_video_condition = False
    sigma_sampling = "kaleido"

    def defaults(self) -> dict[str, Any]:
        """896x512, 81 frames at 16 fps, rf-euler shift 7, 50 steps, guidance 6, its own negative prompt."""
        return dict(negative_prompt=C.KALEIDO_NEGATIVE_PROMPT, width=C.KALEIDO_WIDTH, height=C.KALEIDO_HEIGHT,
                    num_frames=C.KALEIDO_FRAMES, steps=C.KALEIDO_STEPS, guidance=C.KALEIDO_GUIDANCE,
                    shift=C.KALEIDO_SHIFT, sampler=C.KALEIDO_SAMPLER, fps=C.KALEIDO_FPS)

    def check_settings(self, settings: Any) -> None:
        """Beyond 80 patches (1280 px) the video's own positions reach the references' shifted ones."""
        limit = C.RROPE_POSITION_SHIFT * C.VAE_SPATIAL_FACTOR * C.PATCH_SIZE[1]
        if settings.width > limit or settings.height > limit:
            log.warning("%dx%d is larger than %d px on a side: video positions overlap the reference positions "
                        "(h, w >= %d); Kaleido was trained at 512x896.", settings.width, settings.height, limit,
                        C.RROPE_POSITION_SHIFT)

    def check_dit(self, config: Any, source: str, checkpoint_family: str) -> None:
        if config.in_channels != C.LATENT_CHANNELS:
            raise InputError(f"{source} is a {checkpoint_family} DiT with {config.in_channels} input channels; the "
                             f"{self.name} family needs a text-to-video DiT ({C.LATENT_CHANNELS} channels). Leave "
                             "out the family to use the checkpoint's own.")

    # ------------------------------------------------------------------------------ references
    def prepare_references(self, images: Any, width: int, height: int, masks: Any = None,
                           mask_mode: str = "rectangle") -> tuple[torch.Tensor, torch.Tensor]:
        return K.prepare_kaleido_references(images, width, height, masks=masks, mask_mode=mask_mode)

    def encode_canvases(self, host: ReferenceHost, canvases: torch.Tensor, pixel_masks: torch.Tensor,
                        settings: Any) -> ReferenceCondition:
        """Each white-letterboxed reference VAE-encoded alone: clean latents ``[1, n, 16, h, w]``."""

        def encode() -> dict[str, torch.Tensor]:
            with host.on_device("vae") as vae:
                return {"latents": vae.reference_latents(canvases)}

        out = host.cached("kaleido-references", ("vae",), {"canvases": tensor_digest(canvases),
                                                           "masks": tensor_digest(pixel_masks),
                                                           "tiling": host.vae_tiling_active()}, encode)
        return ReferenceCondition(clip_tokens=None, slots=None, canvases=canvases, masks=pixel_masks,
                                  latents=out["latents"], family=KaleidoFamily.name)

    def branches(self, text: TextStates, planner: PlannerStates | None,
                 refs: ReferenceCondition) -> tuple[DiTBranch, DiTBranch]:
        """Guidance on the text only: both branches see the same clean references (no planner)."""
        if refs.latents is None:
            raise InputError("these references were prepared for BindWeave (temporal slots); a Kaleido model needs "
                             "them encoded in kaleido mode.")
        K.check_reference_count(int(refs.latents.shape[1]))
        cond = DiTBranch(text.positive, reference_latents=refs.latents)
        uncond = DiTBranch(text.negative, reference_latents=refs.latents)
        return cond, uncond

    # ------------------------------------------------------------------------------ training
    def training_sigmas(self, batch: int, generator: torch.Generator, shift: float,
                        latent_size: tuple[int, int] | None) -> torch.Tensor:
        """The official draw (``sigmoid(N(0, 1))``, resolution-shifted); ``shift`` is not used."""
        return torch.as_tensor(K.kaleido_training_sigma(batch, *latent_size, generator=generator),
                               dtype=torch.float32)

    def cache_variant(self, images: list, masks: list, bucket: tuple[int, int], mask_mode: str) -> dict[str, Any]:
        return {"images": images, "mask_images": masks}  # letterboxed and encoded together at the VAE stage

    def cache_reference_tensors(self, vae: Any, variant: dict[str, Any], bucket: tuple[int, int],
                                mask_mode: str) -> dict[str, torch.Tensor]:
        refs = K.encode_kaleido_references(vae, variant["images"], bucket[0], bucket[1],
                                           masks=variant["mask_images"], mask_mode=mask_mode)
        return {"ref_latents": refs.latents.cpu()}
