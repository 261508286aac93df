"""The sampling grids and the UniPC solver against the official numbers (diffusers 0.33.1), not the installed diffusers.

``tests/data/official-schedule/unipc_official.json`` (copied from the project's shared data) was produced by
the official configuration on diffusers 0.33.1 (its README). These tests hold whatever diffusers version is installed.
"""

from __future__ import annotations

import json

import pytest
import torch

from bindweave_core.errors import InputError
from bindweave_core.sampling import GuidanceInputs, denoise
from bindweave_core.schedules import flow_euler_grid, official_unipc_grid
from helpers import OFFICIAL_SCHEDULE as OFFICIAL
from helpers import need


def official() -> dict:
    return json.loads(need(OFFICIAL).read_text())


def test_official_grid_reproduces_every_official_schedule():
    data = official()
    assert len(data["schedules"]) == 27  # shifts 1/3/5 x 4..50 steps
    for entry in data["schedules"]:
        grid = official_unipc_grid(entry["steps"], entry["shift"])
        assert entry["timesteps_dtype"] == "torch.int64" and grid.timesteps.dtype == torch.int64
        assert grid.timesteps.tolist() == [int(t) for t in entry["timesteps"]], (entry["shift"], entry["steps"])
        expected = torch.tensor(entry["sigmas"], dtype=torch.float64)
        assert grid.sigmas.dtype == torch.float32 and len(grid.sigmas) == entry["steps"] + 1
        assert (grid.sigmas.double() - expected).abs().max().item() <= 1e-6, (entry["shift"], entry["steps"])


def test_official_grid_differs_from_the_newer_diffusers_spacing():
    """The 0.37+ spacing the issue names (999, 993, 986 ... 113, 60) is not what we produce."""
    grid = official_unipc_grid(50, 3.0)
    assert grid.timesteps[:3].tolist() == [999, 992, 985]
    assert grid.timesteps[-3:].tolist() == [160, 111, 57]


def synthetic_field(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The README's field: ``0.8 tanh(x) + 0.2 sin(3x + t/250)``, t the timestep as float32."""
    t = t.float().view(-1, *([1] * (x.ndim - 1)))
    return 0.8 * torch.tanh(x) + 0.2 * torch.sin(3 * x + t / 250)


@pytest.mark.parametrize("index", [0, 1, 2])
def test_denoise_reproduces_the_official_trajectories(index):
    data = official()
    inputs = data["trajectory_inputs"]
    x0 = torch.tensor(inputs["x0_values"], dtype=torch.float32).view(1, 16, 3, 6, 8)
    assert torch.equal(x0, torch.randn(1, 16, 3, 6, 8, generator=torch.Generator().manual_seed(1234)))
    run = data["trajectories"][index]
    seen: list[float] = []

    def predict(latents, timestep, which):
        seen.extend(timestep.tolist())
        return synthetic_field(latents, timestep)

    final = denoise(GuidanceInputs(predict, guidance=1.0), x0, steps=run["steps"], shift=run["shift"])
    expected = torch.tensor(run["final"], dtype=torch.float32).view_as(final)
    assert (final - expected).abs().max().item() <= 1e-5
    # The DiT gets the official integer time values.
    assert seen == [float(t) for t in official_unipc_grid(run["steps"], run["shift"]).timesteps.tolist()]
    assert all(t == int(t) for t in seen)


def test_euler_grid_is_diffusers_flow_match_euler_grid():
    # Values printed by diffusers 0.33.1's FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=s)
    # after set_timesteps(n) (computed 2026-11-29; 0.42.1 gives the same).
    expected = {
        (5.0, 4): ([1000.0, 909.7071533203125, 717.3174438476562, 24.414066314697266],
                   [1.0, 0.9097071290016174, 0.7173174619674683, 0.0244140662252903, 0.0]),
        (3.0, 8): ([1000.0, 947.5425415039062, 882.7877807617188, 800.8373413085938, 693.7930908203125,
                    548.0455932617188, 337.97216796875, 8.928571701049805],
                   [1.0, 0.9475425481796265, 0.8827877640724182, 0.8008373379707336, 0.6937931180000305,
                    0.5480455756187439, 0.33797216415405273, 0.008928571827709675, 0.0]),
    }
    for (shift, steps), (timesteps, sigmas) in expected.items():
        grid = flow_euler_grid(steps, shift)
        assert grid.timesteps.tolist() == timesteps
        assert grid.sigmas.tolist() == sigmas


@pytest.mark.parametrize("shift,steps", [(1.0, 1), (3.0, 7), (5.0, 30), (7.0, 50)])
def test_euler_grid_matches_the_installed_diffusers(shift, steps):
    from diffusers import FlowMatchEulerDiscreteScheduler

    reference = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    reference.set_timesteps(steps)
    grid = flow_euler_grid(steps, shift)
    assert torch.equal(grid.timesteps, reference.timesteps)
    assert torch.equal(grid.sigmas, reference.sigmas)


@pytest.mark.parametrize("steps,shift", [(0, 3.0), (2.5, 3.0), (10, 0.0)])
def test_bad_grid_arguments_are_refused(steps, shift):
    with pytest.raises(InputError):
        official_unipc_grid(steps, shift)
    with pytest.raises(InputError):
        flow_euler_grid(steps, shift)
