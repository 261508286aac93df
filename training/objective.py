"""The training objective of spec section 12: rectified flow on the video frames.

For clean latents ``x0`` and noise ``n``: ``x_t = (1 - s) x0 + s n``, the model (time input
``1000 s``) predicts the velocity ``n - x0``, and the loss is the MSE over the video frames only:
the DiT drops its predictions for the reference slots (or R-RoPE reference tokens) itself. The
noise level is ``s = shift u / (1 + (shift - 1) u)`` for ``u ~ U(0, 1)`` (the shifted schedule;
shift 5 as the official recipe), which spends more steps at high noise.

Random numbers come from CPU generators seeded per step, so a run is reproducible on any device
and resumes exactly. How the cached conditioning becomes DiT inputs is a registry of
*conditioning builders*: ``slots`` (BindWeave, the default) and ``rrope`` (Kaleido-style sequence
references); ``register_conditioning`` adds others. Which mode and noise draw a DiT takes is its
family object's (:mod:`bindweave_core.families`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from bindweave_core import constants as C
from bindweave_core.conditioning import vae_condition
from bindweave_core.config import DiTConfig
from bindweave_core.denoiser import DiTBranch, call_dit
from bindweave_core.errors import InputError
from bindweave_core.families import family_for, sigma_sampling_family, sigma_sampling_for
from bindweave_core.schedules import shifted_sigmas  # noqa: F401  (training's name for the spec 12 shift)

# A builder turns one cached item (see training.cache.load_entry) into the DiT inputs of its branch.
ConditioningBuilder = Callable[[dict[str, Any], torch.Tensor, DiTConfig], DiTBranch]
CONDITIONING: dict[str, ConditioningBuilder] = {}


def register_conditioning(name: str, builder: ConditioningBuilder) -> None:
    """Add or replace a conditioning mode (``objective.conditioning`` in the config)."""
    CONDITIONING[name] = builder


def _context(item: dict[str, Any], config: DiTConfig) -> dict[str, torch.Tensor | None]:
    """Text, planner and CLIP states, each only where the DiT has the module that reads it."""
    return dict(text_states=item["text"],
                planner_states=item.get("planner") if config.planner_dim is not None else None,
                clip_tokens=item.get("clip") if config.image_dim is not None else None)


def slot_branch(item: dict[str, Any], video_condition: torch.Tensor, config: DiTConfig) -> DiTBranch:
    """BindWeave: the 4 reference slots then the video condition, in time (spec section 8)."""
    return DiTBranch(**_context(item, config), condition=vae_condition(item["slots"], video_condition))


def rrope_branch(item: dict[str, Any], video_condition: torch.Tensor | None, config: DiTConfig) -> DiTBranch:
    """R-RoPE (Kaleido): the clean reference latents go in front of the video as sequence references
    (the DiT shifts their positions and drops their outputs). The cache encodes them with
    :func:`bindweave_core.kaleido.encode_kaleido_references` (white letterbox, each alone)."""
    refs = item["ref_latents"]  # [1, n, 16, h, w]
    limit = family_for(config).max_references
    if refs.shape[1] > limit:
        raise InputError(f"{refs.shape[1]} references; this model takes at most {limit}.")
    return DiTBranch(**_context(item, config), reference_latents=refs)


register_conditioning("slots", slot_branch)
register_conditioning("rrope", rrope_branch)


def conditioning_mode(requested: str, config: DiTConfig) -> str:
    """``auto`` -> the DiT family's own mode; a mode the family cannot take is an error."""
    family = family_for(config)
    mode = requested if requested != "auto" else family.conditioning
    if mode not in CONDITIONING:
        raise InputError(f"objective.conditioning {mode!r} is not available; choose one of {sorted(CONDITIONING)}.")
    family.check_training_conditioning(mode)
    return mode


# ------------------------------------------------------------------------------------------ randomness
def step_generator(*parts: Any) -> torch.Generator:
    """A CPU generator seeded from ``parts`` (e.g. seed, purpose, step, rank): no state to save."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return torch.Generator("cpu").manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def sample_sigmas(batch: int, generator: torch.Generator, shift: float = C.TRAIN_TIMESTEP_SHIFT,
                  fixed: float | None = None, method: str = "shifted",
                  latent_size: tuple[int, int] | None = None) -> torch.Tensor:
    """Noise levels ``[B]``: ``shifted`` (spec 12) or ``kaleido`` (Kaleido's own resolution-shifted draw)."""
    if fixed is not None:
        return torch.full((batch,), float(fixed))
    return sigma_sampling_family(method).training_sigmas(batch, generator, shift, latent_size)


def sigma_method(requested: str, mode: str) -> str:
    """``auto``: Kaleido's draw for R-RoPE, the shifted schedule of spec section 12 otherwise."""
    return requested if requested != "auto" else sigma_sampling_for(mode)


# ------------------------------------------------------------------------------------------ the loss
def flow_matching_loss(dit: torch.nn.Module, latents: torch.Tensor, branches: list[DiTBranch],
                       sigmas: torch.Tensor, noise: torch.Tensor, *, device: torch.device | str,
                       dtype: torch.dtype) -> torch.Tensor:
    """MSE between the DiT's velocity and ``noise - x0`` at ``x_t = (1 - s) x0 + s noise``.

    ``latents``/``noise`` ``[B, 16, T, h, w]`` (float32, video frames only), ``sigmas`` ``[B]``,
    one branch per item. ``dit`` may be wrapped (DDP); ``dtype`` is its compute dtype.
    """
    x0 = latents.to(device=device, dtype=torch.float32)
    noise = noise.to(device=device, dtype=torch.float32)
    s = sigmas.to(device=device, dtype=torch.float32).view(-1, 1, 1, 1, 1)
    noisy = (1 - s) * x0 + s * noise
    target = noise - x0
    pred = call_dit(dit, noisy.to(dtype), s.flatten() * C.NUM_TRAIN_TIMESTEPS, [b.to(device, dtype) for b in branches])
    return F.mse_loss(pred.float(), target)
