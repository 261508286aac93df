"""Kaleido (R-RoPE) conditioning: references as clean tokens in front of the video, shifted positions.

What the released Kaleido-14B-S2V weights expect, as the official code does it (sources with file
and line ranges in ``docs/kaleido-rrope.md``):

* each reference (1..3) is converted to RGB, scaled to fit the video frame (upscaled too) with
  LANCZOS and padded with white to the video size; it is VAE-encoded alone as a one-frame video and
  its normalised latent goes, **without noise**, in front of the video latents;
* reference ``i``'s patch ``(y, x)`` sits at rotary position ``(t=i, h=80+y, w=80+x)``; the video
  keeps the plain grid; all tokens share the timestep modulation and the text cross-attention; the
  reference outputs are dropped (``BindWeaveTransformer.forward(reference_latents=...)``);
* text only: UMT5 states (no CLIP, no planner); guidance 6 on the text, the unconditional branch
  keeps the same references;
* sampling: Euler over ``sigma = 7u / (1 + 6u)``, ``u = linspace(1, 0, steps + 1)``, model time
  ``1000 * sigma``, 50 steps, 896x512, 81 frames at 16 fps (``schedules.rf_sigmas``).

Also here: the same inputs for training on a Wan base (:func:`rrope_training_batch`), and the
layout of the Kaleido download (:func:`find_kaleido_bundle`). The family object that puts these
together for the pipeline, nodes and training is :class:`bindweave_core.families.kaleido.KaleidoFamily`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from . import constants as C
from .conditioning import ReferenceCondition
from .errors import CheckpointError, InputError
from .references import (
    Placement,
    ReferenceImage,
    ReferenceMask,
    _letterbox_mask,
    _mask_to_l,
    prepare_references,
)
from .setting_bounds import check_reference_count as check_references


# ------------------------------------------------------------------------------------------ references
def check_reference_count(count: int) -> None:
    """1..3 references (``setting_bounds.check_reference_count``, the one count check)."""
    check_references(count, C.KALEIDO_MAX_REFERENCES, "Kaleido-14B-S2V")


def kaleido_placement(size: tuple[int, int], width: int, height: int) -> Placement:
    """Where an image of ``size = (w0, h0)`` lands on a ``width x height`` Kaleido canvas.

    Official arithmetic (float aspect ratios, ``int()`` truncation; small images are upscaled): a
    wider-than-the-frame image gets the full width and height ``int(width / (w0/h0))``, any other
    gets the full height and width ``int(height * (w0/h0))``; the offsets are half the slack,
    rounded down.
    """
    w0, h0 = size
    if width < 1 or height < 1:
        raise InputError(f"canvas size must be positive, got {width}x{height}.")
    if w0 < 1 or h0 < 1:
        raise InputError(f"reference image is empty ({w0}x{h0}).")
    image_ratio = w0 / h0
    if image_ratio > width / height:
        new_w, new_h, scale = width, int(width / image_ratio), width / w0
    else:
        new_w, new_h, scale = int(height * image_ratio), height, height / h0
    if new_w < 1 or new_h < 1:
        raise InputError(f"a {w0}x{h0} reference is too thin for a {width}x{height} canvas: it would be "
                         f"{new_w}x{new_h} pixels after scaling. Crop it to a less extreme aspect ratio.")
    return Placement(scale, new_w, new_h, (width - new_w) // 2, (height - new_h) // 2, width, height)


def letterbox_white(image: Image.Image, width: int, height: int, *, mask: ReferenceMask = None,
                    use_alpha: bool = False) -> tuple[Image.Image, np.ndarray, Placement]:
    """The reference fitted into a white ``width x height`` canvas, and its mask.

    Default (official): RGB conversion (an alpha channel is dropped), LANCZOS resize, white padding;
    the mask is the pasted rectangle. Non-default: ``use_alpha`` (RGBA cut-outs) and/or ``mask`` (the
    reference's size, 1/white = subject) narrow the mask, and every canvas pixel outside it is made
    white, so only the subject is on the canvas.
    """
    from .images import to_8bit

    image = to_8bit(image)  # 16-bit, float, CMYK, ... -> 8-bit RGB(A) (PIL's convert clips at 255)
    placement = kaleido_placement(image.size, width, height)
    rgb = image.convert("RGB")
    resized = rgb.resize((placement.width, placement.height), Image.Resampling.LANCZOS)
    canvas = Image.new("RGB", (width, height), C.KALEIDO_CANVAS_COLOUR)
    canvas.paste(resized, (placement.left, placement.top))

    keep = np.zeros((height, width), dtype=bool)
    left, top, right, bottom = placement.box
    keep[top:bottom, left:right] = True
    narrowed = False
    if use_alpha and image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        keep &= _letterbox_mask(image.convert("RGBA").getchannel("A"), placement)
        narrowed = True
    if mask is not None:
        keep &= _letterbox_mask(_mask_to_l(mask, image.size, 0), placement)
        narrowed = True
    if narrowed:
        pixels = np.array(canvas)
        pixels[~keep] = C.KALEIDO_CANVAS_COLOUR
        canvas = Image.fromarray(pixels)
    return canvas, keep, placement


def prepare_kaleido_references(images: Sequence[ReferenceImage] | torch.Tensor | ReferenceImage, width: int,
                               height: int, masks: Sequence[ReferenceMask] | torch.Tensor | None = None,
                               mask_mode: str = "rectangle") -> tuple[torch.Tensor, torch.Tensor]:
    """Letterbox 1..3 references on white for a ``width x height`` video.

    Returns ``canvases [n, H, W, 3]`` float in 0..1 (``uint8 / 255``) and ``masks [n, H, W]`` in {0, 1}
    (the pasted rectangle, narrowed by the non-default alpha/user masks), on the CPU.
    """
    return prepare_references(images, width, height, masks, mask_mode, letterbox_fn=letterbox_white,
                              check_count=check_reference_count)


def encode_kaleido_references(vae: Any, images: Sequence[ReferenceImage] | torch.Tensor, width: int, height: int,
                              masks: Sequence[ReferenceMask] | None = None,
                              mask_mode: str = "rectangle") -> ReferenceCondition:
    """Letterbox on white and VAE-encode each reference alone: a ``ReferenceCondition`` with ``latents``."""
    canvases, pixel_masks = prepare_kaleido_references(images, width, height, masks=masks, mask_mode=mask_mode)
    latents = vae.reference_latents(canvases).cpu()  # [1, n, 16, h, w], normalised, never noised
    return ReferenceCondition(clip_tokens=None, slots=None, canvases=canvases, masks=pixel_masks, latents=latents,
                              family="kaleido")


# ------------------------------------------------------------------------------------------ DiT inputs
def check_reference_latents(reference_latents: torch.Tensor, video_shape: tuple[int, ...]) -> None:
    """References ``[B, n, 16, h, w]`` must share the video latents' batch and ``h, w``."""
    if reference_latents.ndim != 5 or reference_latents.shape[2] != C.LATENT_CHANNELS:
        raise InputError(f"reference latents must be [B, n, {C.LATENT_CHANNELS}, h, w]; got "
                         f"{list(reference_latents.shape)}.")
    b, _, _, h, w = reference_latents.shape
    if (h, w) != tuple(video_shape[-2:]) or b not in (1, video_shape[0]):
        raise InputError(f"reference latents {list(reference_latents.shape)} do not fit video latents "
                         f"{list(video_shape)}: encode the references at the video's size (letterboxed).")


def rrope_dit_inputs(noisy_latents: torch.Tensor, timestep: torch.Tensor, text_states: torch.Tensor,
                     reference_latents: torch.Tensor) -> dict[str, torch.Tensor]:
    """Keyword arguments of ``BindWeaveTransformer.forward`` for one R-RoPE call.

    ``noisy_latents [B, 16, T, h, w]``, ``timestep [B]`` (0..1000), ``text_states [B, 512, text_dim]``
    (zero past the tokens), ``reference_latents [B or 1, n, 16, h, w]`` clean. The DiT puts the
    references in front at shifted positions and returns the video velocity only.
    """
    check_reference_latents(reference_latents, tuple(noisy_latents.shape))
    if reference_latents.shape[0] != noisy_latents.shape[0]:
        reference_latents = reference_latents.expand(noisy_latents.shape[0], *reference_latents.shape[1:])
    return dict(hidden_states=noisy_latents, timestep=timestep, encoder_hidden_states=text_states,
                reference_latents=reference_latents)


def rrope_training_batch(video_latents: torch.Tensor, reference_latents: torch.Tensor, text_states: torch.Tensor,
                         noise: torch.Tensor, sigma: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Kaleido's training sample from cached pieces: ``(DiT kwargs, target)``.

    ``x_sigma = (1 - sigma) * x0 + sigma * noise`` on the video latents only (the references stay
    clean), model time ``1000 * sigma``, target velocity ``noise - x0``; the loss is the MSE between
    the DiT output (video frames only) and the target. ``sigma [B]`` in (0, 1), e.g. from
    :func:`kaleido_training_sigma`.
    """
    shape = (-1,) + (1,) * (video_latents.ndim - 1)
    s = sigma.to(torch.float32).view(shape)
    x0 = video_latents.float()
    noisy = (1 - s) * x0 + s * noise.float()
    inputs = rrope_dit_inputs(noisy, sigma.float() * C.NUM_TRAIN_TIMESTEPS, text_states, reference_latents)
    return inputs, noise.float() - x0


def kaleido_training_sigma(batch: int, latent_height: int, latent_width: int,
                           generator: torch.Generator | None = None) -> torch.Tensor:
    """The official training draw: ``sigmoid(N(0, 1))`` then the resolution-dependent shift.

    ``mu`` is linear in the patches per latent frame (``h*w/4``: 256 -> 0.5, 4096 -> 1.15) and
    ``sigma <- e^mu / (e^mu + 1/sigma - 1)``.
    """
    (x1, y1), (x2, y2) = C.KALEIDO_TRAIN_MU_POINTS
    patches = latent_height * latent_width // (C.PATCH_SIZE[1] * C.PATCH_SIZE[2])
    mu = y1 + (y2 - y1) / (x2 - x1) * (patches - x1)
    sigma = torch.sigmoid(torch.randn(batch, generator=generator))
    return math.exp(mu) / (math.exp(mu) + 1 / sigma - 1)


# ------------------------------------------------------------------------------------------ download layout
@dataclass(frozen=True)
class KaleidoBundle:
    """The files of the Kaleido-14B-S2V download (``model/``, ``Wan2.1_VAE.pth``, ``umt5-xxl/``)."""

    dit: Path
    vae: Path
    text_encoder: Path
    text_tokenizer: Path
    family: str = "kaleido"  # the family of the DiT in it (whatever layout it reads as)


def find_kaleido_bundle(root: str | os.PathLike) -> KaleidoBundle:
    """The DiT, VAE and UMT5 (+ tokenizer) inside a downloaded ``Kaleido-14B-S2V`` folder."""
    root = Path(root)
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a folder. Give the Kaleido-14B-S2V download folder (with model/, "
                              "Wan2.1_VAE.pth and umt5-xxl/).")
    vae = next((p for p in sorted(root.glob("*.pth")) if "vae" in p.name.lower()), root / "Wan2.1_VAE.pth")
    t5_dir = root / "umt5-xxl"
    t5 = next(iter(sorted(t5_dir.glob("*.pth"))), t5_dir / "models_t5_umt5-xxl-enc-bf16.pth")
    bundle = KaleidoBundle(dit=root / "model", vae=vae, text_encoder=t5, text_tokenizer=t5_dir)
    absent = [str(p) for p in (bundle.dit, bundle.vae, bundle.text_encoder) if not p.exists()]
    if absent:
        raise CheckpointError(f"{root}: missing {', '.join(absent)}. Download zai-org/Kaleido-14B-S2V completely "
                              "(and run its merge_kaleido.py), or pass --dit/--vae/--text-encoder separately.")
    return bundle
