"""The built-in smoke model: tiny random versions of all five models, built in memory.

Same classes and code paths as the real models at toy widths, so a newcomer can run the whole
pipeline on a CPU in seconds, and tests can exercise it end to end. The video it makes is noise.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import PRESETS

if TYPE_CHECKING:  # the models import torch; the defaults below are read by `generate --help`
    from .dit.transformer import BindWeaveTransformer

# Defaults for a smoke run when the user gives no size: small enough for 2 CPU cores.
SMOKE_DEFAULTS = {"width": 160, "height": 96, "num_frames": 9, "steps": 4}
SMOKE_FAMILIES = ("bindweave", "kaleido")


def smoke_dit(seed: int = 0, preset: str = "tiny") -> "BindWeaveTransformer":
    """The tiny DiT with weights drawn from ``seed`` (without touching the global RNG)."""
    import torch

    from .dit.transformer import build_dit

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_dit(PRESETS[preset])


def smoke_components(seed: int = 0, family: str = "bindweave") -> dict[str, Any]:
    """Tiny models whose widths fit together: planner, UMT5, CLIP vision, VAE and DiT (``tiny`` preset);
    for ``family="kaleido"`` the ``tiny-kaleido`` DiT with UMT5 and VAE only (Kaleido uses no CLIP/planner)."""
    from .encoders.clip_vision import ClipVisionEncoder
    from .encoders.planner import Planner
    from .encoders.text import TextEncoder
    from .encoders.vae import WanVAE

    if family not in SMOKE_FAMILIES:
        raise ValueError(f"no smoke model for family {family!r}; choose one of {SMOKE_FAMILIES}")
    from .families import family_for

    model_family = family_for(family)
    builders = dict(vae=WanVAE.tiny, text_encoder=TextEncoder.tiny, clip_vision=ClipVisionEncoder.tiny,
                    planner=Planner.tiny)
    return dict(dit=smoke_dit(seed, model_family.smoke_preset),
                **{name: build(seed) if name in model_family.encoders else None for name, build in builders.items()})
