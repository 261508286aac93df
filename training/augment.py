"""Reference augmentation against copy-paste (spec section 12): random rotation and scale.

Applied to the reference image *before* the letterbox, so every encoder that sees a reference (the
planner, CLIP and the VAE slots) sees the same augmented image. The image is rotated about its
centre (canvas grown to fit, the new corners in the canvas colour / transparent), then scaled so
that it covers ``s`` times the size the plain letterbox would give it (``s < 1``: a smaller
subject on the canvas). The mask follows the same transform: the new corners and borders are
outside the subject.

Because features are cached, augmentation happens at cache time: each sample gets
``augment.variants`` cached variants, variant 0 unaugmented (exactly what inference sees) and the
others drawn from a generator seeded by (augment seed, sample, variant); each training step picks
one variant at random. Changing any augmentation setting changes the cache key.
"""

from __future__ import annotations

import random

from PIL import Image

from bindweave_core.references import placement_for


def augment_reference(image: Image.Image, mask: Image.Image | None, canvas: tuple[int, int], rng: random.Random,
                      rotation: float, scale: tuple[float, float], *, background: tuple[int, int, int] = (0, 0, 0),
                      letterbox_upscales: bool = False) -> tuple[Image.Image, Image.Image]:
    """One random rotation + scale of ``image`` (and its ``L`` mask, or the whole image when None).

    ``background`` fills the rotated corners (the canvas colour). BindWeave's letterbox never
    upscales, so the image is shrunk to ``s`` times its letterboxed size; Kaleido's letterbox fits the
    image to the canvas (``letterbox_upscales``), so the image is padded to ``1/s`` of its size instead.
    Returns the augmented image (RGB, or RGBA when it had alpha) and its ``L`` mask.
    """
    angle = rng.uniform(-rotation, rotation) if rotation > 0 else 0.0
    factor = rng.uniform(*scale)
    rgba = "A" in image.getbands()
    image = image.convert("RGBA" if rgba else "RGB")
    mask = mask.convert("L") if mask is not None else Image.new("L", image.size, 255)
    fill = (*background, 0) if rgba else background
    if angle:
        image = image.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True, fillcolor=fill)
        mask = mask.rotate(angle, resample=Image.Resampling.BILINEAR, expand=True, fillcolor=0)
    if letterbox_upscales:
        size = (max(image.size[0], round(image.size[0] / factor)), max(image.size[1], round(image.size[1] / factor)))
        if size != image.size:
            offset = ((size[0] - image.size[0]) // 2, (size[1] - image.size[1]) // 2)
            padded, padded_mask = Image.new(image.mode, size, fill), Image.new("L", size, 0)
            padded.paste(image, offset)
            padded_mask.paste(mask, offset)
            image, mask = padded, padded_mask
        return image, mask
    base = placement_for(image.size, *canvas).scale  # what the letterbox would do
    size = (max(1, int(image.size[0] * base * factor)), max(1, int(image.size[1] * base * factor)))
    if size != image.size:
        image = image.resize(size, Image.Resampling.LANCZOS)
        mask = mask.resize(size, Image.Resampling.BILINEAR)
    return image, mask


def variant_rng(seed: int, sample_key: str, variant: int) -> random.Random:
    """The generator of one cached variant (independent of every other sample and variant)."""
    return random.Random(f"bindweave-augment:{seed}:{sample_key}:{variant}")
