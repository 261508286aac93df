"""Denoising: diffusers' flow schedulers, classifier-free guidance, progress and cancel (spec 10).

* ``unipc`` (default): ``UniPCMultistepScheduler`` with flow prediction, flow sigmas, shift 3.0,
  order 2, bh2, final sigma 0, 1000 train timesteps: the official sampler.
* ``euler``: ``FlowMatchEulerDiscreteScheduler`` with the same shift.
* ``rf-euler``: Euler over ``sigma = shift*u / (1 + (shift-1)*u)``, ``u = linspace(1, 0, steps+1)``: the
  Kaleido/SAT sampler (shift 7 there; ``kaleido.RFEulerScheduler``).
* few-step (step-distilled LoRAs): :data:`FEW_STEP_PRESET`, guidance 1.0 skips the unconditional branch.

Noise comes from a seeded CPU generator so a seed gives the same video on every device.
Latents are kept in float32 between steps; the model runs in its own dtype.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import constants as C
from .device_memory import release_memory
from .errors import GenerationCancelled, InputError

log = logging.getLogger("BindWeave")

SAMPLERS = ("unipc", "euler", "rf-euler")
# The lightx2v step-distill LoRA's own recipe (ModelTC/LightX2V configs/distill/wan_i2v_distill_4step_cfg_lora.json:
# infer_steps 4, sample_shift 5, enable_cfg false, denoising_step_list [1000, 750, 500, 250]; its
# WanStepDistillScheduler steps Euler over sigma = 5u / (1 + 4u) at u = 1, .75, .5, .25, then to 0), which
# is exactly our rf-euler grid for 4 steps and shift 5 (tests/test_step_cache.py checks it).
FEW_STEP_PRESET = {"sampler": "rf-euler", "steps": 4, "guidance": 1.0, "shift": 5.0}

# A progress callback gets (step done, total steps, current latents). Returning False cancels;
# raising (e.g. GenerationCancelled, or ComfyUI's interrupt) cancels too.
ProgressCallback = Callable[[int, int, torch.Tensor], "bool | None"]


def make_scheduler(sampler: str = "unipc", shift: float = C.DEFAULT_SHIFT):
    """A fresh diffusers scheduler configured as the official sampler (or its Euler sibling)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    if sampler == "unipc":
        return UniPCMultistepScheduler(
            num_train_timesteps=C.NUM_TRAIN_TIMESTEPS, prediction_type="flow_prediction", use_flow_sigmas=True,
            flow_shift=shift, solver_order=2, solver_type="bh2", predict_x0=True, lower_order_final=True,
            final_sigmas_type="zero")
    if sampler == "euler":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=C.NUM_TRAIN_TIMESTEPS, shift=shift)
    if sampler == "rf-euler":
        from .kaleido import RFEulerScheduler

        return RFEulerScheduler(shift=shift)
    raise InputError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")


def seeded_noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Standard normal noise from a CPU generator: identical on every device for a seed."""
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(seed)), dtype=torch.float32)


@dataclass
class GuidanceInputs:
    """Everything the denoiser needs besides the latents: one positive and one negative branch.

    ``predict(latents, timestep, branches)`` returns the velocity for the given branches
    (``"cond"``, ``"uncond"`` or ``"both"``, the latter batched as [cond, uncond]).
    """

    predict: Callable[[torch.Tensor, torch.Tensor, str], torch.Tensor]
    guidance: float = C.DEFAULT_GUIDANCE
    batch_cfg: bool = True


def guided_velocity(inputs: GuidanceInputs, latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """``uncond + g * (cond - uncond)``; a single conditional call when ``g == 1``."""
    if inputs.guidance == 1.0:
        return inputs.predict(latents, timestep, "cond")
    if inputs.batch_cfg:
        cond, uncond = inputs.predict(latents, timestep, "both").chunk(2)
    else:
        cond = inputs.predict(latents, timestep, "cond")
        uncond = inputs.predict(latents, timestep, "uncond")
    return uncond + inputs.guidance * (cond - uncond)


def denoise(inputs: GuidanceInputs, noise: torch.Tensor, *, steps: int = C.DEFAULT_STEPS,
            sampler: str = "unipc", shift: float = C.DEFAULT_SHIFT,
            callback: ProgressCallback | None = None, step_cache=None) -> torch.Tensor:
    """Run the sampler from ``noise`` (float32 latents) and return the final float32 latents.

    ``step_cache``: an optional :class:`bindweave_core.step_cache.StepCache` (skips DiT evaluations)."""
    if steps < 1:
        raise InputError(f"steps must be at least 1, got {steps}")
    scheduler = make_scheduler(sampler, shift)
    scheduler.set_timesteps(steps, device=noise.device)
    latents = noise.float()
    total = len(scheduler.timesteps)
    if step_cache is not None:
        inputs = step_cache.attach(inputs, total)
    try:
        for i, t in enumerate(scheduler.timesteps):
            timestep = t.expand(latents.shape[0]).float()
            velocity = guided_velocity(inputs, latents, timestep).float()
            latents = scheduler.step(velocity, t, latents, return_dict=False)[0]
            del velocity
            if callback is not None and callback(i + 1, total, latents) is False:
                raise GenerationCancelled(f"generation cancelled after step {i + 1} of {total}")
    except BaseException:
        del latents
        release_memory()
        raise
    return latents

