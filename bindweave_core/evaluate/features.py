"""Image features for the similarity metrics: CLIP (our ViT-H/14 loader) and optionally DINOv2.

CLIP: every image (frame, crop or reference) is squashed to 224 x 224 (no crop; bilinear with antialiasing,
half-pixel centres), normalised with CLIP's mean/std, and the feature is the class token after the tower's
final LayerNorm (transformers' ``pooler_output``, 1280 values for ViT-H). It is not multiplied by
``visual_projection`` (our loader does not load it: BindWeave uses the penultimate states), so the numbers are
not the CLIP-I of papers that use the projected 1024-d embedding, though they measure the same thing.
DINOv2: a transformers checkpoint folder (``Dinov2Model``); images squashed to 224 x 224 the same way,
normalised with ImageNet's mean/std; the feature is the class token after the final LayerNorm.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError

log = logging.getLogger("BindWeave")

FEATURE_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BATCH = 8
# Best-matching region: the whole frame, then half-width x half-height crops on a 3 x 3 grid (offsets 0,
# 1/4 and 1/2 of the frame), i.e. 10 CLIP passes per frame instead of 1.
REGION_OFFSETS = (0.0, 0.25, 0.5)
REGION_SIZE = 0.5
CLIP_PREPROCESSING = ("squashed to 224 x 224 (no crop), bilinear with antialiasing, CLIP mean/std; feature = "
                      "class token after the final LayerNorm (pooler_output), no visual projection")
DINO_PREPROCESSING = ("squashed to 224 x 224 (no crop), bilinear with antialiasing, ImageNet mean/std; feature = "
                      "class token after the final LayerNorm (pooler_output)")


def squash(images: torch.Tensor, size: int = FEATURE_SIZE) -> torch.Tensor:
    """``[n, H, W, 3]`` uint8 (or float 0..1) -> ``[n, 3, size, size]`` float in 0..1, the resize every
    similarity metric applies (bilinear, antialiased, half-pixel centres; a no-op at ``size`` x ``size``)."""
    x = images.permute(0, 3, 1, 2)
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x


def clip_features(encoder: Any, images: torch.Tensor) -> torch.Tensor:
    """``[n, H, W, 3]`` -> ``[n, D]`` float32 CLIP features (see the module docstring), on the CPU."""
    out = []
    with torch.no_grad():
        for start in range(0, images.shape[0], BATCH):
            x = squash(images[start:start + BATCH]).permute(0, 2, 3, 1)  # already 224: preprocess only normalises
            pixels = encoder.preprocess(x, antialias=True).to(encoder.dtype)
            out.append(encoder.model(pixel_values=pixels).pooler_output.float().cpu())
    return torch.cat(out)


def region_boxes(height: int, width: int) -> list[tuple[int, int, int, int]]:
    """``(x0, y0, x1, y1)`` of the whole frame and the half-size crops searched for the best match."""
    h, w = max(1, round(height * REGION_SIZE)), max(1, round(width * REGION_SIZE))
    boxes = [(0, 0, width, height)]
    for fy in REGION_OFFSETS:
        for fx in REGION_OFFSETS:
            x0, y0 = min(round(width * fx), width - w), min(round(height * fy), height - h)
            boxes.append((x0, y0, x0 + w, y0 + h))
    return boxes


def region_features(encoder: Any, frames: torch.Tensor) -> tuple[torch.Tensor, list]:
    """``[n, R, D]`` CLIP features of every region of every frame, and the regions' boxes."""
    boxes = region_boxes(frames.shape[1], frames.shape[2])
    crops = [clip_features(encoder, frames[:, y0:y1, x0:x1]) for x0, y0, x1, y1 in boxes]
    return torch.stack(crops, 1), boxes


def check_dino_dir(path: str | Path) -> Path:
    """A DINOv2 transformers checkpoint folder, checked from its config.json (before anything loads)."""
    p = Path(path)
    config = p / "config.json"
    if not p.is_dir() or not config.is_file():
        raise InputError(f"DINOv2 checkpoint {p}: not a folder with a config.json. Give the folder of a transformers "
                         "DINOv2 model (e.g. a download of facebook/dinov2-base), or leave it out to skip DINO-I.")
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError) as e:
        raise InputError(f"{config}: unreadable ({e}); download the checkpoint again.") from None
    if model_type != "dinov2":
        raise InputError(f"{p}: a {model_type!r} checkpoint, not DINOv2 (config.json model_type must be 'dinov2').")
    return p


def load_dino(path: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    from transformers import Dinov2Model

    model = Dinov2Model.from_pretrained(str(check_dino_dir(path))).to(device).eval().requires_grad_(False)
    log.info("loaded DINOv2 (%d layers, width %d) from %s", model.config.num_hidden_layers,
             model.config.hidden_size, path)
    return model


def dino_features(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """``[n, H, W, 3]`` -> ``[n, D]`` float32 DINOv2 class-token features, on the CPU."""
    param = next(model.parameters())
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    out = []
    with torch.no_grad():
        for start in range(0, images.shape[0], BATCH):
            x = (squash(images[start:start + BATCH]) - mean) / std
            out.append(model(pixel_values=x.to(param.device, param.dtype)).pooler_output.float().cpu())
    return torch.cat(out)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of ``[..., D]`` rows, broadcast (float64 arithmetic)."""
    return F.cosine_similarity(a.double(), b.double(), dim=-1).float()


def reference_tensor(image: Any) -> torch.Tensor:
    """An image file, a PIL image or ``[H, W, 3]`` array/tensor -> ``[1, H, W, 3]`` uint8 (an alpha channel
    is dropped, as generation's ``convert("RGB")`` does)."""
    if isinstance(image, (str, bytes)) or hasattr(image, "__fspath__"):
        from ..images import open_image

        image = open_image(image, "reference image")
    if hasattr(image, "convert"):
        from ..images import load_rgb

        image = np.asarray(load_rgb(image))
    t = torch.as_tensor(np.array(image) if isinstance(image, np.ndarray) else image)  # a copy: may be read-only
    if t.is_floating_point():
        t = (t.clamp(0, 1) * 255).round().to(torch.uint8)
    while t.ndim > 3 and t.shape[0] == 1:
        t = t[0]
    if t.ndim != 3 or t.shape[-1] not in (3, 4):
        raise InputError(f"a reference image must be [H, W, 3], got shape {list(t.shape)}")
    return t[..., :3].unsqueeze(0).contiguous()
