"""Reading image files and bringing every PIL mode to 8-bit RGB (or RGBA, keeping the alpha).

One place for inference (references, planner) and training: PIL's own ``convert("RGB")`` clips
16-bit and 32-bit pixel values at 255 (a 16-bit PNG becomes almost all white) and closes the
file before an animated image's frame is read. Here:

* 16-bit grey (``I;16``, ``I;16B``, ``I;16L``, ``I;16N``) is scaled by 1/257 (65535 -> 255);
* ``I`` (32-bit integers) holding values above 255 is read as 16-bit (PNG/TIFF 16-bit in older
  Pillow versions) and scaled by 1/257, otherwise taken as 8-bit; ``F`` (floats) holding values up
  to 1 is scaled by 255, up to 255 taken as is, above that read as 16-bit; negatives become 0;
* ``LA``, ``La``, ``PA`` and palette images with transparency become ``RGBA`` (the caller decides
  what the alpha means: the default reference path drops it like the official code);
* ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``, ``1``, ``L``, ``P`` and ``RGBX`` go through PIL's own
  conversion (no ICC profile is applied, as in the official code);
* an animated image gives its first frame, with a logged note;
* the EXIF orientation tag is applied (``ImageOps.exif_transpose``, before the mode conversion), exactly
  as ComfyUI's LoadImage and LoadImageMask do, so the CLI, the Python API, training and the nodes see the
  same picture. The official code did not apply it (docs/fidelity.md); it matters only for images that
  carry an orientation other than 1 (phone photos).

16-bit RGB(A) PNGs are already reduced to 8 bits by Pillow's decoder (high byte).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InputError

log = logging.getLogger("BindWeave")

SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
ALPHA_MODES = ("RGBA", "LA", "La", "PA", "RGBa")
EIGHT_BIT_SCALE = 257  # 65535 / 255: 16-bit -> 8-bit
ORIENTATION_TAG = 0x0112  # EXIF "Orientation"


def has_alpha(image: Image.Image) -> bool:
    """Whether the image carries transparency (an alpha channel, or a palette/grey transparent colour)."""
    return image.mode in ALPHA_MODES or "transparency" in image.info


def _grey_to_uint8(values: np.ndarray, mode: str, name: str) -> np.ndarray:
    """16/32-bit integer or float grey values -> uint8, by the rules in the module docstring."""
    values = values.astype(np.float64)
    finite = values[np.isfinite(values)]
    top = float(finite.max()) if finite.size else 0.0
    if mode in SIXTEEN_BIT_MODES:
        scale = 1 / EIGHT_BIT_SCALE
    elif mode == "F" and top <= 1.0:
        scale = 255.0
        log.info("%s: float (F) image with values up to %.3g, read as 0..1", name, top)
    elif top <= 255:
        scale = 1.0
        if mode != "L":
            log.info("%s: %s image with values up to %g, read as 8-bit", name, mode, top)
    else:
        scale = 1 / EIGHT_BIT_SCALE
        if mode not in SIXTEEN_BIT_MODES:
            log.info("%s: %s image with values up to %g, read as 16-bit (scaled by 1/257)", name, mode, top)
    out = np.nan_to_num(values * scale, nan=0.0, posinf=255.0, neginf=0.0)
    return np.clip(np.floor(out + 0.5), 0, 255).astype(np.uint8)


def to_8bit(image: Image.Image, name: str = "image") -> Image.Image:
    """The image as 8-bit ``RGB``, or ``RGBA`` when it carries transparency (see the module docstring)."""
    mode = image.mode
    if mode in ("RGB", "RGBA"):
        return image
    if mode in SIXTEEN_BIT_MODES or mode in ("I", "F"):
        grey = _grey_to_uint8(np.asarray(image), mode, name)
        rgb = Image.fromarray(grey).convert("RGB")  # uint8 [H, W] -> L -> RGB
        if "transparency" in image.info:  # a transparent grey value (tRNS): becomes a 0/255 alpha
            alpha = np.where(np.asarray(image) == image.info["transparency"], 0, 255).astype(np.uint8)
            rgb.putalpha(Image.fromarray(alpha))
        return rgb
    if mode == "La":
        image = image.convert("LA")  # premultiplied grey: PIL cannot convert it to RGBA directly
    if has_alpha(image):
        return image.convert("RGBA")
    return image.convert("RGB")


def upright_image(image: Image.Image, name: str = "image") -> Image.Image:
    """The image turned as its EXIF orientation tag says (ComfyUI's LoadImage does the same); unchanged
    pixels when there is no tag or it is 1."""
    orientation = image.getexif().get(ORIENTATION_TAG, 1)
    if orientation in (None, 1):
        return image
    log.info("%s: EXIF orientation %s applied (as ComfyUI's LoadImage does)", name, orientation)
    return ImageOps.exif_transpose(image)


def open_image(path: str | os.PathLike | bytes, what: str = "image") -> Image.Image:
    """Read an image file by its content (the extension is not trusted), fully decoded, as 8-bit
    ``RGB`` or ``RGBA`` (:func:`to_8bit`). Animated images give their first frame (logged)."""
    p = Path(os.fsdecode(path))
    if not p.exists():
        raise InputError(f"{what} not found: {p}. Check the path.")
    if p.is_dir():
        raise InputError(f"{what} path is a directory, not an image file: {p}")
    try:
        with Image.open(p) as im:
            frames = getattr(im, "n_frames", 1)
            if frames > 1:
                im.seek(0)
                log.warning("%s has %d frames; using the first one", p, frames)
            im.load()  # decode now: a truncated file fails here, not later
            upright = upright_image(im, str(p))
            out = to_8bit(upright, str(p)).copy()  # a copy: the frame must not depend on the closed file
            out.format = im.format  # what the content is (the extension is not trusted)
            return out
    except UnidentifiedImageError:
        raise InputError(f"{what} {p}: not an image file this machine can read (PIL could not identify it). "
                         "Use a PNG, JPEG or WebP image.") from None
    except PermissionError as e:
        raise InputError(f"{what} {p}: cannot read the file ({e.strerror}). Check its permissions.") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise InputError(f"{what} {p}: the image cannot be decoded ({e}). The file is probably truncated or "
                         "corrupt; re-export or re-download it.") from None


def load_rgb(source: str | os.PathLike | bytes | Image.Image) -> Image.Image:
    """A file or PIL image as 8-bit ``RGB``; an alpha channel is dropped (the RGB under it kept), as the
    official code's ``convert("RGB")`` does."""
    image = source if isinstance(source, Image.Image) else open_image(source)
    image = to_8bit(image)
    return image if image.mode == "RGB" else image.convert("RGB")
