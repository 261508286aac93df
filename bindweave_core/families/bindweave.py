"""BindWeave (``bindweave``): planner + CLIP + 4 temporal reference slots (spec sections 1-9, 12), and
the plain Wan2.1 checkpoints (``wan-i2v``, ``wan-t2v``), which are fed BindWeave's references without
having been trained on them."""

from __future__ import annotations

from typing import Any

import torch

from .. import constants as C
from ..condition_cache import tensor_digest
from ..conditioning import PlannerStates, ReferenceCondition, TextStates, vae_condition
from ..denoiser import DiTBranch
from ..finite import check_finite, model_dtype
from ..references import prepare_references
from ..schedules import shifted_sigmas
from .base import ModelFamily, ReferenceHost


class BindWeaveFamily(ModelFamily):
    name = "bindweave"
    conditioning = "slots"
    requires_planner = True
    max_references = C.MAX_REFERENCES
    reference_model = "BindWeave"
    encoders = ("planner", "text_encoder", "clip_vision", "vae")
    reference_encoders = ("clip_vision", "vae")
    smoke_preset = "tiny"
    canvas_colour = (0, 0, 0)  # spec section 5: black letterbox
    letterbox_upscales = False  # spec section 5: references are never upscaled
    needs_video_condition = True
    sigma_sampling = "shifted"  # spec section 12

    def defaults(self) -> dict[str, Any]:
        return dict(negative_prompt=C.DEFAULT_NEGATIVE_PROMPT, width=C.DEFAULT_WIDTH, height=C.DEFAULT_HEIGHT,
                    num_frames=C.DEFAULT_FRAMES, steps=C.DEFAULT_STEPS, guidance=C.DEFAULT_GUIDANCE,
                    shift=C.DEFAULT_SHIFT, sampler=C.DEFAULT_SAMPLER, fps=C.DEFAULT_FPS)

    def slot_frames(self, config: Any) -> int:
        return C.NUM_REF_SLOTS

    def reference_vae_chunks(self, count: int, num_frames: int) -> int:
        return count + C.latent_frames(num_frames)  # one per reference, then the video condition's

    # ------------------------------------------------------------------------------ references
    def prepare_references(self, images: Any, width: int, height: int, masks: Any = None,
                           mask_mode: str = "rectangle") -> tuple[torch.Tensor, torch.Tensor]:
        return prepare_references(images, width, height, masks=masks, mask_mode=mask_mode)

    def encode_canvases(self, host: ReferenceHost, canvases: torch.Tensor, pixel_masks: torch.Tensor,
                        settings: Any) -> ReferenceCondition:
        """CLIP tokens + temporal slots of the black-letterboxed references, and the video condition."""

        def encode() -> dict[str, torch.Tensor]:
            with host.on_device("clip_vision") as clip:
                clip_tokens = clip.encode_references(canvases, settings.clip_resize_antialias)
                check_finite(clip_tokens, stage="CLIP vision tokens", model="the CLIP vision encoder (ViT-H/14)",
                             dtype=model_dtype(clip))
            with host.on_device("vae") as vae:
                slots = vae.reference_slots(canvases, pixel_masks)
                video = host.video_condition(vae, settings)
            return {"clip_tokens": clip_tokens, "slots": slots, "video_condition": video}

        out = host.cached("references", ("clip_vision", "vae"), {
            "canvases": tensor_digest(canvases), "masks": tensor_digest(pixel_masks),
            "frames": settings.condition_frames,
            "tiling": host.vae_tiling_active(),
            "clip": {k: v for k, v in settings.to_dict().items() if k.startswith("clip_")}}, encode)
        return ReferenceCondition(clip_tokens=out["clip_tokens"], slots=out["slots"], canvases=canvases,
                                  masks=pixel_masks, family=BindWeaveFamily.name,
                                  video_condition=out["video_condition"])

    def branches(self, text: TextStates, planner: PlannerStates | None,
                 refs: ReferenceCondition) -> tuple[DiTBranch, DiTBranch]:
        """Guidance on text and planner: both branches share the CLIP tokens and the VAE condition."""
        condition = vae_condition(refs.slots, refs.video_condition)
        contract = self.contract(refs)
        cond = DiTBranch(text.positive, planner.positive if planner else None, refs.clip_tokens, condition,
                         contract=contract)
        uncond = DiTBranch(text.negative, planner.negative if planner else None, refs.clip_tokens, condition,
                           contract=contract)
        return cond, uncond

    # ------------------------------------------------------------------------------ training
    def training_sigmas(self, batch: int, generator: torch.Generator, shift: float,
                        latent_size: tuple[int, int] | None) -> torch.Tensor:
        """Spec section 12: the shifted schedule over ``u ~ U(0, 1)`` (drawn in float64)."""
        return shifted_sigmas(torch.rand(batch, generator=generator, dtype=torch.float64), shift).float()

    def cache_variant(self, images: list, masks: list, bucket: tuple[int, int], mask_mode: str) -> dict[str, Any]:
        canvases, pixel_masks = self.prepare_references(images, bucket[0], bucket[1], masks, mask_mode)
        return {"images": images, "mask_images": masks, "canvases": canvases, "masks": pixel_masks}

    def cache_reference_tensors(self, vae: Any, variant: dict[str, Any], bucket: tuple[int, int],
                                mask_mode: str) -> dict[str, torch.Tensor]:
        return {"slots": vae.reference_slots(variant["canvases"], variant["masks"]).cpu()}


class PlainWanFamily(BindWeaveFamily):
    """Wan2.1 without the connector: BindWeave's references and settings, no planner needed, not trained
    on reference slots (so not trainable with them, and their frames are not counted in the estimate)."""

    trained_for_references = False
    requires_planner = False

    def slot_frames(self, config: Any) -> int:
        return 0


class WanI2VFamily(PlainWanFamily):
    name = "wan-i2v"


class WanT2VFamily(PlainWanFamily):
    name = "wan-t2v"
