"""The sampling loop against diffusers' schedulers, guidance call counts, seeds and cancelling.

The official grid itself is checked against the official numbers in ``test_schedules.py``; here the
solvers' stepping is compared with diffusers' own ``step`` on the same grid.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from bindweave_core.errors import GenerationCancelled
from bindweave_core.pipeline import GenerationSettings
from bindweave_core.sampling import GuidanceInputs, denoise, seeded_noise
from bindweave_core.schedules import official_unipc_grid

SHAPE = (1, 16, 3, 4, 6)


def fake_velocity(latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """A deterministic, state- and time-dependent velocity field."""
    t = timestep.float().view(-1, 1, 1, 1, 1) / 1000.0
    return 0.7 * latents - torch.sin(3.0 * t) + 0.1 * latents.roll(1, dims=-1)


class Counter:
    def __init__(self):
        self.calls: list[str] = []

    def __call__(self, latents, timestep, which):
        self.calls.append(which)
        cond = fake_velocity(latents, timestep)
        uncond = 0.5 * cond + 0.2
        return {"cond": cond, "uncond": uncond, "both": torch.cat([cond, uncond])}[which]


def reference_loop(scheduler, noise, steps, velocity):
    """diffusers' scheduler driven directly, as a diffusers pipeline would."""
    scheduler.set_timesteps(steps)
    x = noise.clone()
    for t in scheduler.timesteps:
        x = scheduler.step(velocity(x, t.expand(1)), t, x, return_dict=False)[0]
    return x


def diffusers_unipc(shift: float = 3.0) -> UniPCMultistepScheduler:
    return UniPCMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction",
                                   use_flow_sigmas=True, flow_shift=shift, solver_order=2, solver_type="bh2",
                                   final_sigmas_type="zero")


class OnOfficialGrid(UniPCMultistepScheduler):
    """The installed diffusers' UniPC stepping, fed the official grid after its own ``set_timesteps``."""

    def set_timesteps(self, num_inference_steps, device=None, **kwargs):
        super().set_timesteps(num_inference_steps, device=device, **kwargs)
        grid = official_unipc_grid(num_inference_steps, self.config.flow_shift)
        self.timesteps, self.sigmas = grid.timesteps.to(device), grid.sigmas


def diffusers_stepping_on_official_grid(shift: float = 3.0) -> UniPCMultistepScheduler:
    return OnOfficialGrid.from_config(diffusers_unipc(shift).config)


@pytest.mark.parametrize("steps", [1, 2, 7, 20])
def test_unipc_solver_steps_as_diffusers_on_the_official_grid(steps):
    noise = seeded_noise(SHAPE, 3)
    ours = denoise(GuidanceInputs(lambda x, t, w: fake_velocity(x, t), guidance=1.0), noise, steps=steps,
                   sampler="unipc", shift=3.0)
    expected = reference_loop(diffusers_stepping_on_official_grid(3.0), noise, steps, fake_velocity)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("steps", [1, 7, 20])
