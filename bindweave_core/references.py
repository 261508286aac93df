"""Reference images: reading them, and the letterbox + mask of spec section 5.

Default path (what the released weights were used with, matching the official inference code):
the image is opened by content, converted to RGB (an alpha channel is dropped, the RGB under it
kept), scaled by ``s = min(W/w0, H/h0, 1)`` with LANCZOS to ``(int(w0*s), int(h0*s))`` and pasted
on a black ``W x H`` canvas at ``((W-w')//2, (H-h')//2)``. The mask is 1 on the pasted rectangle,
0 elsewhere (the official code builds it as an 8-bit ``L`` image, stores it as the alpha channel
and thresholds ``> 127``, which gives exactly the rectangle). No ICC conversion is applied, as in the
official code. The EXIF orientation tag *is* applied (as ComfyUI's LoadImage does; the official code
did not, see docs/fidelity.md), so a file read here and by the ComfyUI nodes gives the same picture.

Non-default subject/background separation (explicit options, never applied silently):

* ``mask_mode="alpha"``: for an RGBA cut-out the mask is its alpha channel. The RGB is first
  composited on black (the canvas colour), so the colours hidden under transparent pixels, which
  cut-out tools leave undefined, never reach the model; the alpha is letterboxed like the image
  (LANCZOS, same placement) and thresholded ``> 127``. An image without alpha is fully opaque,
  so its mask is the rectangle.
* ``masks=[...]``: a user mask per reference (PIL image, numpy array or tensor, the size of the
  reference, 1/white = subject), letterboxed the same way and thresholded ``> 127``. It changes
  the mask only; the RGB is letterboxed as in the default path. Combined with ``alpha`` mode the
  two masks are intersected.

Outside the pasted rectangle the mask is always 0.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from . import constants as C
from .errors import InputError
from .images import open_image, to_8bit
from .setting_bounds import check_reference_count

log = logging.getLogger("BindWeave")

MASK_MODES = C.MASK_MODES
MASK_THRESHOLD = 127  # official: alpha > 127 counts as inside
CANVAS_COLOUR = (0, 0, 0)
UNIT_TOLERANCE = 0.5 / 255  # half an 8-bit step: within it, clamping and rounding give the same 8-bit value

ReferenceImage = Image.Image | str | os.PathLike | torch.Tensor | np.ndarray
ReferenceMask = Image.Image | torch.Tensor | np.ndarray | None


@dataclass(frozen=True)
class Placement:
    """Where a reference landed on its canvas."""

    scale: float  # s = min(W/w0, H/h0, 1)
    width: int  # pasted size w', h'
    height: int
    left: int  # offset of the pasted rectangle
    top: int
    canvas_width: int
    canvas_height: int

    @property
    def box(self) -> tuple[int, int, int, int]:
        """``(left, top, right, bottom)`` of the pasted rectangle, right/bottom exclusive."""
        return self.left, self.top, self.left + self.width, self.top + self.height


# ------------------------------------------------------------------------------------------ reading
def load_image(path: str | os.PathLike | bytes) -> Image.Image:
    """Read an image file by its content (the extension is not trusted), fully decoded, as 8-bit RGB,
    or RGBA when it carries transparency (so the caller can use the alpha). Every PIL mode (16-bit,
    float, CMYK, ...) is converted by :func:`bindweave_core.images.to_8bit`; animated images give their
    first frame (logged)."""
    return open_image(path, "reference image")


def check_unit_range(t: torch.Tensor, what: str) -> None:
    """A float image or mask tensor holds finite values in 0..1 (ComfyUI's IMAGE and MASK); values less than
    half an 8-bit step outside (rounding noise, which rounds to 0 or 255 anyway) pass. Anything else is
    refused: rescaling a 0..255 tensor or clamping it would be a guess (clamping made 99.5% of one white)."""
    if not torch.isfinite(t).all():
        raise InputError(f"{what} contains NaN or infinite values.")
    if t.numel() == 0:
        return
    lo, hi = float(t.min()), float(t.max())
    if lo < -UNIT_TOLERANCE or hi > 1 + UNIT_TOLERANCE:
        hint = (" It looks like 0..255: divide it by 255 (or pass it as uint8)." if hi > 2 and lo >= 0
                else " Clamp it to 0..1 (or rescale it) yourself, as the intended picture needs.")
        raise InputError(f"{what} holds values from {lo:g} to {hi:g}; float image tensors must hold 0..1 (like "
                         f"ComfyUI's IMAGE and MASK). It is refused, not rescaled or clamped.{hint}")


def tensor_to_pil(image: torch.Tensor | np.ndarray) -> Image.Image:
    """A ComfyUI-style image ``[H, W, 3|4]`` (or ``[1, H, W, C]``) to PIL.

    Floats must hold 0..1 (ComfyUI's IMAGE) and are turned into 8-bit with round-half-up, so a tensor
    made from a PNG (``uint8 / 255``) gives back exactly that PNG; a float tensor outside 0..1 (e.g. a
    0..255 one) is refused, never rescaled or clamped (:func:`check_unit_range`). ``uint8`` arrays are
    taken as they are.
    """
    t = torch.as_tensor(np.array(image) if isinstance(image, np.ndarray) else image).detach().cpu()
    while t.ndim > 3 and t.shape[0] == 1:
        t = t[0]
    if t.ndim != 3 or t.shape[-1] not in (3, 4):
        hint = (" It looks channels-first ([C, H, W]): permute it to [H, W, C]."
                if t.ndim == 3 and t.shape[0] in (3, 4) else "")
        raise InputError(f"an image tensor must be [H, W, 3] or [H, W, 4] (channels last, like ComfyUI's IMAGE); "
                         f"got shape {list(t.shape)}.{hint}")
    if t.dtype == torch.uint8:
        array = t.numpy()
    elif t.is_floating_point():
        check_unit_range(t, "the image tensor")
        array = torch.floor(t.double().clamp(0.0, 1.0) * 255.0 + 0.5).to(torch.uint8).numpy()
    else:
        raise InputError(f"image tensors must be float in 0..1 or uint8, got {t.dtype}.")
    return Image.fromarray(np.ascontiguousarray(array))  # uint8 [H, W, 3|4]: RGB or RGBA


def _as_pil(image: ReferenceImage, index: int) -> Image.Image:
    if isinstance(image, Image.Image):
        return to_8bit(image, f"reference {index + 1}")
    if isinstance(image, (str, bytes)) or hasattr(image, "__fspath__"):
        return load_image(image)
    if isinstance(image, (torch.Tensor, np.ndarray)):
        return tensor_to_pil(image)
    raise InputError(f"reference {index + 1}: expected a PIL image, a file path or an image tensor, "
                     f"got {type(image).__name__}.")


def _mask_to_l(mask: Any, size: tuple[int, int], index: int) -> Image.Image:
    """A user mask as an 8-bit ``L`` image of the reference's size (255 = subject)."""
    if isinstance(mask, (str, bytes)) or hasattr(mask, "__fspath__"):
        mask = open_image(mask, f"mask {index + 1}")
    if isinstance(mask, Image.Image):
        img = to_8bit(mask, f"mask {index + 1}").convert("L")
    else:
        t = torch.as_tensor(mask if isinstance(mask, torch.Tensor) else np.array(mask)).detach().cpu()
        while t.ndim > 2 and t.shape[0] == 1:
            t = t[0]
        if t.ndim != 2:
            raise InputError(f"mask {index + 1}: expected a 2-D mask [H, W], got shape {list(t.shape)}.")
        if t.dtype == torch.bool:
            array = t.to(torch.uint8).numpy() * 255
        elif t.is_floating_point():
            check_unit_range(t, f"mask {index + 1}")
            array = torch.floor(t.double().clamp(0.0, 1.0) * 255.0 + 0.5).to(torch.uint8).numpy()
        else:
            lo, hi = int(t.min()), int(t.max())
            if lo < 0 or hi > 255:
                raise InputError(f"mask {index + 1}: integer masks must hold 0..255 (or 0/1), got {lo}..{hi}.")
            array = (t.numpy() * (255 if hi <= 1 else 1)).astype(np.uint8)  # a 0/1 mask means subject = 1
        img = Image.fromarray(np.ascontiguousarray(array))  # uint8 [H, W]: L
    check_mask_size(img.size, size, index)
    return img


def check_reference_size(size: tuple[int, int], index: int) -> None:
    """A reference at least ``MIN_REFERENCE_SIDE`` pixels on each side (a 1x1 image is no picture of a subject)."""
    if min(size) < C.MIN_REFERENCE_SIDE:
        raise InputError(f"reference image {index + 1} is {size[0]}x{size[1]} pixels; references must be at least "
                         f"{C.MIN_REFERENCE_SIDE}x{C.MIN_REFERENCE_SIDE} (use a real picture of the subject).")


def check_reference_sizes(images: Any) -> None:
    """:func:`check_reference_size` on a user's references (PIL images or ``[..., H, W, C]`` tensors; paths are
    checked once read). Only what the user gives: training's augmented crops may be smaller."""
    for i, image in enumerate(_split_batch(images, "image")):
        if isinstance(image, Image.Image):
            check_reference_size(image.size, i)
        elif isinstance(image, (torch.Tensor, np.ndarray)) and image.ndim >= 3:
            check_reference_size((int(image.shape[-2]), int(image.shape[-3])), i)


def check_mask_size(mask_size: tuple[int, int], reference_size: tuple[int, int], index: int) -> None:
    if mask_size != reference_size:
        raise InputError(f"mask {index + 1} is {mask_size[0]}x{mask_size[1]} but its reference image is "
                         f"{reference_size[0]}x{reference_size[1]}; masks must match their image's size (they are "
                         "not resized to fit).")


# ------------------------------------------------------------------------------------------ letterbox
def placement_for(size: tuple[int, int], width: int, height: int) -> Placement:
    """Spec section 5 arithmetic for an image of ``size = (w0, h0)`` on a ``width x height`` canvas."""
    w0, h0 = size
    if width < 1 or height < 1:
        raise InputError(f"canvas size must be positive, got {width}x{height}.")
    if w0 < 1 or h0 < 1:
        raise InputError(f"reference image is empty ({w0}x{h0}).")
    s = min(width / w0, height / h0, 1.0)  # never upscaled
    new_w, new_h = int(w0 * s), int(h0 * s)
    if new_w < 1 or new_h < 1:
        raise InputError(f"a {w0}x{h0} reference is too thin for a {width}x{height} canvas: it would be "
                         f"{new_w}x{new_h} pixels after scaling. Crop it to a less extreme aspect ratio.")
    return Placement(s, new_w, new_h, (width - new_w) // 2, (height - new_h) // 2, width, height)


def _letterbox_mask(mask_l: Image.Image, placement: Placement) -> np.ndarray:
    """An ``L`` mask of the reference's size scaled and placed like the image, thresholded."""
    if mask_l.size != (placement.width, placement.height):
        mask_l = mask_l.resize((placement.width, placement.height), Image.Resampling.LANCZOS)
    out = np.zeros((placement.canvas_height, placement.canvas_width), dtype=bool)
    left, top, right, bottom = placement.box
    out[top:bottom, left:right] = np.asarray(mask_l) > MASK_THRESHOLD
    return out


def letterbox(image: Image.Image, width: int, height: int, *, mask: ReferenceMask = None,
              use_alpha: bool = False) -> tuple[Image.Image, np.ndarray, Placement]:
    """Spec section 5: the reference on a black ``width x height`` canvas, and its mask.

    Returns ``(canvas RGB, mask bool [height, width], placement)``. With the defaults the image is
    converted to RGB first (alpha dropped, as the official code does) and the mask is the pasted
    rectangle. Non-default: ``use_alpha`` composites an RGBA image on black and takes the mask from
    its alpha; ``mask`` (the reference's size, 1/white = subject) gives the mask explicitly. Both
    are letterboxed with the image's placement, thresholded ``> 127`` and limited to the rectangle.
    """
    image = to_8bit(image)  # 16-bit, float, CMYK, ... -> 8-bit RGB(A) (PIL's convert clips at 255)
    placement = placement_for(image.size, width, height)
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info)
    alpha = None
    if use_alpha and has_alpha:
        rgba = image.convert("RGBA")
        alpha = rgba.getchannel("A")
        rgb = Image.new("RGB", rgba.size, CANVAS_COLOUR)
        rgb.paste(rgba.convert("RGB"), (0, 0), alpha)  # composite on the canvas colour
    else:
        rgb = image.convert("RGB")
    resized = rgb.resize((placement.width, placement.height), Image.Resampling.LANCZOS)
    canvas = Image.new("RGB", (width, height), CANVAS_COLOUR)
    canvas.paste(resized, (placement.left, placement.top))

    out = np.zeros((height, width), dtype=bool)
    left, top, right, bottom = placement.box
    out[top:bottom, left:right] = True
    if alpha is not None:
        out &= _letterbox_mask(alpha, placement)
    if mask is not None:
        out &= _letterbox_mask(_mask_to_l(mask, image.size, 0), placement)
    return canvas, out, placement


# ------------------------------------------------------------------------------------------ batch
def check_size(width: int, height: int) -> None:
    """Width/height must be multiples of ``SIZE_MULTIPLE`` (VAE x8, then 2x2 patches)."""
    for name, value in (("width", width), ("height", height)):
        if not isinstance(value, (int, np.integer)) or value < C.SIZE_MULTIPLE or value % C.SIZE_MULTIPLE:
            try:
                lower = max(C.SIZE_MULTIPLE, int(value) // C.SIZE_MULTIPLE * C.SIZE_MULTIPLE)
                hint = f" (use {lower} or {lower + C.SIZE_MULTIPLE})"
            except (TypeError, ValueError):
                hint = ""
            raise InputError(f"{name} must be a positive multiple of {C.SIZE_MULTIPLE}, got {value!r}{hint}.")


def _split_batch(items: Any, kind: str) -> list:
    """A list of items from a list/tuple, a single item or a batched tensor ``[n, ...]``."""
    if isinstance(items, (list, tuple)):
        return list(items)
    if isinstance(items, (torch.Tensor, np.ndarray)):
        batched = items.ndim == 4 if kind == "image" else items.ndim == 3
        return list(items) if batched else [items]
    return [items]


def _check_bindweave_count(count: int) -> None:
    check_reference_count(count, C.MAX_REFERENCES, "BindWeave")


def prepare_references(images: Sequence[ReferenceImage] | torch.Tensor | ReferenceImage, width: int, height: int,
                       masks: Sequence[ReferenceMask] | torch.Tensor | None = None,
                       mask_mode: str = "rectangle", *, letterbox_fn: Callable = None,
                       check_count: Callable[[int], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Letterbox 1..``MAX_REFERENCES`` references for a ``width x height`` video.

    ``letterbox_fn`` / ``check_count`` swap in another model's letterbox and reference limit (Kaleido:
    white canvas, 1..3); the defaults are BindWeave's.

    Args:
        images: PIL images, file paths, or ComfyUI-style float tensors ``[H, W, 3|4]`` in 0..1 (a
            batch ``[n, H, W, C]`` counts as n references). Order is kept.
        masks: optional user masks, one per reference (``None`` entries allowed), each the size of
            its reference (non-default, see the module docstring).
        mask_mode: ``"rectangle"`` (default, official) or ``"alpha"`` (non-default: RGBA cut-outs).

    Returns:
        ``canvases`` ``[n, H, W, 3]`` float in 0..1 (``uint8 / 255``) and ``masks`` ``[n, H, W]``
        float in {0, 1}, on the CPU.
    """
    if mask_mode not in MASK_MODES:
        raise InputError(f"mask_mode must be one of {MASK_MODES}, got {mask_mode!r}.")
    check_size(width, height)
    letterbox_fn = letterbox_fn or letterbox
    refs = _split_batch(images, "image")
    (check_count or _check_bindweave_count)(len(refs))
    user_masks = [None] * len(refs) if masks is None else _split_batch(masks, "mask")
    if len(user_masks) != len(refs):
        raise InputError(f"{len(user_masks)} masks given for {len(refs)} reference images; give one per image "
                         "(None for the default rectangle).")

    canvases, pixel_masks = [], []
    for i, (ref, user_mask) in enumerate(zip(refs, user_masks)):
        pil = _as_pil(ref, i)
        if user_mask is not None:
            user_mask = _mask_to_l(user_mask, pil.size, i)
        if mask_mode == "rectangle" and pil.mode in ("RGBA", "LA", "PA"):
            log.info("reference %d has an alpha channel; mask_mode 'rectangle' ignores it like the official "
                     "code (use mask_mode 'alpha' to take it as the subject mask)", i + 1)
        canvas, mask, place = letterbox_fn(pil, width, height, mask=user_mask, use_alpha=mask_mode == "alpha")
        log.debug("reference %d: %dx%d -> %dx%d at (%d, %d), scale %.4f", i + 1, pil.size[0], pil.size[1],
                  place.width, place.height, place.left, place.top, place.scale)
        canvases.append(np.asarray(canvas))
        pixel_masks.append(mask)
    canvas_t = torch.from_numpy(np.stack(canvases)).float() / 255.0
    mask_t = torch.from_numpy(np.stack(pixel_masks)).float()
    return canvas_t, mask_t
