"""Conversions between ComfyUI's tensors and the core library's inputs (no ComfyUI import)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from bindweave_core import constants as C
from bindweave_core.conditioning import VideoGeometry
from bindweave_core.errors import InputError
from bindweave_core.setting_bounds import check_reference_count


def _frames(batch: torch.Tensor, what: str) -> list[torch.Tensor]:
    if batch.ndim == 3 and what == "mask":
        return [batch[i] for i in range(batch.shape[0])]
    if batch.ndim == 2 and what == "mask":
        return [batch]
    if batch.ndim == 4 and what == "image":
        return [batch[i] for i in range(batch.shape[0])]
    if batch.ndim == 3 and what == "image":
        return [batch]
    raise InputError(f"unexpected {what} tensor of shape {tuple(batch.shape)}")


def collect_references(images: Sequence[torch.Tensor | None], masks: Sequence[torch.Tensor | None] = (),
                       invert_masks: bool = True, max_references: int = C.MAX_REFERENCES):
    """ComfyUI ``image_1..4`` / ``mask_1..4`` inputs -> ``(images [H, W, C] list, masks list or None)``.

    A batched IMAGE counts as several references, in order. A mask input applies to the image input
    of the same number (one mask per frame of the batch, or one mask for all of them). ComfyUI's
    Load Image gives MASK = 1 where the picture is transparent, so ``invert_masks`` (default) turns it
    into the subject mask the core expects (1 = subject).
    """
    refs: list[torch.Tensor] = []
    ref_masks: list[torch.Tensor | None] = []
    masks = list(masks) + [None] * (len(images) - len(masks))
    for k, (image, mask) in enumerate(zip(images, masks), start=1):
        if image is None:
            if mask is not None:
                raise InputError(f"mask_{k} is connected but image_{k} is not: connect the image it belongs to.")
            continue
        frames = _frames(image, "image")
        mask_frames: list[torch.Tensor | None] = [None] * len(frames)
        if mask is not None:
            given = _frames(mask, "mask")
            if len(given) not in (1, len(frames)):
                raise InputError(f"mask_{k} has {len(given)} masks for {len(frames)} images in image_{k}: give one "
                                 "mask per image, or a single mask for all.")
            mask_frames = [(1.0 - m if invert_masks else m) for m in (given * len(frames))[: len(frames)]]
        refs.extend(frames)
        ref_masks.extend(mask_frames)
    check_reference_count(len(refs), max_references, hint="Connect at least image_1, and disconnect the extra images.")
    return refs, (ref_masks if any(m is not None for m in ref_masks) else None)


@dataclass(frozen=True)
class ReferenceImages:
    """The 1-4 references wired once (BindWeave References): images ``[H, W, C]`` in order, and their subject
    masks (1 = subject) or None. Planner Encode and Reference Encode both read this one value."""

    images: tuple[torch.Tensor, ...]
    masks: tuple[torch.Tensor | None, ...] | None


def wired_references(wired: ReferenceImages | None, images: Sequence[torch.Tensor | None],
                     masks: Sequence[torch.Tensor | None] = (), invert_masks: bool = True,
                     max_references: int = C.MAX_REFERENCES):
    """``(images, masks)`` from a BindWeave References output, or from the older per-node ``image_k`` /
    ``mask_k`` sockets (graphs saved before it); both at once would be two lists that can disagree."""
    direct = [k for k, t in enumerate(list(images) + list(masks)) if t is not None]
    if wired is None:
        if not direct:
            raise InputError("no reference images: connect BindWeave References to reference_images.")
        return collect_references(images, masks, invert_masks=invert_masks, max_references=max_references)
    if direct:
        raise InputError("reference_images (BindWeave References) and image/mask sockets are both connected: keep "
                         "only BindWeave References, so the planner and the reference encoding see the same images.")
    if not 1 <= len(wired.images) <= max_references:
        raise InputError(f"{len(wired.images)} reference images connected; this model takes 1 to {max_references}. "
                         "Remove the extra images from BindWeave References.")
    return list(wired.images), (list(wired.masks) if wired.masks is not None else None)


# ComfyUI keeps LATENT samples in the VAE's raw space (a model's latent format normalises them on the
# way in); the DiT works on normalised latents ``(raw - mean) / std``. Reference Encode records the
# VAE's statistics with the references; without them the Wan 2.1 VAE's apply (ComfyUI's Wan21 format).
def latent_stats(recorded: Mapping[str, Any] | VideoGeometry | None = None) -> tuple[list[float], list[float]]:
    """``(mean, std)``: those recorded (a Reference Encode geometry, or a dict), else the Wan 2.1 VAE's."""
    from bindweave_core.encoders.vae import WAN21_VAE_CONFIG

    given = vars(recorded) if isinstance(recorded, VideoGeometry) else recorded or {}
    mean, std = given.get("latents_mean"), given.get("latents_std")
    return (list(WAN21_VAE_CONFIG["latents_mean"] if mean is None else mean),
            list(WAN21_VAE_CONFIG["latents_std"] if std is None else std))


def _view(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1, 1)


def latent_output(latents: torch.Tensor, mean: list[float], std: list[float]) -> dict:
    """A ComfyUI LATENT of the normalised DiT latents ``[1, 16, T, h, w]``, in the raw VAE space."""
    return {"samples": latents.float().cpu() * _view(std) + _view(mean)}


def latents_from(samples: dict) -> torch.Tensor:
    """The raw (VAE space) latents of a ComfyUI LATENT, checked to be 16-channel video latents."""
    latents = samples["samples"] if isinstance(samples, dict) else samples
    if latents.ndim != 5 or latents.shape[1] != C.LATENT_CHANNELS:
        raise InputError(f"these latents are {tuple(latents.shape)}; BindWeave Decode takes 16-channel Wan video "
                         "latents (from the BindWeave Sampler or a KSampler on the BindWeave MODEL).")
    return latents


def normalise(raw: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """Raw VAE-space latents -> the normalised latents the core's VAE decodes."""
    return (raw.float() - _view(mean).to(raw.device)) / _view(std).to(raw.device)
