"""Sampling grids (timesteps and sigmas), computed here so they never change with the installed diffusers.

The official BindWeave run used diffusers 0.33.1's ``UniPCMultistepScheduler`` (flow sigmas, shift 3).
diffusers 0.37 changed how that scheduler spaces flow sigmas, so taking the grid from whatever diffusers
is installed gives another video for the same seed (spec section 10; the official numbers are in
``shared/data/official-schedule/``). The arithmetic below is the 0.33.1 one, step by step and in the
same dtypes (numpy float64, then int64 timesteps by truncation and float32 sigmas).

* :func:`official_unipc_grid`: the official sampler's grid (``unipc``, the default);
* :func:`diffusers_unipc_grid`: whatever the installed diffusers computes (``unipc-diffusers``, opt-in);
* :func:`flow_euler_grid`: diffusers' ``FlowMatchEulerDiscreteScheduler`` grid (``euler``), which is the
  same in 0.33.1 and 0.42.1 but is computed here too so that it stays that way;
* :func:`rf_euler_grid`: Kaleido's official RF grid (``rf-euler``, :func:`rf_sigmas`; docs/kaleido-rrope.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from . import constants as C
from .setting_bounds import check_setting


@dataclass(frozen=True)
class FlowGrid:
    """``timesteps[i]`` is the DiT's time input at step ``i``; the step goes from ``sigmas[i]`` to ``sigmas[i+1]``."""

    timesteps: torch.Tensor  # [steps]
    sigmas: torch.Tensor  # [steps + 1] float32 on the CPU, ending at 0

    def __post_init__(self) -> None:
        if len(self.sigmas) != len(self.timesteps) + 1:
            raise ValueError("a flow grid has one sigma more than timesteps")


def shifted_sigmas(u: Any, shift: float) -> Any:
    """``shift u / (1 + (shift - 1) u)``: the flow-matching time shift of ``u`` in [0, 1] (the one place it is
    written; a numpy array or a tensor, in its own dtype, the operations in this order as upstream does)."""
    return shift * u / (1 + (shift - 1) * u)


def _check(steps: int, shift: float) -> None:
    """The grids' guard for direct callers: the bounds of ``setting_bounds`` (the one validator)."""
    check_setting("steps", steps)
    check_setting("shift", shift)


def official_unipc_grid(steps: int, shift: float = C.DEFAULT_SHIFT,
                        num_train_timesteps: int = C.NUM_TRAIN_TIMESTEPS) -> FlowGrid:
    """The official UniPC grid: diffusers 0.33.1, ``use_flow_sigmas``, ``final_sigmas_type="zero"``.

    ``u = 1 - linspace(1, 1/N, steps+1)`` (float64), shifted ``s*u / (1 + (s-1)*u)``, reversed, the
    trailing 0 dropped; timesteps ``int64(1000 * sigma)`` (truncated, as ``Tensor.to(int64)`` does);
    sigmas cast to float32 with a final 0.
    """
    _check(steps, shift)
    shift = float(shift)
    alphas = np.linspace(1, 1 / num_train_timesteps, steps + 1)
    sigmas = 1.0 - alphas
    sigmas = np.flip(shifted_sigmas(sigmas, shift))[:-1].copy()
    timesteps = torch.from_numpy(sigmas * num_train_timesteps).to(torch.int64)
    sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))
    return FlowGrid(timesteps=timesteps, sigmas=sigmas)


def flow_euler_grid(steps: int, shift: float = C.DEFAULT_SHIFT,
                    num_train_timesteps: int = C.NUM_TRAIN_TIMESTEPS) -> FlowGrid:
    """diffusers' ``FlowMatchEulerDiscreteScheduler(shift=s)`` grid (identical in 0.33.1 and 0.42.1).

    Its end points are the shifted training sigmas (float32) ``shift(1) = 1`` and ``shift(1/N)``; the
    ``steps`` points are spaced linearly between them (float64) and shifted *again* (diffusers' own
    arithmetic, kept as is); timesteps are ``1000 * sigma`` in float32 (not integers).
    """
    _check(steps, shift)
    shift = float(shift)
    ends = torch.tensor([num_train_timesteps, 1], dtype=torch.float32) / num_train_timesteps
    ends = shifted_sigmas(ends, shift)
    sigma_max, sigma_min = ends[0].item(), ends[1].item()
    sigmas = np.linspace(sigma_max * num_train_timesteps, sigma_min * num_train_timesteps, steps) / num_train_timesteps
    sigmas = torch.from_numpy(shifted_sigmas(sigmas, shift)).to(torch.float32)
    timesteps = sigmas * num_train_timesteps
    return FlowGrid(timesteps=timesteps, sigmas=torch.cat([sigmas, torch.zeros(1)]))


def rf_sigmas(steps: int, shift: float = C.KALEIDO_SHIFT) -> np.ndarray:
    """The ``steps + 1`` official sigmas from 1 to 0, float32 (computed in float64 first, as upstream).

    ``u = linspace(1, 0, steps + 1)``, ``sigma = shift * u / (1 + (shift - 1) * u)``; upstream writes
    the same numbers as ``1 - s / (shift + s - shift * s)`` with ``s = 1 - u``.
    """
    check_setting("steps", steps)
    u = np.linspace(1.0, 0.0, steps + 1)
    return shifted_sigmas(u, shift).astype(np.float32)


def rf_euler_grid(steps: int, shift: float = C.KALEIDO_SHIFT,
                  num_train_timesteps: int = C.NUM_TRAIN_TIMESTEPS) -> FlowGrid:
    """Kaleido's grid (:func:`rf_sigmas`, float32, 1 -> 0); timesteps ``1000 * sigma`` in float32."""
    _check(steps, shift)
    sigmas = torch.from_numpy(rf_sigmas(int(steps), float(shift)))
    return FlowGrid(timesteps=sigmas[:-1] * num_train_timesteps, sigmas=sigmas)


def diffusers_unipc_grid(steps: int, shift: float = C.DEFAULT_SHIFT) -> FlowGrid:
    """The grid of the *installed* diffusers' UniPC with the official configuration (differs from >= 0.37)."""
    _check(steps, shift)
    from diffusers import UniPCMultistepScheduler

    scheduler = UniPCMultistepScheduler(
        num_train_timesteps=C.NUM_TRAIN_TIMESTEPS, prediction_type="flow_prediction", use_flow_sigmas=True,
        flow_shift=float(shift), solver_order=2, solver_type="bh2", predict_x0=True, lower_order_final=True,
        final_sigmas_type="zero")
    scheduler.set_timesteps(int(steps))
    return FlowGrid(timesteps=scheduler.timesteps.clone(), sigmas=scheduler.sigmas.float().cpu().clone())
