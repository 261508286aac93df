"""The planner's disk cache of hidden states (superseded by ``condition_cache``; kept for old cache folders)."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch
from PIL import Image

from ..conditioning import PlannerStates
from .planner_checkpoint import json_hash
from .planner_inputs import as_rgb

log = logging.getLogger("BindWeave")

# ------------------------------------------------------------------------------------ disk cache
def image_digest(image: Image.Image) -> str:
    """sha256 of an image's RGB pixels and size (what the planner sees before its resizes)."""
    rgb = as_rgb(image)
    h = hashlib.sha256(f"{rgb.size[0]}x{rgb.size[1]}:".encode())
    h.update(rgb.tobytes())
    return h.hexdigest()


class PlannerCache:
    """Planner states on disk, one safetensors file per (model, prompt, negative prompt, images)."""

    VERSION = 1  # bump when the planner's preprocessing changes

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)

    def key(self, identity: str, prompt: str, negative_prompt: str, images: list[Image.Image]) -> str:
        return json_hash({"v": self.VERSION, "model": identity, "prompt": prompt, "negative_prompt": negative_prompt,
                      "images": [image_digest(im) for im in images]})

    def path(self, key: str) -> Path:
        return self.directory / f"planner-{key[:40]}.safetensors"

    def load(self, key: str, device: str | torch.device | None = None,
             dtype: torch.dtype | None = None) -> PlannerStates | None:
        from safetensors import SafetensorError, safe_open

        p = self.path(key)
        if not p.exists():
            return None
        try:
            with safe_open(str(p), framework="pt") as f:
                if (f.metadata() or {}).get("key") != key:
                    return None
                pos, neg = f.get_tensor("positive"), f.get_tensor("negative")
        except (SafetensorError, OSError, KeyError) as e:
            log.warning("ignoring unreadable planner cache file %s (%s)", p, e)
            return None
        log.info("planner states from cache %s", p.name)
        return PlannerStates(positive=pos.to(device=device, dtype=dtype), negative=neg.to(device=device, dtype=dtype))

    def store(self, key: str, states: PlannerStates, info: dict[str, str] | None = None) -> Path:
        from ..checkpoints.writers import atomic_save_file

        meta = {"key": key, **{k: str(v) for k, v in (info or {}).items()}}
        tensors = {"positive": states.positive.detach().cpu().contiguous(),
                   "negative": states.negative.detach().cpu().contiguous()}
        return atomic_save_file(tensors, self.path(key), metadata=meta)
