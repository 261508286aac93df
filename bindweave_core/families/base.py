"""What a model family decides, asked in one place: the :class:`ModelFamily` interface.

A family is how a DiT checkpoint was trained to take its references. Names used throughout:

* ``family``: the checkpoint's family name (``bindweave``, ``wan-i2v``, ``wan-t2v``, ``kaleido``; the
  ``family`` field of :class:`~bindweave_core.config.DiTConfig`);
* ``conditioning``: how the references reach the DiT: ``slots`` (CLIP tokens + 4 temporal VAE slots +
  the video condition, spec sections 6-8) or ``rrope`` (clean reference latents in front of the video
  at shifted rotary positions, docs/kaleido-rrope.md). The training option ``objective.conditioning``
  takes the same values.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, ClassVar, Protocol

import torch

from .. import constants as C
from ..conditioning import PlannerStates, ReferenceCondition, TextStates
from ..contract import ConditionContract
from ..denoiser import DiTBranch
from ..errors import InputError

# Why a DiT cannot be trained with a conditioning it was not made for (``objective.conditioning``).
_REFUSED_CONDITIONING = {
    "slots": "a {family} DiT has no reference slots; use objective.conditioning: rrope or auto.",
    "rrope": "a {family} DiT was not trained for R-RoPE references; use slots or auto.",
}


class ReferenceHost(Protocol):
    """What a family needs from the pipeline to encode references (:class:`BindWeavePipeline` has it)."""

    def cached(self, kind: str, models: tuple[str, ...], parts: dict[str, Any],
               compute: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]: ...

    def on_device(self, name: str) -> AbstractContextManager[Any]: ...

    def video_condition(self, vae: Any, settings: Any) -> torch.Tensor: ...

    def vae_tiling_active(self) -> bool: ...


class ModelFamily(ABC):
    """One model family: its references, DiT inputs, official settings, training draw and cache needs."""

    name: ClassVar[str]
    conditioning: ClassVar[str]  # "slots" | "rrope"
    trained_for_references: ClassVar[bool] = True  # False: a base model fed references it was not trained on
    requires_planner: ClassVar[bool] = False  # a run without planner states is refused
    max_references: ClassVar[int]
    reference_model: ClassVar[str] = "this model"  # the model named in a reference-count message
    encoders: ClassVar[tuple[str, ...]]  # the models a run needs besides the DiT
    reference_encoders: ClassVar[tuple[str, ...]]  # the models that encode its references
    smoke_preset: ClassVar[str]  # the tiny DiT preset of the smoke model (config.PRESETS)
    canvas_colour: ClassVar[tuple[int, int, int]]  # the letterbox background of its references
    letterbox_upscales: ClassVar[bool]  # small references are scaled up to the frame
    needs_video_condition: ClassVar[bool]  # the all-zero video's VAE condition goes with the references
    sigma_sampling: ClassVar[str]  # the training noise draw ``objective.sigma_sampling: auto`` picks

    # ------------------------------------------------------------------------------ settings
    @abstractmethod
    def defaults(self) -> dict[str, Any]:
        """The official sampling settings, as ``GenerationSettings`` keyword arguments."""

    def check_reference_count(self, count: int) -> None:
        """1 to ``max_references`` references (``setting_bounds.check_reference_count``, named for this family)."""
        from ..setting_bounds import check_reference_count

        check_reference_count(count, self.max_references, self.reference_model)

    def check_settings(self, settings: Any) -> None:  # noqa: B027 (an optional hook: the base accepts)
        """Warnings about settings the family was not trained for (nothing is changed)."""

    def check_dit(self, config: Any, source: str, checkpoint_family: str) -> None:  # noqa: B027 (an optional hook: the base accepts)
        """Refuse a DiT (read as ``checkpoint_family``) that cannot run as this family."""

    def slot_frames(self, config: Any) -> int:
        """Reference frames in front of the video in the DiT's sequence (the memory estimate's count)."""
        return 0

    def reference_vae_chunks(self, count: int, num_frames: int) -> int:
        """VAE progress chunks of encoding ``count`` references for a ``num_frames`` video."""
        return count

    # ------------------------------------------------------------------------------ references
    @abstractmethod
    def prepare_references(self, images: Any, width: int, height: int, masks: Any = None,
                           mask_mode: str = "rectangle") -> tuple[torch.Tensor, torch.Tensor]:
        """``(canvases [n, H, W, 3] in 0..1, masks [n, H, W])``: the letterboxed references."""

    def encode_references(self, host: ReferenceHost, images: list, settings: Any,
                          masks: list | None = None) -> ReferenceCondition:
        """The references as this family's DiT takes them: letterboxed for the video of ``settings``, then
        encoded (through the host's condition cache)."""
        canvases, pixel_masks = self.prepare_references(images, settings.width, settings.height, masks,
                                                        settings.mask_mode)
        return self.encode_canvases(host, canvases, pixel_masks, settings)

    @abstractmethod
    def encode_canvases(self, host: ReferenceHost, canvases: torch.Tensor, pixel_masks: torch.Tensor,
                        settings: Any) -> ReferenceCondition:
        """The letterboxed references (:meth:`prepare_references`) encoded for the DiT."""

    def contract(self, refs: ReferenceCondition) -> ConditionContract | None:
        """What ``refs`` were encoded for (family, slots, frames, size), or None without a recorded geometry."""
        if refs.geometry is None:
            return None
        return ConditionContract(family=refs.family, conditioning=self.conditioning,
                                 in_channels=C.LATENT_CHANNELS + (C.CONDITION_CHANNELS if self.needs_video_condition else 0),
                                 slots=0 if refs.slots is None else int(refs.slots.shape[2]),
                                 references=refs.num_references,
                                 latent_frames=C.latent_frames(refs.geometry.num_frames),
                                 width=refs.geometry.width, height=refs.geometry.height)

    @abstractmethod
    def branches(self, text: TextStates, planner: PlannerStates | None,
                 refs: ReferenceCondition) -> tuple[DiTBranch, DiTBranch]:
        """The conditional and unconditional DiT inputs of classifier-free guidance."""

    # ------------------------------------------------------------------------------ training
    def check_training_conditioning(self, mode: str) -> None:
        """Refuse training with a built-in conditioning this DiT was not trained for."""
        if mode in _REFUSED_CONDITIONING and (mode != self.conditioning or not self.trained_for_references):
            raise InputError(_REFUSED_CONDITIONING[mode].format(family=self.name))

    @abstractmethod
    def training_sigmas(self, batch: int, generator: torch.Generator, shift: float,
                        latent_size: tuple[int, int] | None) -> torch.Tensor:
        """Noise levels ``[B]`` float32 of this family's training draw (``sigma_sampling``)."""

    @abstractmethod
    def cache_variant(self, images: list, masks: list, bucket: tuple[int, int], mask_mode: str) -> dict[str, Any]:
        """What the training cache keeps of one reference variant before the encoders run."""

    @abstractmethod
    def cache_reference_tensors(self, vae: Any, variant: dict[str, Any], bucket: tuple[int, int],
                                mask_mode: str) -> dict[str, torch.Tensor]:
        """The VAE tensors the training cache stores for one reference variant."""
