"""Denoising: the flow samplers, classifier-free guidance, progress and cancel (spec 10).

* ``unipc`` (default): the official sampler, UniPC with flow prediction, flow sigmas, shift 3.0, order 2,
  bh2, final sigma 0, 1000 train timesteps, on the grid diffusers 0.33.1 computed (integer timesteps),
  whatever diffusers is installed (``schedules.official_unipc_grid`` + ``solvers.UniPCSolver``).
* ``unipc-diffusers``: the same solver on the grid of the *installed* diffusers (0.37 and later space it
  differently); for matching videos made with a newer diffusers' UniPC, not the official ones.
* ``euler``: flow Euler on diffusers' ``FlowMatchEulerDiscreteScheduler`` grid with the same shift
  (``schedules.flow_euler_grid``, computed here).
* ``rf-euler``: Euler over ``sigma = shift*u / (1 + (shift-1)*u)``, ``u = linspace(1, 0, steps+1)``: the
  Kaleido/SAT sampler (shift 7 there; ``schedules.rf_euler_grid``).
* few-step (step-distilled LoRAs): :data:`FEW_STEP_PRESET`, guidance 1.0 skips the unconditional branch.

Noise is drawn as the official run draws it: ``torch.randn`` in bfloat16 from a CPU generator seeded with
the seed (default 1234), computed as torch 2.1's CPU kernel did (``noise.official_bf16_randn``: newer torch
draws other bf16 values), so a seed gives the same video on every device and torch version. Latents, guidance and the
solver state are kept in float32 between steps (the official run keeps them in bf16; the size of that
difference is measured in ``docs/fidelity.md``); the model runs in its own dtype.
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

SAMPLERS = C.SAMPLERS
# The lightx2v step-distill LoRA's own recipe (ModelTC/LightX2V configs/distill/wan_i2v_distill_4step_cfg_lora.json:
# infer_steps 4, sample_shift 5, enable_cfg false, denoising_step_list [1000, 750, 500, 250]; its
# WanStepDistillScheduler steps Euler over sigma = 5u / (1 + 4u) at u = 1, .75, .5, .25, then to 0), which
# is exactly our rf-euler grid for 4 steps and shift 5 (tests/test_step_cache.py checks it).
FEW_STEP_PRESET = {"sampler": "rf-euler", "steps": 4, "guidance": 1.0, "shift": 5.0}

# A progress callback gets (step done, total steps, current latents). Returning False cancels;
# raising (e.g. GenerationCancelled, or ComfyUI's interrupt) cancels too.
ProgressCallback = Callable[[int, int, torch.Tensor], "bool | None"]


def make_scheduler(sampler: str = "unipc", shift: float = C.DEFAULT_SHIFT):
    """A fresh solver for ``sampler`` (diffusers' scheduler interface: ``set_timesteps``, ``step``)."""
    from .schedules import diffusers_unipc_grid, flow_euler_grid, official_unipc_grid, rf_euler_grid
    from .solvers import FlowEulerSolver, UniPCSolver

    if sampler == "unipc":
        return UniPCSolver(lambda steps: official_unipc_grid(steps, shift))
    if sampler == "unipc-diffusers":
        return UniPCSolver(lambda steps: diffusers_unipc_grid(steps, shift))
    if sampler == "euler":
        return FlowEulerSolver(lambda steps: flow_euler_grid(steps, shift))
    if sampler == "rf-euler":
        return FlowEulerSolver(lambda steps: rf_euler_grid(steps, shift))
    raise InputError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")


def seeded_noise(shape: tuple[int, ...], seed: int = C.DEFAULT_SEED) -> torch.Tensor:
    """Standard normal noise as the official run draws it (bf16, CPU generator, torch 2.1), as float32.

    Identical on every device and torch version for a seed; bf16 values are exact in float32.
    """
    from .noise import official_bf16_randn

    return official_bf16_randn(tuple(shape), seed).float()


@dataclass
class GuidanceInputs:
    """Everything the denoiser needs besides the latents: one positive and one negative branch.

    ``predict(latents, timestep, branches)`` returns the velocity for the given branches
    (``"cond"``, ``"uncond"`` or ``"both"``, the latter batched as [cond, uncond]).
    """

    predict: Callable[[torch.Tensor, torch.Tensor, str], torch.Tensor]
    guidance: float = C.DEFAULT_GUIDANCE
    batch_cfg: bool = True


def guidance_batch(guidance: float, batch_cfg: bool, cfg_parallel: bool = False) -> int:
    """Items in one DiT call: 2 when the positive and negative branches run as one batch, else 1 (guidance
    1.0 runs the positive branch alone; cfg-parallel gives each GPU one branch)."""
    return 2 if batch_cfg and guidance != 1.0 and not cfg_parallel else 1


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