def test_unipc_diffusers_option_reproduces_the_installed_diffusers(steps):
    noise = seeded_noise(SHAPE, 3)
    ours = denoise(GuidanceInputs(lambda x, t, w: fake_velocity(x, t), guidance=1.0), noise, steps=steps,
                   sampler="unipc-diffusers", shift=3.0)
    torch.testing.assert_close(ours, reference_loop(diffusers_unipc(3.0), noise, steps, fake_velocity),
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("shift", [3.0, 5.0])
def test_euler_loop_reproduces_diffusers_stepping(shift):
    noise = seeded_noise(SHAPE, 4)
    ours = denoise(GuidanceInputs(lambda x, t, w: fake_velocity(x, t), guidance=1.0), noise, steps=8,
                   sampler="euler", shift=shift)
    official = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    assert torch.equal(ours, reference_loop(official, noise, 8, fake_velocity))


def test_guidance_combines_branches_as_the_spec_says():
    """uncond + 5 * (cond - uncond), batched or separate, equals the reference loop on that field."""
    noise = seeded_noise(SHAPE, 5)
    counter = Counter()

    def guided(x, t):
        cond = fake_velocity(x, t)
        uncond = 0.5 * cond + 0.2
        return uncond + 5.0 * (cond - uncond)

    batched = denoise(GuidanceInputs(counter, guidance=5.0, batch_cfg=True), noise, steps=6)
    separate = denoise(GuidanceInputs(Counter(), guidance=5.0, batch_cfg=False), noise, steps=6)
    expected = reference_loop(diffusers_stepping_on_official_grid(3.0), noise, 6, guided)
    torch.testing.assert_close(batched, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(separate, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("guidance,batch,expected", [(1.0, True, ["cond"]), (5.0, True, ["both"]),
                                                      (5.0, False, ["cond", "uncond"])])
def test_model_calls_per_step(guidance, batch, expected):
    counter = Counter()
    denoise(GuidanceInputs(counter, guidance=guidance, batch_cfg=batch), seeded_noise(SHAPE, 0), steps=5)
    assert counter.calls == expected * 5


def test_seeded_noise_is_reproducible_and_ignores_global_rng():
    a = seeded_noise(SHAPE, 42)
    torch.manual_seed(123)
    torch.randn(100)
    b = seeded_noise(SHAPE, 42)
    assert torch.equal(a, b)
    assert not torch.equal(a, seeded_noise(SHAPE, 43))
    assert a.dtype == torch.float32 and a.device.type == "cpu"


def test_noise_is_drawn_in_bf16_like_the_official_run():
    """Official: ``randn`` in bf16 from a CPU generator (torch 2.1 kernel: coarse, |x| <= 3.33)."""
    shape = (1, 16, 3, 8, 8)
    noise = seeded_noise(shape, 1234)
    assert torch.equal(noise, noise.bfloat16().float())  # bf16 values
    assert noise.abs().max() <= 3.33  # sqrt(-2 ln(1/256)): 8-bit uniforms
    assert not torch.equal(noise, torch.randn(shape, generator=torch.Generator().manual_seed(1234)))
    torch.testing.assert_close(noise.mean(), torch.tensor(0.0), rtol=0, atol=0.1)
    torch.testing.assert_close(noise.std(), torch.tensor(1.0), rtol=0, atol=0.1)


def test_default_seed_is_the_official_one():
    """Spec section 10: seed 1234 wherever a run gets no seed (settings, the command line, the noise)."""
    from bindweave_core.cli import build_parser

    assert GenerationSettings(prompt="x").seed == 1234
    args = build_parser().parse_args(["generate", "--smoke", "--prompt", "x", "--ref", "a.png", "--out", "o.mp4"])
    assert args.seed == 1234
    assert torch.equal(seeded_noise(SHAPE), seeded_noise(SHAPE, 1234))


@pytest.mark.parametrize("stop_at", [1, 3])
def test_cancel_from_callback_stops_within_one_step(stop_at):
    counter = Counter()
    seen = []

    def callback(step, total, latents):
        seen.append((step, total, tuple(latents.shape)))
        return step != stop_at

    with pytest.raises(GenerationCancelled, match=f"after step {stop_at} of 6"):
        denoise(GuidanceInputs(counter, guidance=5.0), seeded_noise(SHAPE, 0), steps=6, callback=callback)
    assert len(counter.calls) == stop_at
    assert seen == [(i, 6, SHAPE) for i in range(1, stop_at + 1)]


def test_exception_in_callback_cancels_too():
    def callback(step, total, latents):
        raise GenerationCancelled("user pressed cancel")

    with pytest.raises(GenerationCancelled, match="user pressed cancel"):
        denoise(GuidanceInputs(Counter(), guidance=1.0), seeded_noise(SHAPE, 0), steps=3, callback=callback)


def test_guidance_batch_is_two_only_for_batched_guidance():
    from bindweave_core.sampling import guidance_batch

    assert guidance_batch(5.0, batch_cfg=True) == 2
    assert guidance_batch(5.0, batch_cfg=False) == 1  # cfg_batch separate
    assert guidance_batch(1.0, batch_cfg=True) == 1  # no negative branch at all
    assert guidance_batch(5.0, batch_cfg=True, cfg_parallel=True) == 1  # one branch per GPU
